"""Single-file checkpoints (`model.base=FILE.safetensors`, `loop export-model`); the embedded model loads plainly."""

import numpy as np
import torch
from safetensors.torch import load_file

from loop.models import EMBEDDED


def _render(pipe, prompt="a circle", seed=0, steps=4):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, generator=g, output_type="np").images[0]


# -- the embedded model, loaded as anyone would ------------------------------------------------------------------
def test_the_embedded_model_loads_with_a_plain_from_pretrained():
    """No torch_dtype, no loop code: the pipeline renders (no fp16/fp32 mix) and its text encoder holds the
    shipped weights (keys named so that transformers 4.x, which skips unknown names, reads them too)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(EMBEDDED))
    pipe.set_progress_bar_config(disable=True)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    image = _render(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    shipped = load_file(EMBEDDED / "text_encoder" / "model.safetensors")
    assert shipped and all(k.startswith("text_model.") for k in shipped), sorted(shipped)[:3]
    assert all(v.dtype == torch.float32 for v in shipped.values())
    loaded = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    for key, value in shipped.items():
        assert torch.equal(loaded[key.removeprefix("text_model.")], value), key
