"""Single-file checkpoints (`model.base=FILE.safetensors`, `loop export-model`); the embedded model loads plainly."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loop.config import load_config
from loop.errors import LoopError
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


# -- names: diffusers -> the original layout ----------------------------------------------------------------------
def test_the_converter_names_every_weight_as_the_original_layout_and_diffusers_reads_it_back(base_pipe):
    """On the embedded model (2 levels, 1 layer each) and on SD 1.5 and SDXL shapes (meta tensors): every weight gets
    a name diffusers' own single-file converters map back to the same weight, with the counts real checkpoints have."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from loop.checkpoint import clip_to_original, unet_to_original, vae_to_original

    def same(a, b):
        assert set(a) == set(b), (sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3])
        for k in a:
            assert a[k].shape == b[k].shape and (a[k].is_meta or torch.equal(a[k], b[k])), k

    unet, vae, te = base_pipe.unet, base_pipe.vae, base_pipe.text_encoder
    same(convert_ldm_unet_checkpoint(unet_to_original(unet.state_dict(), dict(unet.config)), dict(unet.config)),
         unet.state_dict())  # fmt: skip
    same(convert_ldm_vae_checkpoint(vae_to_original(vae.state_dict(), dict(vae.config)), dict(vae.config)),
         vae.state_dict())  # fmt: skip
    clip = clip_to_original(te.state_dict(), "cond_stage_model.transformer.")
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in clip)
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(clip).items()}
    same(back, {k.removeprefix("text_model."): v for k, v in te.state_dict().items()})

    sd15 = dict(
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    sdxl = dict(
        cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20],
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    # SD 1.5's UNet has 686 weights, SDXL's 1680; names every A1111 / ComfyUI model has
    for shape, count, names in [
        (sd15, 686, ["output_blocks.11.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
                     "output_blocks.5.2.conv.weight", "input_blocks.3.0.op.weight", "middle_block.2.emb_layers.1.bias",
                     "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]),
        (sdxl, 1680, ["label_emb.0.0.weight", "output_blocks.2.2.conv.weight", "input_blocks.6.0.op.weight",
                      "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight"]),
    ]:  # fmt: skip
        with init_empty_weights():
            model = UNet2DConditionModel(layers_per_block=2, **shape)
        original = unet_to_original(model.state_dict(), dict(model.config))
        assert len(original) == count
        assert all(f"model.diffusion_model.{n}" in original for n in names)
        same(convert_ldm_unet_checkpoint(original, dict(model.config)), model.state_dict())
    with init_empty_weights():
        big = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    original = vae_to_original(big.state_dict(), dict(big.config))
    assert len(original) == 248 and original["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in original  # diffusers' up_blocks.0, counted down
    same(convert_ldm_vae_checkpoint(original, dict(big.config)), big.state_dict())


def test_open_clip_bigG_is_fused_and_transposed_as_diffusers_reads_it():
    """SDXL's second text encoder (tested on a small one of the same class): q/k/v fused, projection transposed."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loop.checkpoint import open_clip_to_original

    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=16, hidden_act="gelu", vocab_size=100, max_position_embeddings=77)  # fmt: skip
    model = CLIPTextModelWithProjection(cfg)
    sd = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    original = open_clip_to_original(sd, "conditioner.embedders.1.model.")
    p = "conditioner.embedders.1.model."
    assert original[f"{p}transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert original[f"{p}text_projection"].shape == (32, 16) and f"{p}positional_embedding" in original
    assert len(original) == 2 * 12 + 5
    back = convert_open_clip_checkpoint(model, original, prefix=p)
    strip = lambda d: {k.removeprefix("text_model."): v for k, v in d.items()}  # noqa: E731
    assert strip(back).keys() == strip(sd).keys()
    assert all(torch.equal(strip(back)[k], v) for k, v in strip(sd).items())


# -- a unit as one file, and a file as model.base -----------------------------------------------------------------
QUIET = dict(log=lambda m: None)
TRAIN = [
    "generate.steps=4",
    "generate.images_per_prompt=2",
    "train.steps=6",
    "train.batch_size=2",
    "train.lr=1e-2",
    "train.checkpoint_every=0",
    "train.objective=supervised",
    "train.text_encoder_lora=true",  # both kinds of LoRA are merged into the file
]


def _select(ws, cfg, store, unit: int, n: int = 4) -> None:
    """Generate n images with unit `unit` and write them, all UR, as unit `unit`+1's selection."""
    from loop.generate import generate_ring

    generate_ring(ws, store, cfg, unit=unit, count=n, **QUIET)
    rows = store.db.execute("SELECT * FROM images WHERE unit = ? ORDER BY id", (unit,)).fetchall()
    items = [{"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"], "tier": "UR"}
             for r in rows]  # fmt: skip
    sel = ws.checkpoint(unit + 1) / "selection.json"
    sel.parent.mkdir(parents=True, exist_ok=True)
    sel.write_text(json.dumps({"images": items}))


def _pixels(ws, store, unit: int) -> dict:
    """{(prompt, seed): pixels} of a unit's generated images."""
    rows = store.db.execute("SELECT * FROM images WHERE unit = ?", (unit,)).fetchall()
    return {(r["prompt"], r["seed"]): np.asarray(Image.open(ws.root / r["path"]).convert("RGB"), dtype=np.int16)
            for r in rows}  # fmt: skip


@pytest.mark.slow
def test_an_exported_unit_as_model_base_draws_the_units_images(ws, tmp_path):
    """Train a unit (UNet and text-encoder LoRA), `loop export-model` it, and give the file as model.base of a new
    workspace: the same prompts and seeds give the unit's images (within 4/255), offline; training works on it."""
    from loop.cli import entry
    from loop.generate import generate
    from loop.models import load_base, load_unit
    from loop.train import train_unit
    from loop.workspace import Workspace

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cfg = load_config(ws.root, TRAIN)
    with ws.store() as store:
        store.ensure_base_unit(cfg.model.base)
        _select(ws, cfg, store, unit=0)
        train_unit(ws, store, cfg, parent=0, **QUIET)
        generate(ws, store, cfg, unit=1, **QUIET)  # one pass of the prompt file: 2 prompts x 2 seeds
        unit_images = _pixels(ws, store, 1)
    assert len(unit_images) == 4
    changed = np.abs(_render(load_unit(cfg.model, ws.checkpoint(1), 1)) - _render(load_base(cfg.model))).max()
    assert changed * 255 > 8, "the unit should change the images"

    (tmp_path / "models").mkdir()
    out = tmp_path / "models" / "my model.safetensors"
    assert entry(["export-model", "--unit", "1", "--out", str(out), "-w", str(ws.root)]) == 0
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys) and all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert not any("lora" in k for k in keys)
    assert meta["loop.unit"] == "1" and meta["loop.base"] == "embedded"
    assert "model_index.json" in json.loads(meta["loop.diffusers"])
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left beside it

    other = Workspace.init(tmp_path / "other")
    other.prompts_path.write_text(ws.prompts_path.read_text(encoding="utf-8"), encoding="utf-8")
    (other.root / "configs" / "loop.yaml").write_text(f"model:\n  base: {json.dumps(str(out))}\n", encoding="utf-8")
    cfg2 = load_config(other.root, TRAIN)
    assert entry(["generate", "-w", str(other.root), *TRAIN]) == 0  # the same pass, with unit 0 = the file
    with other.store() as store:
        from_file = _pixels(other, store, 0)
    assert from_file.keys() == unit_images.keys()
    worst = max(np.abs(from_file[k] - unit_images[k]).max() for k in unit_images)
    print(f"exported unit vs unit: max difference {worst}/255")
    assert worst <= 4, f"the file draws up to {worst}/255 away from the unit"

    # and a unit trains on the file base (latent and text caches keyed by it)
    with other.store() as store:
        _select(other, cfg2, store, unit=0)
        manifest = train_unit(other, store, cfg2, parent=0, **QUIET)
    assert manifest["base_model"] == str(out) and (other.checkpoint(1) / "pytorch_lora_weights.safetensors").exists()
    assert entry(["generate", "--count", "2", "--unit", "1", "-w", str(other.root), *TRAIN]) == 0


def test_a_file_without_configs_says_what_to_do_in_one_line_and_model_config_fixes_it(tmp_path, monkeypatch):
    """A Civitai-style file (no configs in it) offline with nothing in the hub cache: one line naming model.config;
    with model.config a diffusers folder of the same architecture, diffusers and loop load it."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants

    from loop.checkpoint import pipeline_to_original
    from loop.config import ModelConfig
    from loop.models import check_base, load_base

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    base = load_base(ModelConfig())
    plain = tmp_path / "civitai.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_original(base).items()}, str(plain))  # no metadata
    with pytest.raises(LoopError) as e:
        check_base(str(plain))
    assert "\n" not in str(e.value) and "model.config" in str(e.value), str(e.value)
    with pytest.raises(LoopError, match="model.config"):
        load_base(ModelConfig(base=str(plain)))

    check_base(str(plain), str(EMBEDDED))
    expected = _render(base)
    np.testing.assert_allclose(_render(load_base(ModelConfig(base=str(plain), config=str(EMBEDDED)))), expected,
                               atol=1e-5)  # fmt: skip
    plain_diffusers = StableDiffusionPipeline.from_single_file(
        str(plain), config=str(EMBEDDED), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    plain_diffusers.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_render(plain_diffusers), expected, atol=1e-5)


def test_a_pickled_checkpoint_is_refused_with_the_reason(ws, tmp_path, capsys):
    from loop.cli import entry
    from loop.models import check_base

    ckpt = tmp_path / "anything-v3.ckpt"
    ckpt.write_bytes(b"not loaded, never unpickled")
    with pytest.raises(LoopError, match="pickled checkpoint, and loading one runs whatever code it holds"):
        check_base(str(ckpt))
    assert entry(["generate", "--count", "1", "-w", str(ws.root), f"model.base={ckpt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "convert it to .safetensors" in err
    with ws.store() as store:
        assert not store.units(), "a refused base is recorded nowhere"


def test_export_model_errors_are_one_line(ws, tmp_path, capsys):
    from loop.cli import entry

    out = tmp_path / "m.safetensors"
    assert entry(["export-model", "--unit", "3", "--out", str(out), "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unit 3 does not exist") and "\n" not in err, err
    assert not out.exists()

    # a Custom Diffusion unit with a new word: the file's vocabulary cannot hold it
    folder = ws.checkpoint(1)
    folder.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(folder / "pytorch_lora_weights.safetensors"))
    save_file({"<new1>": torch.zeros(1, 64)}, str(folder / "learned_embeds.safetensors"))
    assert entry(["export-model", "--unit", "1", "--out", str(out), "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "modifier token" in err and "export-lora" in err and "\n" not in err, err
    assert entry(["export-model", "--unit", "0", "--out", str(tmp_path / "m.ckpt"), "-w", str(ws.root)]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_an_sdxl_base_goes_to_one_file_with_both_text_encoders_and_back(ws, tmp_path):
    """embedded-xl (random weights, SDXL-shaped) as one file: CLIP-L under conditioner.embedders.0, OpenCLIP-bigG
    under conditioner.embedders.1 (fused q/k/v); loaded back as model.base it draws the same image."""
    from loop.config import ModelConfig
    from loop.interop import export_model
    from loop.models import load_base

    cfg = load_config(ws.root, ["model.base=embedded-xl"])
    out = tmp_path / "xl.safetensors"
    with ws.store() as store:
        export_model(ws, store, cfg, 0, out, "float32", **QUIET)
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the pooled text + size embedding
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    base, from_file = load_base(ModelConfig(base="embedded-xl")), load_base(ModelConfig(base=str(out)))
    assert type(from_file).__name__ == "StableDiffusionXLPipeline"
    np.testing.assert_allclose(_render(from_file, steps=2), _render(base, steps=2), atol=1e-4)
