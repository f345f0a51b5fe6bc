"""Image features for comparing what units draw: `eval.features`.

    loop compare            (per-prompt precision, recall, density, coverage)
    the promotion gate      (coverage of a unit's selection on held-out probes)

"cheap" is loop.metrics.features (colour histogram + 8x8 thumbnail): no model, right for the embedded tiny model
and for tests. A CLIP or DINOv2 vision model (a local folder or hub id) is the choice for real models: it is loaded
once per process, and its embeddings are cached by image sha256 in cache/features/<model>/<sha256>.npy.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from loop.errors import LoopError
from loop.metrics import features as cheap_features
from loop.metrics import prdc

MODEL_BATCH = 32  # images per forward pass of a vision model
_MODELS: dict[str, tuple] = {}  # eval.features -> (model, image processor, device): loaded once per process


def image_features(ws, ec, images: list, keys: list[str | None] | None = None) -> np.ndarray:
    """One row per image (HxWx3 uint8 arrays, PIL images, or paths of image files, read only when needed), by
    `ec.features` (EvalConfig). `keys` (sha256 of each image's file, where there is one) let a model's embeddings
    be cached: an image whose key has an embedding in the cache is not read, nor passed through the model."""
    if ec.features == "cheap":
        if not images:
            return np.zeros((0, 256), dtype=np.float32)
        return np.stack([cheap_features(_rgb(im)) for im in images])
    return model_features(ws, ec.features, images, keys)


def _rgb(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from loop.images import load_rgb

        return load_rgb(Path(image))
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


# -- a vision model's embeddings ---------------------------------------------------------------------------
def model_slug(name: str) -> str:
    """The cache folder of a model: a hub id as the hub cache spells it (openai--clip-vit-base-patch32), a local
    folder by its name and a hash of its full path (two folders called `clip` don't share embeddings)."""
    p = Path(name).expanduser()
    if p.is_dir():
        full = str(p.resolve())
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', p.resolve().name)}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip().replace("/", "--"))


def load_vision_model(name: str) -> tuple:
    """(model, image processor, device) for eval.features=`name`, a local folder or a hub id (from the hub cache
    when HF_HUB_OFFLINE=1), loaded once per process. A CLIP checkpoint gives its projected image embedding where it
    has the projection (CLIPModel, CLIPVisionModelWithProjection), else its pooled output; any other (DINOv2) goes
    through AutoModel. LoopError when it cannot be loaded."""
    if name in _MODELS:
        return _MODELS[name]
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel, CLIPVisionModelWithProjection

    p = Path(name).expanduser()
    src = str(p) if p.is_dir() else name.strip()
    parts = src.split("/")
    if not p.is_dir() and (p.is_absolute() or src.startswith((".", "~")) or len(parts) > 2 or not all(parts)):
        raise LoopError(f"eval.features={name!r}: no such folder; use eval.features=cheap, or a local folder with a "
                        "CLIP or DINOv2 model")  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(src)
        if config.model_type in ("clip", "clip_vision_model"):
            projected = {"CLIPModel", "CLIPVisionModelWithProjection"} & set(config.architectures or [])
            model = (CLIPVisionModelWithProjection if projected else CLIPVisionModel).from_pretrained(src)
        else:
            model = AutoModel.from_pretrained(src)
        processor = AutoImageProcessor.from_pretrained(src)
    except (OSError, ValueError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LoopError(
            f"eval.features={name!r} could not be loaded as a vision model ({why}); use eval.features=cheap, or a "
            "local folder with a CLIP or DINOv2 model (config.json, weights and preprocessor_config.json)"
        ) from e
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _MODELS[name] = (model.eval().to(device), processor, device)
    return _MODELS[name]


def embed(model, processor, device, images: list[np.ndarray]) -> np.ndarray:
    """L2-normalised image embeddings, float32: the projected embedding (image_embeds) where the model has one,
    else the pooled output, else the first (CLS) token of the last hidden state."""
    import torch

    rows = []
    for i in range(0, len(images), MODEL_BATCH):
        batch = processor(images=images[i : i + MODEL_BATCH], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model(pixel_values=batch.to(device=device, dtype=model.dtype))
        x = getattr(out, "image_embeds", None)
        if x is None:
            x = getattr(out, "pooler_output", None)
        if x is None:
            x = out.last_hidden_state[:, 0]
        rows.append(torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def model_features(ws, name: str, images: list, keys: list[str | None] | None = None) -> np.ndarray:
    """image_features for a vision model: cached embeddings where `keys` name one, the model for the rest (whose
    embeddings are then cached)."""
    from loop.workspace import atomic_write

    keys = list(keys) if keys is not None else [None] * len(images)
    if len(keys) != len(images):
        raise ValueError(f"one key per image: {len(keys)} keys for {len(images)} images")
    folder = ws.cache("features", model_slug(name))
    rows: list[np.ndarray | None] = [None] * len(images)
    for i, key in enumerate(keys):
        path = folder / f"{key}.npy" if key else None
        if path is not None and path.is_file():
            try:
                rows[i] = np.load(path)
            except (OSError, ValueError):  # a damaged cache file is made again
                rows[i] = None
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        model, processor, device = load_vision_model(name)
        got = embed(model, processor, device, [_rgb(images[i]) for i in todo])
        for i, row in zip(todo, got):
            rows[i] = row
            if keys[i]:
                buf = io.BytesIO()
                np.save(buf, row)
                atomic_write(folder / f"{keys[i]}.npy", buf.getvalue())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


def per_prompt_prdc(real: dict[str, np.ndarray], fake: dict[str, np.ndarray], k: int) -> dict[str, dict]:
    """prdc of each prompt's fake rows against the same prompt's real rows, for the prompts both sides have
    (and where loop.metrics.prdc gives a figure: at least 3 rows each)."""
    out = {}
    for p in real:
        if p in fake:
            r = prdc(real[p], fake[p], k)
            if r is not None:
                out[p] = r
    return out


def mean_of(per_prompt: dict[str, dict], key: str) -> float | None:
    vals = [d[key] for d in per_prompt.values() if d is not None and d.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def group_rows(prompts: list[str], feats: np.ndarray) -> dict[str, np.ndarray]:
    """Rows grouped by their prompt, in order."""
    idx = defaultdict(list)
    for i, p in enumerate(prompts):
        idx[p].append(i)
    return {p: feats[ix] for p, ix in idx.items()}
