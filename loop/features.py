"""Image features for comparing what units draw: `eval.features`.

    loop compare            (per-prompt precision, recall, density, coverage)
    the promotion gate      (coverage of a unit's selection on held-out probes)

"cheap" is loop.metrics.features (colour histogram + 8x8 thumbnail): no model, right for the embedded tiny model
and for tests. A CLIP or DINOv2 vision model (a local folder or hub id) is the choice for real models.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from loop.metrics import features as cheap_features
from loop.metrics import prdc


def image_features(ws, ec, images: list, keys: list[str] | None = None) -> np.ndarray:
    """One row per image (HxWx3 uint8 arrays or PIL images), by `ec.features` (EvalConfig). `keys` (sha256 of
    each image's file, where there is one) let a model's embeddings be cached."""
    arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    if ec.features == "cheap":
        if not arrays:
            return np.zeros((0, 256), dtype=np.float32)
        return np.stack([cheap_features(a) for a in arrays])
    raise NotImplementedError(f"eval.features={ec.features!r}")


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
