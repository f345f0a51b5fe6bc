"""SDXL through loop's one path, on the embedded SDXL (`model.base=embedded-xl`, loop.tiny.build_xl): the model
itself, generation and variations, a whole round, Custom Diffusion, and units that outside tools load."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import FAST

from loop import families
from loop.config import ModelConfig, load_config

quiet = lambda m: None  # noqa: E731
XL = ["model.base=embedded-xl"]


@pytest.fixture(scope="module")
def xl_folder():
    from loop.tiny.build_xl import ensure

    return ensure()


def test_embedded_xl_is_deterministic_and_loads_with_a_plain_from_pretrained(tmp_path, xl_folder):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from loop.tiny.build_xl import build, components

    # 1. two builds are byte for byte the same model, and the cached one is that model
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        cached, fresh = load_file(xl_folder / rel), load_file(a / rel)
        assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached), rel

    # 2. a plain DiffusionPipeline.from_pretrained: the XL pipeline, fp32 throughout, every weight as built
    pipe = DiffusionPipeline.from_pretrained(str(xl_folder))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    parts = components()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, name).state_dict(), parts[name].state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want), f"{name} not loaded as built"
        assert getattr(pipe, name).dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + (
        pipe.text_encoder_2.config.hidden_size
    )
    image = pipe("a circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, 32, 32, 3) and np.isfinite(image.images).all()


def test_the_family_comes_from_the_checkpoint(tmp_path, xl_folder):
    from loop.models import EMBEDDED, load_base

    assert families.family_of_folder(EMBEDDED) == families.SD
    assert families.family_of_folder(xl_folder) == families.SDXL
    # a folder whose model_index.json says nothing about XL is still told by its UNet's added conditioning
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert families.family_of_folder(tmp_path) == families.SDXL
    pipe = load_base(ModelConfig(base="embedded-xl"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and families.family_of(pipe) == families.SDXL
    assert [type(e).__name__ for _, e in families.text_encoders(pipe)] == [
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
    ]


def test_prompt_encoder_matches_the_pipeline(xl_folder):
    """Training's text side (both encoders' penultimate states side by side, the second's pooled projection) is
    what the SDXL pipeline conditions on; the empty caption is its zeros."""
    from loop.models import load_base

    pipe = load_base(ModelConfig(base="embedded-xl"))
    enc = families.prompt_encoder(pipe)
    with torch.no_grad():
        hidden, pooled = enc(families.token_ids(pipe, ["a red circle", ""]))
        want, neg, want_pooled, neg_pooled = pipe.encode_prompt("a red circle", device="cpu", negative_prompt=None)
    assert torch.allclose(hidden[:1], want, atol=1e-6) and torch.allclose(pooled[:1], want_pooled, atol=1e-6)
    assert torch.equal(hidden[1:], neg) and torch.equal(pooled[1:], neg_pooled)  # zeros, as guidance uses
    assert bool(neg.eq(0).all())


def test_generation_and_variations_on_sdxl(ws):
    from PIL import Image

    from loop.generate import Job, Renderer, generate, resolve_image, vary

    cfg = load_config(ws.root, [*FAST, *XL, "generate.images_per_prompt=2"])
    with ws.store() as store:
        store.ensure_base_unit("embedded-xl")
        res = generate(ws, store, cfg, 0, log=quiet)
        assert res["made"] == 4
        rows = store.images(unit=0)
        first = rows[0]
        with Image.open(ws.root / first["path"]) as im:
            params = im.info["parameters"]
            loop_meta = json.loads(im.info["loop"])
            assert im.size == (32, 32)
        assert "Model: embedded-xl" in params and f"Seed: {first['seed']}," in params and "Size: 32x32" in params
        assert loop_meta["model"] == "embedded-xl" and loop_meta["unit"] == 0
        # the recorded prompt and seed re-render the same picture
        renderer = Renderer(ws, None, cfg, 0)
        job = Job(prompt=first["prompt"], negative="", seed=first["seed"], steps=cfg.generate.steps,
                  cfg=cfg.generate.cfg, width=32, height=32)  # fmt: skip
        again = np.asarray(renderer.render([job])[0], dtype=int)
        with Image.open(ws.root / first["path"]) as im:
            assert np.abs(again - np.asarray(im.convert("RGB"), dtype=int)).max() <= 3
        # img2img variations go through the SDXL img2img pipeline and are linked to their parent
        ids = vary(ws, store, cfg, [resolve_image(ws, store, str(first["id"]))], n=2, strength=0.6, unit=0, log=quiet)
        assert len(ids) == 2
        kids = [store.image(i) for i in ids]
        assert all(k["parent_id"] == first["id"] for k in kids)
        assert type(renderer.pipe).__name__ == "StableDiffusionXLPipeline"
        renderer.render([dataclasses.replace(job, strength=0.5)], [Image.new("RGB", (32, 32), (200, 40, 40))])
        assert type(renderer._img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_bench_sdxl_without_a_gpu_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from loop.bench.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sdxl", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs a CUDA GPU" in out[0]
    assert not list(tmp_path.iterdir())
