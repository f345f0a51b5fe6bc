"""Selection: which rated images the next unit learns from.

    loop run --round            (the select phase)

- golden: every UR image from every round and every import. Nothing below UR ever enters.
- converge: every image at or above `select.min_tier`, from every round.

Both accumulate across rounds rather than replace, which keeps a self-trained model from collapsing.
The selection is written to checkpoints/unit_NNN/selection.json (ids, sha256, path, caption = prompt).
"""

from __future__ import annotations

import json

from loop.config import TIERS, SelectConfig
from loop.errors import LoopError
from loop.store import Store
from loop.workspace import Workspace, atomic_write


def eligible_tiers(sc: SelectConfig) -> tuple[str, ...]:
    if sc.strategy == "golden":
        return ("UR",)
    return TIERS[: TIERS.index(sc.min_tier) + 1]


def select(ws: Workspace, store: Store, sc: SelectConfig, round: int) -> list[dict]:
    """The training set for unit round+1, written to its selection.json; LoopError if it is empty."""
    tiers = eligible_tiers(sc)
    rows = [r for r in store.images() if r["tier"] in tiers]
    if not rows:
        counts = store.tier_counts(round=round)
        rated = sum(v for k, v in counts.items() if k)
        spread = ", ".join(f"{t} {counts.get(t, 0)}" for t in TIERS)
        raise LoopError(
            f"empty selection: strategy {sc.strategy} takes {'/'.join(tiers)} images and there are none. "
            f"Round {round} has {sum(counts.values())} images, {rated} rated ({spread}), "
            f"{counts.get(None, 0)} unrated. "
            f"Rate some images {tiers[-1]} or better (`loop rate`), or choose another strategy "
            f"(select.strategy=converge select.min_tier=SR), then run `loop run --round` again."
        )
    items = [
        {
            "id": r["id"],
            "sha256": r["sha256"],
            "path": r["path"],
            "caption": r["prompt"],
            "tier": r["tier"],
            "unit": r["unit"],
            "round": r["round"],
            "source": r["source"],
        }
        for r in rows
    ]
    out = ws.checkpoint(round + 1) / "selection.json"
    atomic_write(
        out,
        json.dumps(
            {"strategy": sc.strategy, "tiers": list(tiers), "round": round, "images": items},
            indent=2,
            ensure_ascii=False,
        ),
    )
    return items
