"""What learns: PEFT LoRA adapters on the UNet (and the text encoder), Custom Diffusion's modifier token, a parent
unit's adapter to start from, and the adapter file a unit leaves.

    loop train --unit N     (train.method, train.start)
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from loop import families
from loop.errors import LoopError
from loop.models import peft_named_copy
from loop.workspace import TMP_MARK, UMASK

WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"
CD_TARGETS = ["attn2.to_k", "attn2.to_v"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora(unet, tc, targets: list[str] | None = None):
    """Freeze the UNet and attach a PEFT LoRA adapter to `targets` (default tc.target_modules)."""
    from peft import LoraConfig

    targets = list(targets or tc.target_modules)
    unet.requires_grad_(False)
    lora = LoraConfig(r=tc.rank, lora_alpha=tc.alpha, init_lora_weights="gaussian", target_modules=targets,
                      lora_dropout=tc.lora_dropout)  # fmt: skip
    try:
        unet.add_adapter(lora)
    except ValueError as e:
        raise LoopError(f"train.target_modules={targets} matched nothing in the UNet: {e}") from e
    return unet


def add_text_lora(text_encoder, tc):
    from peft import LoraConfig

    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(
        LoraConfig(r=tc.rank, lora_alpha=tc.alpha, init_lora_weights="gaussian", target_modules=TE_TARGETS)
    )
    return text_encoder


def add_modifier_token(tokenizer, text_encoder, token: str, initializer: str) -> int:
    """Add `token` to the tokenizer; its embedding row starts as the initializer word's (mean over its pieces).
    Returns the new row's index."""
    if token in tokenizer.get_vocab():
        raise LoopError(f"train.modifier_token={token!r} is already a word of the tokenizer; pick a new one")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise LoopError(f"train.initializer_token={initializer!r} gives no tokens; give an ordinary word")
    tokenizer.add_tokens([token])
    new_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[new_id] = table[init_ids].mean(dim=0)
    return new_id


REFERENCE = "parent"  # train.dpo_reference=parent: the name of the parent's frozen copy beside "default"


def load_parent_adapter(pipe, folder: Path, tc, adapter: str = "default") -> None:
    """from_parent: copy unit N's adapter weights into the freshly attached adapter(s) of the same shape (UNet
    only for any adapter but "default")."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if not (folder / WEIGHTS).exists():
        raise LoopError(f"train.start=from_parent needs the parent's weights at {folder / WEIGHTS}")
    with peft_named_copy(folder / WEIGHTS) as where:  # a unit saved with both namings (see DIFFUSERS_LORA_NAMES)
        sd, _ = StableDiffusionPipeline.lora_state_dict(str(where.parent), weight_name=where.name)
    unet_sd = convert_unet_state_dict_to_peft({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    try:
        out = set_peft_model_state_dict(pipe.unet, unet_sd, adapter_name=adapter)
    except RuntimeError as e:  # shapes differ: another rank
        raise LoopError(
            f"the parent adapter at {folder} does not match this one ({str(e).splitlines()[1].strip()[:120]}): "
            "train.method, rank and target_modules must be the parent's for from_parent"
        ) from e
    missing = [k for k in getattr(out, "missing_keys", []) if "lora_" in k and f".{adapter}." in k]
    unexpected = list(getattr(out, "unexpected_keys", []))
    if missing or unexpected:
        raise LoopError(
            f"the parent adapter at {folder} does not match this one ({len(missing)} missing, {len(unexpected)} "
            "unexpected weights): train.method, rank and target_modules must be the parent's for from_parent"
        )
    for comp in ("text_encoder", "text_encoder_2") if adapter == "default" else ():  # (SDXL has two)
        te_sd = {k[len(comp) + 1 :]: v for k, v in sd.items() if k.startswith(f"{comp}.")}
        encoder = getattr(pipe, comp, None)
        if te_sd and getattr(encoder, "peft_config", None):
            set_peft_model_state_dict(encoder, convert_unet_state_dict_to_peft(te_sd), adapter_name="default")


def add_reference_adapter(pipe, folder: Path, tc) -> None:
    """train.dpo_reference=parent: a second, frozen LoRA on the UNet holding unit N's weights, which dpo's
    reference forward switches to (loop.train.fit.reference_forward); "default" stays the one that learns and is
    saved."""
    from peft import LoraConfig

    cfg = pipe.unet.peft_config["default"]
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        pipe.unet.add_adapter(
            LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=sorted(cfg.target_modules)),
            adapter_name=REFERENCE,
        )
    load_parent_adapter(pipe, folder, tc, adapter=REFERENCE)
    pipe.unet.set_adapter("default")  # peft: the learning adapter active and trainable, the parent's frozen


def _trainable(*modules) -> dict[str, torch.nn.Parameter]:
    """The parameters that learn, by "<module index>.<name>" (the key of a checkpoint's trainable.pt)."""
    return {
        f"{i}.{n}": p
        for i, m in enumerate(modules)
        if m is not None
        for n, p in m.named_parameters()
        if p.requires_grad
    }


def _attach(pipe, tc, cd: bool, token: str, te_lora: bool):
    """The method's adapters: returns (unet, learning text encoder or None, rows to keep, new token rows).

    Every text encoder of the family learns alike (SDXL: both): a LoRA on each, or the modifier token's row in
    each; the learning text encoder is loop.families.learning_text_encoder (SDXL's two as one module). The rows
    to keep and the new rows are one (original table, row) and one row per encoder."""
    keep_rows, text_encoder, new_rows = None, None, None
    pairs = families.text_encoders(pipe)
    if token:
        new_rows = [add_modifier_token(tok, enc, token, tc.initializer_token) for tok, enc in pairs]
        keep_rows = []
        for (_, enc), row in zip(pairs, new_rows):
            table = enc.get_input_embeddings().weight
            table.requires_grad_(True)
            keep_rows.append((table.detach().clone().cpu(), row))
        text_encoder = families.learning_text_encoder(pipe)
    if te_lora:
        for _, enc in pairs:
            add_text_lora(enc, tc)
        text_encoder = families.learning_text_encoder(pipe)
    unet = add_lora(pipe.unet, tc, CD_TARGETS if cd else None)
    return unet, text_encoder, keep_rows, new_rows


def save_lora(unet, folder: Path, text_encoder=None, text_encoder_2=None) -> Path:
    """Write the adapter(s) as folder/pytorch_lora_weights.safetensors (diffusers' file, `unet.` and
    `text_encoder.` prefixes, SDXL's `text_encoder_2.` too, rank and alpha in its metadata), atomically.

    The weights keep PEFT's names (lora_A/lora_B) for every module. diffusers' training scripts pass them through
    convert_state_dict_to_diffusers first, which renames only attention projections, so a LoRA on other modules
    too would get a file with two namings that diffusers' loader half skips (see loop.models.DIFFUSERS_LORA_NAMES).
    """
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".save{TMP_MARK}{os.getpid()}-{time.time_ns()}"
    parts = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    layers = {k: get_peft_model_state_dict(m) for k, m in parts.items() if m is not None}
    metadata = {k: m.peft_config["default"].to_dict() for k, m in parts.items() if m is not None}
    family = families.SDXL if text_encoder_2 is not None else families.SD  # (a UNet-only file is the same in both)
    families.pipeline_class(family).save_lora_weights(
        tmp,
        **{f"{k}_lora_layers": v for k, v in layers.items()},
        **{f"{k}_lora_adapter_metadata": v for k, v in metadata.items()},
    )
    os.chmod(tmp / WEIGHTS, 0o666 & ~UMASK)  # diffusers writes it 0600; every other file here is plain mode
    (tmp / WEIGHTS).replace(folder / WEIGHTS)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHTS
