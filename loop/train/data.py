"""A unit's training data: images read square, their latents and captions' embeddings (cached), and the class
images of prior preservation.

    loop train / loop run --round     (encodes only the images the cache lacks)

Cache: latents keyed by image hash, VAE identity and resolution; text embeddings keyed by caption and
text-encoder identity (when the text encoder is frozen), one file per encoder (SDXL: each of its two encoders'
penultimate hidden states, the second's pooled projection beside them; loop.families). Non-square images are
resized on their shorter side and centre-cropped (documented crop policy).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from loop import families
from loop.config import LoopConfig
from loop.workspace import Workspace, atomic_write, sha256_file


def _identity(model, base: str) -> str:
    """A short fingerprint of a frozen encoder: where it came from, its config, and a strided sample of every weight
    tensor (a slice of the first alone missed a VAE that differs after its first layer: stale latents)."""
    h = hashlib.sha256(base.encode())
    h.update(
        json.dumps(
            dict(model.config) if hasattr(model.config, "keys") else model.config.to_dict(),
            sort_keys=True,
            default=str,
        ).encode()
    )
    for p in model.parameters():
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def drawn_by(pipe, cfg: LoopConfig) -> str:
    """The cache key of pictures draw_base makes: the base's identity and the settings it draws with (steps and
    guidance), so that a workspace whose generate.steps or generate.cfg changed draws them again instead of
    learning from pictures drawn another way."""
    how = hashlib.sha256(json.dumps([cfg.generate.steps, cfg.generate.cfg]).encode()).hexdigest()[:6]
    return f"{_identity(pipe.unet, cfg.model.base)}-{how}"


def _square_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """The centre crop of an image of w x h: (resized width, resized height, left, top)."""
    s = size / min(w, h)
    rw, rh = max(size, round(w * s)), max(size, round(h * s))
    return rw, rh, (rw - size) // 2, (rh - size) // 2


def crop_geometry(path: Path, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) of the file, (top, left) of load_square's crop): what SDXL's size and crop ids say about
    a training image (loop.families.size_ids). Reads the header only."""
    with Image.open(path) as im:
        w, h = im.size
    _, _, left, top = _square_box(w, h, size)
    return (h, w), (top, left)


def load_square(path: Path, size: int) -> torch.Tensor:
    """RGB in [-1, 1], CHW: shorter side resized to `size`, then centre-cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        rw, rh, left, top = _square_box(*im.size, size)
        im = im.resize((rw, rh), Image.BICUBIC)
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_latents(ws: Workspace, pipe, items: list[dict], size: int, base: str, log=print):
    """Latents for every readable item, computing only what the cache lacks; returns (latents, kept, stats)."""
    vae_id = _identity(pipe.vae, base)
    lat_dir = ws.cache("latents")
    latents, kept, hits, misses = [], [], 0, 0
    for it in items:
        lat_path = lat_dir / f"{it['sha256']}-{vae_id}-{size}.safetensors"
        if lat_path.exists():
            lat = load_file(lat_path)["latent"]
            hits += 1
        else:
            try:
                x = load_square(ws.root / it["path"], size).unsqueeze(0).to(pipe.device, pipe.vae.dtype)
            except (OSError, ValueError) as e:
                log(f"warning: {it['path']} could not be read ({e}); left out of training")
                continue
            lat = (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor)[0].float().cpu()
            atomic_write(lat_path, _st_bytes({"latent": lat.contiguous()}))
            misses += 1
        latents.append(lat)
        kept.append(it)
    return latents, kept, {"cache_hits": hits, "cache_misses": misses}


@torch.no_grad()
def encode_captions(ws: Workspace, pipe, captions: list[str], base: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frozen text encoders' conditioning, one per caption: hidden states (captions, length, width) and, for SDXL,
    the pooled embedding (captions, dim); each distinct caption read from the cache or encoded once, per encoder.
    Where the family guides against zeros (loop.families.zero_empty), the empty caption is zeros."""
    family, pairs = families.family_of(pipe), families.text_encoders(pipe)
    ids = [_identity(enc, base if tag == "last" else f"{base}|{tag}")
           for (_, enc), tag in zip(pairs, families.encoder_tags(pipe))]  # fmt: skip
    txt_dir = ws.cache("text")
    seen: dict[str, tuple] = {}
    hidden, pooled = [], []
    for cap in captions:
        if cap not in seen:
            key = hashlib.sha256(cap.encode()).hexdigest()[:24]
            parts = []
            for i, ((tok, enc), enc_id) in enumerate(zip(pairs, ids)):
                path = txt_dir / f"{key}-{enc_id}.safetensors"
                if path.exists():
                    parts.append(load_file(path))
                    continue
                h, p = families.encoder_output(family, i, len(pairs), enc, _token_ids(tok, [cap]).to(pipe.device))
                part = {"embedding": h[0].float().cpu().contiguous()}
                if p is not None:
                    part["pooled"] = p[0].float().cpu().contiguous()
                atomic_write(path, _st_bytes(part))
                parts.append(part)
            h = torch.cat([part["embedding"] for part in parts], dim=-1)
            p = parts[-1].get("pooled")
            if cap == "" and families.zero_empty(pipe):
                h, p = torch.zeros_like(h), None if p is None else torch.zeros_like(p)
            seen[cap] = (h, p)
        hidden.append(seen[cap][0])
        pooled.append(seen[cap][1])
    return torch.stack(hidden), (None if pooled[0] is None else torch.stack(pooled))


def encode_texts(ws: Workspace, pipe, captions: list[str], base: str) -> torch.Tensor:
    """Frozen-text-encoder embeddings (hidden states), one per caption (see encode_captions)."""
    return encode_captions(ws, pipe, captions, base)[0]


def _st_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


@dataclass
class TrainData:
    """What one step samples from: cached latents, and either cached text embeddings or token ids (when the
    text encoder learns). Items with prior=True are class images for prior preservation."""

    latents: torch.Tensor
    embeds: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    prior: torch.Tensor | None = None  # bool per item
    weights: torch.Tensor | None = None  # sampling weight per item (selection.json's "weight"); None: uniform
    empty: torch.Tensor | None = None  # the empty caption's embedding (or ids): what a dropped caption becomes
    empty_embed: torch.Tensor | None = None  # the empty caption through the frozen text encoder (base targets)
    pairs: torch.Tensor | None = None  # train.objective=dpo: (better, worse) rows into latents, one pair a row
    pair_weights: torch.Tensor | None = None  # dpo: sampling weight per pair (train.taste_pool_share); None: uniform
    twins: torch.Tensor | None = None  # dpo with train.invariance: (picture, twin) rows held equal, one a row
    # SDXL (loop.families): the pooled text embedding per item (frozen text encoders), the empty caption's, and
    # each image's six size/crop ids; None for SD
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


# -- class images (prior preservation) ---------------------------------------------------------------------
@torch.no_grad()
def draw_base(pipe, cfg: LoopConfig, todo: list[tuple[str, int, Path]], batch: int) -> None:
    """Each (prompt, seed, path) drawn by the pipe as given (the base, before any adapter) and written as a PNG,
    `batch` at a time: the class images of prior preservation and the taste pool (loop.train.pool)."""
    for at in range(0, len(todo), batch):
        chunk = todo[at : at + batch]
        images = pipe(
            [p for p, _, _ in chunk] if batch > 1 else chunk[0][0],
            num_inference_steps=cfg.generate.steps,
            guidance_scale=cfg.generate.cfg,
            generator=[torch.Generator(pipe.device).manual_seed(s) for _, s, _ in chunk]
            if batch > 1
            else torch.Generator(pipe.device).manual_seed(chunk[0][1]),
        ).images
        for (_, _, path), image in zip(chunk, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write(path, buf.getvalue())


@torch.no_grad()
def class_images(ws: Workspace, pipe, prompts: list[str], n: int, cfg: LoopConfig, log=print) -> list[dict]:
    """`n` base-model images per prompt, made once and cached under cache/class/ (keyed by drawn_by)."""
    folder = ws.cache("class", drawn_by(pipe, cfg))
    items, todo = [], []
    for prompt in sorted(set(prompts)):
        key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        for seed in range(n):
            path = folder / f"{key}-{seed}.png"
            (items if path.exists() else todo).append((prompt, seed, path))
    if todo:
        log(f"prior preservation: making {len(todo)} class image(s) with the base model (once; cached)")
    draw_base(pipe, cfg, todo, batch=1)
    out = []
    for prompt, _seed, path in sorted(items + todo, key=lambda x: (x[0], x[1])):
        sha = sha256_file(path)
        out.append({"id": None, "sha256": sha, "path": ws.rel(path), "caption": prompt, "prior": True})
    return out
