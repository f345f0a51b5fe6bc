"""The scripted rater, for demos and tests only: a fixed taste on image colours, with optional noise.

    loop rate --auto [rate.preference=warm rate.noise=10]
    loop run --round --auto-rate

It scores each unrated image (warm: mean red minus mean blue, on 0..255 pixels), adds Gaussian noise seeded
by the image's hash (the same image always gets the same noise), and maps the score to a tier with fixed
cut-offs. Fixed cut-offs, not quantiles, so a unit that pleases the rater more really earns more UR.
"""

from __future__ import annotations

import random

from loop.config import TIERS, RateConfig
from loop.images import load_rgb, preference_score
from loop.store import Store
from loop.workspace import Workspace


def score(rgb, rc: RateConfig, sha256: str) -> float:
    s = preference_score(rgb, rc.preference)
    if rc.noise > 0:
        s += random.Random(int(sha256[:16], 16)).gauss(0.0, rc.noise)
    return s


def tier_for(s: float, cutoffs: list[float]) -> str:
    for tier, low in zip(TIERS, cutoffs):
        if s >= low:
            return tier
    return TIERS[-1]


def auto_rate(ws: Workspace, store: Store, rc: RateConfig, round: int) -> dict:
    """Rate every unrated image of the round; returns the tier counts of what it rated."""
    todo = [r for r in store.images(round=round) if r["tier"] is None]
    items = []
    for row in todo:
        s = score(load_rgb(ws.root / row["path"]), rc, row["sha256"])
        items.append((row["id"], tier_for(s, list(rc.cutoffs))))
    store.rate_many(items, rater=rc.rater)
    # UR images are collected into golden/, as the page does (the original stays in generations/)
    from loop.rate.handlers import sync_golden

    for image_id, _ in items:
        sync_golden(ws, store, image_id)
    counts = {t: 0 for t in TIERS}
    for _, t in items:
        counts[t] += 1
    return {"rated": len(items), **counts}
