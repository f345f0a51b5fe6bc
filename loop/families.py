"""Model families: Stable Diffusion 1.x/2.x ("sd") and SDXL ("sdxl"), told apart from the checkpoint itself.

    loop generate / vary / train / compare / export-lora     (every stage, with any model.base)

Everything else in loop is one path for both; the few things that differ live here, as functions the stages call:

- which diffusers pipeline classes load and render the model (txt2img, img2img), and their loading options;
- the text side: SD conditions on its one text encoder's last hidden states; SDXL on both encoders' penultimate
  hidden states side by side, plus the second encoder's pooled projection, plus six "micro-conditioning" ids
  (original size, crop top-left, target size: Podell et al. 2023, section 2.2), which go to the UNet as
  `added_cond_kwargs`. With `force_zeros_for_empty_prompt` (SDXL base) the unconditional branch of guidance is all
  zeros rather than the empty caption's encoding, so the empty caption trains as zeros too;
- the LoRA file: which text encoders it may hold (`text_encoder`, and SDXL's `text_encoder_2`), and how a
  modifier token's embedding is saved (SDXL: one row per encoder, as {"clip_l", "clip_g"} like AUTOMATIC1111's
  SDXL embeddings, the token in the file's metadata).

The LoRA target names are the same in both families (to_q/to_k/to_v/to_out.0 in the UNet; q/k/v/out_proj in each
CLIP text encoder), and both load adapters with `pipe.load_lora_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD, SDXL = "sd", "sdxl"
FAMILIES = (SD, SDXL)
SDXL_EMBED_KEYS = ("clip_l", "clip_g")  # a modifier token's rows in text_encoder and text_encoder_2


# -- which family -------------------------------------------------------------------------------------------------
def family_of_folder(folder: str | Path) -> str:
    """SDXL if the diffusers folder's model_index.json names an XL pipeline or a second text encoder, or its UNet
    takes the "text_time" added conditioning; SD otherwise (and for anything unreadable: loading says why)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        if "XL" in str(index.get("_class_name", "")) or (index.get("text_encoder_2") or [None])[0]:
            return SDXL
    except (OSError, ValueError, AttributeError):
        pass
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if unet.get("addition_embed_type") == "text_time":
            return SDXL
    except (OSError, ValueError, AttributeError):
        pass
    return SD


def family_of_base(base: str) -> str:
    """The family of a resolved model.base: a diffusers folder, a single-file checkpoint, or a hub id read from the
    Hugging Face cache (a hub id not in the cache is SD until it is downloaded; loading then fails or says why)."""
    if Path(base).is_dir():
        return family_of_folder(base)
    if Path(base).is_file():  # a single-file checkpoint: SDXL's has the second text encoder under embedders.1
        try:
            from safetensors import safe_open

            with safe_open(str(base), "pt") as f:
                return SDXL if any(k.startswith("conditioner.embedders.1.") for k in f.keys()) else SD
        except Exception:  # not a safetensors file: loading says why
            return SD
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(base, "model_index.json")
    except Exception:  # not a valid repo id: loading says why
        return SD
    return family_of_folder(Path(index).parent) if isinstance(index, str) else SD


def family_of(pipe) -> str:
    """The family of a loaded pipeline."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return SDXL if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time" else SD


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == SDXL else StableDiffusionPipeline


def img2img_class(family: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline if family == SDXL else StableDiffusionImg2ImgPipeline


def load_options(family: str) -> dict:
    """Extra `from_pretrained` arguments: no safety checker for SD; no invisible watermark for SDXL (it would
    change the pixels a unit's images are compared by)."""
    if family == SDXL:
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def img2img_from(pipe):
    """The img2img pipeline of the same family on the same (already loaded) components."""
    cls = img2img_class(family_of(pipe))
    if family_of(pipe) == SDXL:
        out = cls.from_pipe(pipe, requires_aesthetics_score=False, add_watermarker=False)
    else:
        out = cls.from_pipe(pipe)
    out.set_progress_bar_config(disable=True)
    return out


# -- the text side ------------------------------------------------------------------------------------------------
def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs, in the order their hidden states are joined."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if family_of(pipe) == SDXL:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def zero_empty(pipe) -> bool:
    """True where guidance's unconditional branch is zeros, not the empty caption (SDXL base's setting)."""
    return family_of(pipe) == SDXL and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))


def token_ids(pipe, captions: list[str]) -> torch.Tensor:
    """Token ids of each caption: (captions, max length) for SD's one text encoder, (captions, encoders, max
    length) for SDXL's two (each encoder has its own tokenizer)."""
    ids = [
        tok(
            captions, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        for tok, _ in text_encoders(pipe)
    ]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def encoder_output(family: str, index: int, count: int, encoder, ids: torch.Tensor):
    """One encoder's share of the conditioning: (hidden states, pooled or None). SD: the last hidden states. SDXL:
    the penultimate hidden states (as diffusers' and kohya's SDXL code read them), and from the last encoder its
    pooled projection too."""
    if family != SDXL:
        return encoder(ids)[0], None
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], (out[0] if index == count - 1 else None)


class PromptEncoder(torch.nn.Module):
    """A pipeline's text encoder(s) as one module that training can hand to accelerate and the fitting loop:
    token ids (batch, encoders, length) -> (hidden states (batch, length, width), pooled (batch, dim) or None).
    With `zeros_for` (the empty caption's ids, where the family guides against zeros) rows that are the empty
    caption come out as zeros, as the pipeline's unconditional branch does."""

    def __init__(self, family: str, encoders: list, zeros_for: torch.Tensor | None = None):
        super().__init__()
        self.family = family
        self.encoders = torch.nn.ModuleList(encoders)
        self.register_buffer("zeros_for", zeros_for, persistent=False)

    def forward(self, ids: torch.Tensor):
        hidden, pooled = [], None
        for i, enc in enumerate(self.encoders):
            h, p = encoder_output(self.family, i, len(self.encoders), enc, ids[:, i])
            hidden.append(h)
            pooled = p if p is not None else pooled
        hidden = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        if self.zeros_for is not None:
            empty = (ids == self.zeros_for.to(ids.device)).flatten(1).all(dim=1)
            if bool(empty.any()):
                keep = (~empty).to(hidden.dtype)
                hidden = hidden * keep.view(-1, 1, 1)
                pooled = None if pooled is None else pooled * keep.view(-1, 1)
        return hidden, pooled


def prompt_encoder(pipe) -> PromptEncoder:
    zeros_for = token_ids(pipe, [""])[0] if zero_empty(pipe) else None
    return PromptEncoder(family_of(pipe), [enc for _, enc in text_encoders(pipe)], zeros_for)


def learning_text_encoder(pipe):
    """What training hands the fitting loop when text encoders learn (a LoRA, a modifier token): SD's own text
    encoder (token ids (batch, length)), SDXL's two as one PromptEncoder (ids (batch, 2, length))."""
    return prompt_encoder(pipe) if family_of(pipe) == SDXL else pipe.text_encoder


def encode_ids(text_encoder, ids: torch.Tensor):
    """(hidden states, pooled or None) from a learning text encoder (see learning_text_encoder) and its ids."""
    if ids.dim() == 2:
        return text_encoder(ids)[0], None
    return text_encoder(ids)


def encoder_modules(text_encoder) -> list:
    """The CLIP text encoder(s) inside a learning text encoder, in pipeline order."""
    return list(text_encoder.encoders) if isinstance(text_encoder, PromptEncoder) else [text_encoder]


def embedding_tables(text_encoder) -> list[torch.Tensor]:
    """The token-embedding table of each encoder inside a learning text encoder."""
    return [enc.get_input_embeddings().weight for enc in encoder_modules(text_encoder)]


def encoder_tags(pipe) -> list[str]:
    """What each encoder's cached output is (part of the text cache's key: SD's te1 output is not SDXL's)."""
    if family_of(pipe) == SDXL:
        n = len(text_encoders(pipe))
        return [f"sdxl-penultimate{'-pooled' if i == n - 1 else ''}" for i in range(n)]
    return ["last"]


# -- the UNet's inputs --------------------------------------------------------------------------------------------
def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]):
    """SDXL's six size-and-crop ids: original (height, width), crop (top, left), target (height, width)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def size_ids(pipe, geometries: list[tuple], size: int) -> torch.Tensor | None:
    """SDXL: each training image's time ids, (images, 6), from its ((height, width), (crop top, crop left)) before
    and after the square crop to `size`; SD: None (it has no such conditioning)."""
    if family_of(pipe) != SDXL:
        return None
    return torch.stack([time_ids(original, crop, (size, size)) for original, crop in geometries])


def unet_inputs(hidden: torch.Tensor, pooled: torch.Tensor | None = None, times: torch.Tensor | None = None) -> dict:
    """The keyword arguments of a UNet call: the hidden states, and for SDXL the pooled embedding and time ids."""
    if pooled is None:
        return {"encoder_hidden_states": hidden}
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled.to(hidden.dtype), "time_ids": times.to(hidden.device)},
    }


# -- adapters -----------------------------------------------------------------------------------------------------
def lora_components(pipe) -> tuple[str, ...]:
    """The pipeline components a LoRA file of this family may hold."""
    return ("unet", "text_encoder", "text_encoder_2") if family_of(pipe) == SDXL else ("unet", "text_encoder")


def save_lora_weights(pipe, folder: Path, layers: dict, metadata: dict) -> None:
    """The family's `save_lora_weights`: layers and metadata per component ("unet", "text_encoder", ...)."""
    kwargs = {}
    for comp in lora_components(pipe):
        if comp in layers:
            kwargs[f"{comp}_lora_layers"] = layers[comp]
            kwargs[f"{comp}_lora_adapter_metadata"] = metadata[comp]
    pipeline_class(family_of(pipe)).save_lora_weights(folder, **kwargs)


def embedding_tensors(pipe, token: str, rows: list[torch.Tensor]) -> tuple[dict, dict | None]:
    """A modifier token's learned rows (one per encoder) as a safetensors dict and its metadata: SD {token: row}
    (diffusers' textual-inversion file), SDXL {"clip_l": row, "clip_g": row} with the token in the metadata."""
    if family_of(pipe) == SDXL:
        return dict(zip(SDXL_EMBED_KEYS, rows)), {"token": token}
    return {token: rows[0]}, None


def embedding_token(keys: list[str], metadata: dict | None) -> str:
    """The modifier token a learned_embeds file holds ("" for none)."""
    if sorted(keys) == sorted(SDXL_EMBED_KEYS):
        return (metadata or {}).get("token", "")
    return keys[0] if len(keys) == 1 else ""


def read_embedding(path: Path) -> tuple[str, list[torch.Tensor]]:
    """(token, one row per text encoder) of a learned_embeds file (SD's or SDXL's layout)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        token = embedding_token(keys, meta)
        names = list(SDXL_EMBED_KEYS) if sorted(keys) == sorted(SDXL_EMBED_KEYS) else keys[:1]
        return token, [f.get_tensor(k).reshape(-1) for k in names]


def load_embedding(pipe, path: Path, token: str) -> None:
    """Put a unit's modifier token into the pipeline's tokenizer(s) and text encoder(s)."""
    if family_of(pipe) != SDXL:
        pipe.load_textual_inversion(str(path.parent), weight_name=path.name, token=token)
        return
    from safetensors.torch import load_file

    saved = load_file(str(path))
    for key, (tok, enc) in zip(SDXL_EMBED_KEYS, text_encoders(pipe)):
        pipe.load_textual_inversion(saved[key], token=token, tokenizer=tok, text_encoder=enc)
