"""Loading a unit as a diffusers pipeline: the base model plus, for unit N > 0, its LoRA adapter.

`model.base` is "embedded" (the tiny model shipped in loop/tiny/model), "embedded-xl" (a tiny SDXL-shaped pipeline
built on first use by loop.tiny.build_xl), a local diffusers folder, or a hub id. SD 1.x/2.x and SDXL go through the
same functions; the pipeline class is the family's (loop.families).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

import torch

from loop.checkpoint import check_single_file, is_single_file, load_single_file
from loop.config import ModelConfig
from loop.errors import LoopError

EMBEDDED = Path(__file__).parent / "tiny" / "model"


def resolve_base(base: str) -> str:
    if base == "embedded-xl":
        from loop.tiny.build_xl import ensure

        return str(ensure())
    if base == "embedded":
        if not (EMBEDDED / "model_index.json").exists():
            raise LoopError(
                f"the embedded model is missing from {EMBEDDED}; rebuild it with `python -m loop.tiny.train`"
            )
        return str(EMBEDDED)
    return base


def check_base(base: str, config: str = "") -> None:
    """Fail at once, before anything is recorded, on a model.base that cannot be found (loading finds the rest);
    `config` is model.config (a single-file base's configs)."""
    if base in ("embedded", "embedded-xl"):
        resolve_base(base)
        return
    what = "give a diffusers folder (with model_index.json), a Hugging Face hub id, or `embedded`"
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise LoopError(f"model.base={base!r} is a folder without model_index.json; {what}")
        return
    if is_single_file(base):  # .safetensors (or a refused pickle): loop.checkpoint says what is wrong
        check_single_file(base, config)
        return
    if p.exists():
        raise LoopError(f"model.base={base!r} is a file, not a diffusers folder or a .safetensors checkpoint; {what}")
    parts = base.split("/")
    if p.is_absolute() or base.startswith((".", "~")) or "\\" in base or len(parts) > 2 or not all(parts):
        raise LoopError(f"model.base={base!r}: no such folder; {what}")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(base, "model_index.json"), str):
        raise LoopError(
            f"model.base={base!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE=1; "
            "download it once with network access, or give a local diffusers folder or `embedded`"
        )


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def set_scheduler(pipe, name: str) -> None:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    cls = {
        "dpm++": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "ddpm": DDPMScheduler,
    }[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_base(cfg: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    from loop import families

    base = resolve_base(cfg.base)
    device = device or pick_device(cfg)
    dtype = dtype or pick_dtype(cfg, device)
    if is_single_file(base):  # an AUTOMATIC1111 / ComfyUI checkpoint file
        pipe = load_single_file(base, cfg.config, dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    family = families.family_of_base(base)
    try:
        pipe = families.pipeline_class(family).from_pretrained(base, dtype=dtype, **families.load_options(family))
    except (OSError, ValueError) as e:
        where = "the folder" if Path(base).exists() else "neither a local folder nor a hub id available here"
        raise LoopError(
            f"model.base={cfg.base!r} could not be loaded ({where}: {str(e).splitlines()[0]}); "
            "give a diffusers folder (with model_index.json), a Hugging Face hub id, or `embedded`"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_unit(cfg: ModelConfig, checkpoints: Path | None, unit: int):
    """Unit 0 is the base model; unit N > 0 is the base with checkpoints/unit_NNN's LoRA loaded."""
    pipe = load_base(cfg)
    if unit > 0:
        folder = Path(checkpoints)
        if not (folder / "pytorch_lora_weights.safetensors").exists():
            raise LoopError(f"unit {unit} has no weights at {folder}; train it with `loop run --round {unit - 1}`")
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity(dlog.CRITICAL)  # diffusers logs the whole error before raising it; we say it in one line
        from safetensors import SafetensorError

        weights = folder / "pytorch_lora_weights.safetensors"
        try:
            with peft_named_copy(weights) as where:
                pipe.load_lora_weights(str(where.parent), weight_name=where.name)
        except (OSError, SafetensorError) as e:  # diffusers' "Unable to load weights": a damaged or cut-off file
            why = str(e).splitlines()[0].strip() if str(e).strip() else type(e).__name__
            raise LoopError(f"{weights} is not a readable safetensors file ({why[:200]}); retrain unit {unit}") from e
        except (ValueError, RuntimeError, KeyError) as e:
            raise LoopError(
                f"unit {unit}'s adapter at {folder} does not fit model.base={cfg.base!r} ({_first_problem(e)}); "
                f"it was trained on another base model: set model.base to that model, or retrain unit {unit}"
            ) from e
        finally:
            dlog.set_verbosity(level)
        token = unit_trigger(folder)
        if token:  # Custom Diffusion's modifier token: its learned embedding row (one per text encoder)
            from loop.families import load_embedding

            load_embedding(pipe, folder / "learned_embeds.safetensors", token)
    return pipe


# diffusers' names for a LoRA's down/up weights -> PEFT's. Units saved before 2026-12 went through diffusers'
# convert_state_dict_to_diffusers, which renames only attention projections (to_q/k/v/out.0, q/k/v/out_proj): a unit
# whose target_modules had anything else (proj_in, ff.net.0.proj, conv1, ...) got a file with both namings, and
# diffusers' loader, which decides the naming from the first key alone, then skipped the renamed attention layers
# with nothing but a warning. Units are saved in PEFT's naming now; older files are read through this.
DIFFUSERS_LORA_NAMES = (
    (".lora.down.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_A.weight"),
    (".lora_linear_layer.up.weight", ".lora_B.weight"),
)


def mixed_lora_names(keys) -> bool:
    """True if a LoRA file names some modules the PEFT way (lora_A/lora_B) and others the diffusers way."""
    keys = list(keys)
    peft = any(".lora_A." in k or ".lora_B." in k for k in keys)
    return peft and any(k.endswith(old) for k in keys for old, _ in DIFFUSERS_LORA_NAMES)


def peft_names(tensors: dict) -> dict:
    """The same tensors, every LoRA weight named the PEFT way (lora_A = down, lora_B = up)."""
    out = {}
    for key, value in tensors.items():
        for old, new in DIFFUSERS_LORA_NAMES:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


@contextlib.contextmanager
def peft_named_copy(weights: Path):
    """`weights` itself, or, for a file with both namings (see DIFFUSERS_LORA_NAMES), a copy named the PEFT way
    (its metadata, rank and alpha, kept) in a temporary folder that lives while the block runs."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    if not mixed_lora_names(keys):
        yield Path(weights)
        return
    with tempfile.TemporaryDirectory(prefix="loop-lora-") as tmp:
        fixed = Path(tmp) / Path(weights).name
        save_file(peft_names(load_file(str(weights))), str(fixed), metadata=meta)
        yield fixed


def _first_problem(e: Exception) -> str:
    """The first useful line of a load error: torch's list of size mismatches starts with a header line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        shapes = re.findall(r"\[[^\]]*\]", ln)
        if ln.startswith("size mismatch for ") and len(shapes) == 2:
            return f"{ln.split()[3].rstrip(':')} is {shapes[0]} in the file, {shapes[1]} in the model"
    return (lines[0] if lines else type(e).__name__)[:200]


def unit_trigger(folder: Path | None) -> str:
    """The modifier token a unit was trained with ("" for none); the generator puts it before every prompt."""
    if folder is None or not (Path(folder) / "learned_embeds.safetensors").exists():
        return ""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / "learned_embeds.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
    except (OSError, SafetensorError) as e:
        raise LoopError(f"{path} is not a readable safetensors file ({e}); retrain the unit") from e
    from loop.families import embedding_token

    return embedding_token(keys, meta)
