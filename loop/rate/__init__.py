"""Rating: the scripted rater now (`loop rate --auto`); the Gradio page comes next."""
