"""`loop status`: units and their lineage, images and tiers per unit, which unit generates (the promotion gate's
verdict on each), and what the current round waits for."""

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
    from loop.gate import state_of

    rows = []
    for u in store.units():
        gate, why = state_of(store, u)
        row = _row(
            store.tier_counts(unit=u["unit"]),
            unit=u["unit"],
            parent=u["parent"],
            method=u["method"] or "base",
            strategy=u["strategy"] or "-",
        )
        rows.append({**row, "gate": gate, "why": why})
    return rows


def imported_row(store: Store) -> dict | None:
    """`loop import`'s images: no unit made them, but a selection takes them like any other (no UR rate: that
    measures a unit)."""
    sql = "SELECT t.tier FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id WHERE i.unit IS NULL"
    counts = Counter(r[0] for r in store.db.execute(sql))
    if not counts:
        return None
    return {**_row(counts, unit="-", parent=None, method="imported", strategy=""), "ur_rate": None, "gate": ""}


def next_step(store: Store, ws: Workspace | None = None) -> str:
    n = store.current_unit()
    phases = store.phases(n)
    done = [p for p in PHASES if p in phases and phases[p]["status"] == "done"]
    if len(done) == len(PHASES):
        return f"round {n} is closed; `loop run --round` starts round {n + 1}"
    todo = next(p for p in PHASES if p not in done)
    if todo == "generate":
        made = len(store.images(round=n))
        g = store.generating_unit(n)
        if "rate" in done:  # rated and closed on `loop generate`'s images
            return (
                f"round {n}: rating closed on its {made} image(s); `loop run --round` selects and trains unit {n + 1}"
            )
        state = f"has {made} image(s) so far" if made else "not started"
        return f"round {n}: generate {state}; `loop run --round` generates (or finishes) with unit {g}"
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
            + f"  UR rate  {'gate':>{GATE_W}}"
        )
        lines.append(head)
        for r in every:
            parent = "-" if r["parent"] is None else str(r["parent"])
            ur = "-" if r["ur_rate"] is None else f"{r['ur_rate']:.1%}"
            row = (
                f"{r['unit']:>4}  {parent:>6}  {r['method']:<{mw}} {r['strategy']:<{sw}} {r['images']:>6} "
                f"{r['rated']:>6}  " + " ".join(f"{r[t]:>4}" for t in TIERS) + f"  {ur:>7}  {r['gate']:>{GATE_W}}"
            )
            lines.append(row.rstrip())  # the imported row has no gate
        if not rows:
            lines.append("  (no units yet: `loop run --round` starts with the base model as unit 0)")
        else:
            lines += gate_lines(store, rows)
        lines += ["", next_step(store, ws) if rows else "next: `loop run --round`"]
        busy = lock_holder(ws)
        if busy:  # not "continue it": it is being continued right now
            lines.append(f"working now: {busy}; wait for it before running `loop run --round` or `loop train`")
        lines += ring_lines(store)
        return "\n".join(lines)


GATE_W = len("generates")


def gate_lines(store: Store, rows: list[dict]) -> list[str]:
    """Which unit generates, and why each newer unit does not (refused by the gate, or not checked yet)."""
    g = store.generating_unit()
    newer = [r["unit"] for r in rows if r["unit"] > g]
    out = ["", f"generating: unit {g}" + (f" (not {', '.join(map(str, newer))}: see below)" if newer else "")]
    for r in rows:
        u = r["unit"]
        if r["gate"] == "refused":
            out.append(f"unit {u} refused by the promotion gate: {r['why']}; `loop promote {u}` overrides")
        elif r["gate"] == "pending":
            out.append(f"unit {u} not checked by the promotion gate yet; `loop run --round` checks it first")
        elif r["why"]:  # promoted over the gate
            out.append(f"unit {u} {r['why']}")
    return out


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
