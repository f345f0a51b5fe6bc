"""`loop status`: units and their lineage, images and tiers per unit, and what the current round waits for."""

from __future__ import annotations

import json
import time
from collections import Counter

from loop.config import TIERS
from loop.store import PHASES, Store
from loop.workspace import Workspace, lock_holder


def _row(counts: Counter, **head) -> dict:
    """A table row: `head` (unit, parent, method, strategy), then images, rated, each tier and the UR rate."""
    total = sum(counts.values())
    rated = total - counts.get(None, 0)
    return {
        **head,
        "images": total,
        "rated": rated,
        **{t: counts.get(t, 0) for t in TIERS},
        "ur_rate": counts.get("UR", 0) / rated if rated else None,
    }


def unit_rows(store: Store) -> list[dict]:
    return [
        _row(
            store.tier_counts(unit=u["unit"]),
            unit=u["unit"],
            parent=u["parent"],
            method=u["method"] or "base",
            strategy=u["strategy"] or "-",
        )
        for u in store.units()
    ]


def imported_row(store: Store) -> dict | None:
    """`loop import`'s images: no unit made them, but a selection takes them like any other (no UR rate: that
    measures a unit)."""
    sql = "SELECT t.tier FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id WHERE i.unit IS NULL"
    counts = Counter(r[0] for r in store.db.execute(sql))
    if not counts:
        return None
    return {**_row(counts, unit="-", parent=None, method="imported", strategy=""), "ur_rate": None}


def next_step(store: Store, ws: Workspace | None = None) -> str:
    n = store.current_unit()
    phases = store.phases(n)
    done = [p for p in PHASES if p in phases and phases[p]["status"] == "done"]
    if len(done) == len(PHASES):
        return f"round {n} is closed; `loop run --round` starts round {n + 1}"
    todo = next(p for p in PHASES if p not in done)
    if todo == "generate":
        made = len(store.images(round=n))
        if "rate" in done:  # rated and closed on `loop generate`'s images
            return (
                f"round {n}: rating closed on its {made} image(s); `loop run --round` selects and trains unit {n + 1}"
            )
        state = f"has {made} image(s) so far" if made else "not started"
        return f"round {n}: generate {state}; `loop run --round` generates (or finishes) with unit {n}"
    if todo == "rate":
        counts = store.tier_counts(round=n)
        unrated = counts.get(None, 0)
        return (
            f"round {n}: waiting for ratings ({unrated} of {sum(counts.values())} unrated); rate with `loop rate`, "
            f"close with `loop rate --finish`, then `loop run --round`"
        )
    kept = ""
    if todo == "train" and ws is not None:  # an interrupted training's checkpoint: where the next run resumes
        steps = [int(p.name[5:]) for p in (ws.checkpoint(n + 1) / ".training").glob("step_*") if p.name[5:].isdigit()]
        if steps:
            kept = f" (a checkpoint at step {max(steps)} is kept: it resumes from there if train.* is unchanged)"
    return f"round {n}: {todo} not finished{kept}; `loop run --round` continues it"


def format_status(ws: Workspace) -> str:
    with ws.store() as store:
        rows = unit_rows(store)
        lines = [f"workspace {ws.root}", ""]
        imported = imported_row(store)
        every = rows + ([imported] if imported else [])
        mw = max([len("method")] + [len(str(r["method"])) for r in every])  # custom_diffusion is 16 wide
        sw = max([len("strategy")] + [len(str(r["strategy"])) for r in every])
        head = (
            f"{'unit':>4}  {'parent':>6}  {'method':<{mw}} {'strategy':<{sw}} {'images':>6} {'rated':>6}  "
            + " ".join(f"{t:>4}" for t in TIERS)
            + "  UR rate"
        )
        lines.append(head)
        for r in every:
            parent = "-" if r["parent"] is None else str(r["parent"])
            ur = "-" if r["ur_rate"] is None else f"{r['ur_rate']:.1%}"
            lines.append(
                f"{r['unit']:>4}  {parent:>6}  {r['method']:<{mw}} {r['strategy']:<{sw}} {r['images']:>6} "
                f"{r['rated']:>6}  " + " ".join(f"{r[t]:>4}" for t in TIERS) + f"  {ur:>7}"
            )
        if not rows:
            lines.append("  (no units yet: `loop run --round` starts with the base model as unit 0)")
        lines += ["", next_step(store, ws) if rows else "next: `loop run --round`"]
        busy = lock_holder(ws)
        if busy:  # not "continue it": it is being continued right now
            lines.append(f"working now: {busy}; wait for it before running `loop run --round` or `loop train`")
        lines += ring_lines(store)
        return "\n".join(lines)


def ring_lines(store) -> list[str]:
    """Where each `loop generate --forever/--count` process stopped (its position in the prompt ring)."""
    out = []
    rings = store.db.execute("SELECT key, value, updated_at FROM state WHERE key LIKE 'ring/%'").fetchall()
    if rings:  # the process layout used last (`--processes N` keeps one ring per process): older ones are history
        layout = max(rings, key=lambda r: r[2])[0].split("of")[-1]
        rings = sorted((r for r in rings if r[0].split("of")[-1] == layout), key=lambda r: r[0])
    for key, value, updated in rings:
        pos = json.loads(value)
        ago = time.time() - updated
        when = f"{ago / 60:.0f} min ago" if ago < 5400 else time.strftime("%Y-%m-%d %H:%M", time.localtime(updated))
        who = key.split("/", 1)[1].replace("of", " of ")
        out.append(
            f"prompt ring (process {who}): at {pos.get('text', '')!r}, cycle {pos.get('cycle', 0)} (moved {when})"
        )
    return [""] + out if out else []
