"""The scripted rater, for demos and tests only: a fixed taste on image colours, with optional noise.

    loop rate --auto [rate.preference=warm rate.noise=10]
    loop run --round --auto-rate

It scores each unrated image (warm: mean red minus mean blue, on 0..255 pixels), adds Gaussian noise seeded
by a hash of its pixels (the same picture always gets the same noise, whatever its file's metadata says: two
strategies that draw the same picture get the same rating), and maps the score to a tier with fixed cut-offs.
Fixed cut-offs, not quantiles, so a unit that pleases the rater more really earns more UR.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

from loop.config import TIERS, RateConfig
from loop.images import load_rgb, preference_score
from loop.store import Store
from loop.workspace import Workspace, sync_golden


def pixel_seed(rgb) -> int:
    """A seed from the picture alone (its size and RGB bytes), not from the file, whose PNG metadata names the
    unit, round and strategy."""
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    return int(hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16], 16)


def score(rgb, rc: RateConfig) -> float:
    s = preference_score(rgb, rc.preference)
    if rc.noise > 0:
        s += random.Random(pixel_seed(rgb)).gauss(0.0, rc.noise)
    return s


def tier_for(s: float, cutoffs: list[float]) -> str:
    for tier, low in zip(TIERS, cutoffs):
        if s >= low:
            return tier
    return TIERS[-1]


def auto_rate(ws: Workspace, store: Store, rc: RateConfig, round: int, log=print) -> dict:
    """Rate every unrated image of the round; returns the tier counts of what it rated.

    An image whose file is missing or cannot be decoded (cut off, damaged) is left unrated, with one line
    saying so; the others are still rated."""
    todo = [r for r in store.images(round=round) if r["tier"] is None]
    items, skipped = [], []
    for row in todo:
        try:
            rgb = load_rgb(ws.root / row["path"])
        except Exception as e:  # PIL raises many kinds (FileNotFoundError, OSError "truncated", SyntaxError...)
            why = "is missing" if isinstance(e, FileNotFoundError) else f"could not be read ({_first_line(e)})"
            log(f"warning: image {row['id']} ({row['path']}) {why}; left unrated")
            skipped.append(row["path"])
            continue
        items.append((row["id"], tier_for(score(rgb, rc), list(rc.cutoffs))))
    store.rate_many(items, rater=rc.rater)
    # UR images are collected into golden/, as the page does (the original stays in generations/)
    for image_id, _ in items:
        sync_golden(ws, store, image_id)
    counts = {t: 0 for t in TIERS}
    for _, t in items:
        counts[t] += 1
    return {"rated": len(items), **counts, "skipped": len(skipped)}


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
