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


# -- training: a whole round, LoRA on both text encoders, Custom Diffusion -------------------------------------
# the random embedded SDXL draws nearly the same warm score everywhere (about 28): the scripted rater's noise
# spreads its tiers
ROUND = [*FAST, *XL, "rate.noise=40", "rate.cutoffs=[35,15,-5,-25]", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """A workspace on embedded-xl whose round 0 is generated, rated by the scripted rater and selected."""
    from loop.round import run_round
    from loop.workspace import Workspace

    ws = Workspace.init(tmp_path_factory.mktemp("xl") / "ws")
    ws.prompts_path.write_text("a circle\na square\n", encoding="utf-8")
    res = run_round(ws, load_config(ws.root, ROUND), auto_rate_=True, log=quiet, stop_after="select")
    assert res.ran == ["generate", "rate", "select"]
    return ws


def _copy(ws, dest):
    import shutil

    from loop.workspace import Workspace

    shutil.copytree(ws.root, dest / "ws")
    return Workspace(dest / "ws")


def _render(ws, cfg, unit: int, prompt: str = "a circle", seed: int = 0) -> np.ndarray:
    """Loop's own render of a unit (the generator's Renderer), as uint8 pixels."""
    from loop.generate import Job, Renderer

    job = Job(prompt=prompt, negative="", seed=seed, steps=4, cfg=4.0, width=32, height=32)
    return np.asarray(Renderer(ws, None, cfg, unit).render([job])[0], dtype=np.int16)


@pytest.mark.slow
def test_whole_round_on_sdxl_trains_a_unit_that_draws_differently(selected, tmp_path):
    from loop.round import run_round

    ws = _copy(selected, tmp_path)
    cfg = load_config(ws.root, ROUND)
    res = run_round(ws, cfg, auto_rate_=True, log=quiet)
    assert res.ran == ["train"] and res.status == "done"
    manifest = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert manifest["base_model"] == "embedded-xl" and manifest["method"] == "lora"
    # the default objective, dpo, got pairs (it must pass SDXL's extra conditioning to the unit and the reference)
    assert manifest["objective"] == "dpo" and manifest["pairs"] > 0, manifest.get("objective_note")
    assert np.isfinite(manifest["final_loss"])
    with ws.store() as store:
        assert store.unit(1) is not None and all(store.phase_done(0, p) for p in ("generate", "rate", "select"))
    assert np.abs(_render(ws, cfg, 1) - _render(ws, cfg, 0)).mean() > 0.5
    # a UNet-only LoRA of an SDXL unit is still tagged SDXL in its kohya export (AUTOMATIC1111 hides it otherwise)
    from safetensors import safe_open

    from loop.interop import export_lora

    with ws.store() as store:
        out = export_lora(ws, store, 1, "kohya", out=tmp_path / "unit1.safetensors", log=quiet)
    with safe_open(out["path"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert all(k.startswith("lora_unet_") for k in f.keys())


@pytest.fixture(scope="module")
def te_unit(selected, tmp_path_factory):
    """Unit 1 on embedded-xl with a LoRA on the UNet and both text encoders (trained supervised, as such units
    are), and its kohya export."""
    from loop.interop import export_lora
    from loop.train import train_unit

    ws = _copy(selected, tmp_path_factory.mktemp("xl_te"))
    cfg = load_config(ws.root, [*ROUND, "train.text_encoder_lora=true", "train.objective=supervised"])
    logs = []
    with ws.store() as store:
        manifest = train_unit(ws, store, cfg, parent=0, log=logs.append)
        kohya = export_lora(ws, store, 1, "kohya", out=ws.root / "kohya" / "unit1.safetensors", log=quiet)
    assert manifest["text_encoder_lora"] and manifest["objective"] == "supervised"
    return ws, cfg, kohya


@pytest.mark.slow
def test_sdxl_lora_file_holds_both_text_encoders_and_kohya_names_them(te_unit):
    from safetensors import safe_open

    ws, _, kohya = te_unit
    with safe_open(str(ws.checkpoint(1) / "pytorch_lora_weights.safetensors"), "pt") as f:
        comps = {k.split(".", 1)[0] for k in f.keys()}
    assert comps == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(kohya["path"], "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}, prefixes
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


FRESH = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from pathlib import Path
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    base, unit, kohya, out = sys.argv[1:]
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

    def draw():
        g = torch.Generator().manual_seed(0)
        image = pipe("a circle", num_inference_steps=4, guidance_scale=4.0, generator=g, width=32, height=32)
        return np.asarray(image.images[0], dtype=np.int16)

    plain = draw()
    pipe.load_lora_weights(unit)
    lora = draw()
    pipe.unload_lora_weights()
    assert np.array_equal(draw(), plain), "unloading the LoRA should give the base back"
    pipe.load_lora_weights(str(Path(kohya).parent), weight_name=Path(kohya).name)
    np.savez(out, plain=plain, lora=lora, kohya=draw())
    """
)


@pytest.mark.slow
def test_sdxl_unit_reloads_in_a_fresh_process_and_its_kohya_export_draws_the_same(te_unit, xl_folder, tmp_path):
    ws, cfg, kohya = te_unit
    out = tmp_path / "images.npz"
    proc = subprocess.run([sys.executable, "-c", FRESH, str(xl_folder), str(ws.checkpoint(1)), kohya["path"],
                           str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    assert np.abs(got["lora"] - got["plain"]).mean() > 0.5, "the unit's LoRA changes nothing"
    ours = _render(ws, cfg, 1)
    assert np.abs(got["lora"] - ours).max() <= 2, "diffusers' render of the unit is not loop's"
    assert np.abs(got["kohya"] - got["lora"]).max() <= 2, "the kohya export draws another picture"
    assert np.abs(got["plain"] - _render(ws, cfg, 0)).max() <= 2


@pytest.mark.slow
def test_custom_diffusion_on_sdxl(selected, tmp_path):
    from safetensors import safe_open

    from loop.models import load_unit, unit_trigger
    from loop.train import train_unit

    ws = _copy(selected, tmp_path)
    cfg = load_config(ws.root, [*ROUND, "train.method=custom_diffusion", "train.lr=1e-2"])
    with ws.store() as store:
        manifest = train_unit(ws, store, cfg, parent=0, log=quiet)
    assert manifest["method"] == "custom_diffusion" and manifest["modifier_token"] == "<new1>"
    with safe_open(str(ws.checkpoint(1) / "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0] for k in f.keys()}
    assert modules and all(m.startswith("unet.") and m.endswith(("attn2.to_k", "attn2.to_v")) for m in modules)
    # the token's row in each text encoder, as AUTOMATIC1111's SDXL embeddings are laid out
    with safe_open(str(ws.checkpoint(1) / "learned_embeds.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata()["token"] == "<new1>"
    assert shapes == {"clip_l": (1, 32), "clip_g": (1, 48)}
    assert unit_trigger(ws.checkpoint(1)) == "<new1>"
    pipe = load_unit(cfg.model, ws.checkpoint(1), 1)
    for tok, enc in families.text_encoders(pipe):
        row = tok.convert_tokens_to_ids("<new1>")
        assert enc.get_input_embeddings().weight.shape[0] == row + 1
    # the token learnt in both encoders: the unit with it draws otherwise than the base with the same words
    assert np.abs(_render(ws, cfg, 1) - _render(ws, cfg, 0)).mean() > 0.5
    # exported for AUTOMATIC1111: the LoRA, and the embedding in its SDXL layout beside it
    from loop.interop import export_lora

    with ws.store() as store:
        out = export_lora(ws, store, 1, "kohya", out=tmp_path / "cd.safetensors", log=quiet)
    with safe_open(out["embedding"], "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
