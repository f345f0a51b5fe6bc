"""Rating: the Gradio page (`loop rate`) and the scripted rater for demos and tests (`loop rate --auto`)."""
