"""The embedded SDXL: a tiny StableDiffusionXLPipeline with random weights, for tests and plumbing (`model.base=
embedded-xl`). It proves that everything SDXL needs (two text encoders, the pooled embedding, the size and crop
conditioning) goes through loop's one path; it draws nothing meaningful, and the demo stays on the trained tiny SD.

    python -m loop.tiny.build_xl [FOLDER]     builds it (into the user cache folder when no FOLDER is given)

`ensure()` builds it on first use into `~/.cache/loop/embedded-xl-v{VERSION}` ($XDG_CACHE_HOME, or $LOOP_CACHE
when set), written to a temporary sibling and renamed into place. The weights come from numpy's legacy
RandomState (whose stream numpy keeps stable) in the parameters' name order, not from torch's or diffusers'
initialisers, so every build on every machine and library version is the same model and a unit trained on one
build renders the same on another. The folder loads with a plain `DiffusionPipeline.from_pretrained(folder)`:
fp32 weights and configs, and text-encoder keys that every allowed transformers version reads.

Shapes follow diffusers' own SDXL pipeline tests (get_dummy_components): a UNet with addition_embed_type
"text_time", cross-attention over both encoders' hidden states side by side (TE1_DIM + TE2_DIM), and an added
embedding of the second encoder's pooled projection plus six size/crop ids. The two encoders have different
widths so that mixing them up fails loudly.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

VERSION = 1  # bump when the architecture or the weights change: a new cache folder is built
IMAGE_SIZE = 32  # pixels; the VAE halves it once, so latents are 4 x 16 x 16
TE1_DIM, TE2_DIM, PROJ_DIM = 32, 48, 32
TIME_DIM = 8  # addition_time_embed_dim: each of the six size/crop ids becomes 8 numbers
SEED = 20240
ENV = "LOOP_CACHE"


def cache_root() -> Path:
    """Where loop keeps models it builds for itself: $LOOP_CACHE, else $XDG_CACHE_HOME/loop, else ~/.cache/loop."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loop"


def model_dir() -> Path:
    return cache_root() / f"embedded-xl-v{VERSION}"


def components(tokenizer=None) -> dict:
    """The pipeline's parts, weights filled deterministically (see `fill`)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loop.tiny.build import load_tokenizer

    tokenizer = tokenizer or load_tokenizer()

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=2,  # SDXL reads the penultimate layer: the first here
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=PROJ_DIM,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=TE1_DIM + TE2_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + PROJ_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.13025,  # SDXL's VAE
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    parts = dict(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text_config(TE1_DIM)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(TE2_DIM)),
        tokenizer=tokenizer,
        tokenizer_2=load_tokenizer(),
        scheduler=scheduler,
    )
    for i, name in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
        fill(parts[name], SEED + i)
    return parts


def fill(module, seed: int) -> None:
    """Every weight from numpy's RandomState(seed), in name order: uniform in +-1/sqrt(fan_in) (torch's own default
    range for linear and conv layers) for matrices, kernels and embedding tables; a bias like its layer's weight;
    constant vectors (norm scales and shifts) kept as their initialiser set them."""
    import numpy as np
    import torch

    rng = np.random.RandomState(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
            elif p.dim() == 1 and not bool((p == p.flatten()[0]).all()):
                weight = params.get(name[: -len("bias")] + "weight") if name.endswith("bias") else None
                fan_in = int(np.prod(weight.shape[1:])) if weight is not None and weight.dim() >= 2 else p.numel()
            else:
                continue
            bound = 1.0 / max(1, fan_in) ** 0.5
            p.copy_(torch.from_numpy(rng.uniform(-bound, bound, size=tuple(p.shape)).astype(np.float32)))


def assemble(parts: dict):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)


def build(folder: Path) -> Path:
    """Build the pipeline into `folder` (replaced if there), ready for `DiffusionPipeline.from_pretrained`."""
    import torch

    from loop.tiny.build import make_portable, write_tokenizer

    folder = Path(folder)
    pipe = assemble(components())
    pipe.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    # the project's own tokenizer files (what loop.tiny.build writes for the embedded model), for both encoders
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name, ignore_errors=True)
        write_tokenizer(folder / name)
    make_portable(folder)  # text-encoder keys under `text_model.`, fp32 in the configs
    (folder / "README.md").write_text(
        f"The embedded SDXL of loop (model.base=embedded-xl), version {VERSION}: a tiny SDXL-shaped pipeline with\n"
        "random weights, built by `python -m loop.tiny.build_xl`. It proves plumbing; it draws nothing meaningful.\n"
    )
    return folder


def ensure() -> Path:
    """The embedded SDXL's folder, built on first use (atomically: a temporary sibling renamed into place)."""
    from loop.errors import LoopError

    final = model_dir()
    if (final / "model_index.json").is_file():
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: use theirs
            if not (final / "model_index.json").is_file():
                raise
    except OSError as e:
        raise LoopError(
            f"could not build the embedded SDXL in {final} ({e.strerror or e}); set {ENV} to a writable folder"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    where = build(Path(sys.argv[1])) if len(sys.argv) > 1 else ensure()
    print("built", where)
