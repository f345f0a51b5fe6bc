"""Selection: which rated images the next unit learns from, and how much each one counts.

    loop run --round            (the select phase)

Strategies (`select.strategy`):
- golden: every UR image from every round and every import. Nothing below UR ever enters.
- converge: every image at or above `select.min_tier`, from every round.
- grow: starts from the user's 1-5 seed images (`loop init --seed-images DIR`, or `loop import --tier UR`);
  each round also makes img2img variations of the set, and the accepted ones (min_tier and better) join it.
  No more than `select.ancestor_cap` of the set may descend from one ancestor.
- longtail: like converge, and a share of each round explores (mutated prompts, unusual seeds and CFG,
  samples of the base model). A novel hit, a UR image far from every earlier UR image, counts double.

Anti-collapse defaults (Shumailov et al. 2024; Alemohammad et al., "Self-Consuming Generative Models Go MAD",
ICLR 2024; Gerstgrasser et al. 2024): sets accumulate across rounds and never replace (`select.accumulate=false`
exists only as an ablation), and images the loop didn't make (imports, seed images, the base model's
samples) keep at least `select.outside_share` of the training weight.

The selection is written to checkpoints/unit_NNN/selection.json: ids, sha256, path, caption = prompt, tier,
and a sampling weight per image.
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


def is_outside(row) -> bool:
    """Not made by a trained unit: imported or seed images (no unit), or the base model's own samples."""
    return row["unit"] is None or row["unit"] == 0


def is_exploration(row) -> bool:
    """An image longtail made to explore (its params say `exploration: true`)."""
    try:
        return bool(json.loads(row["params"] or "{}").get("exploration"))
    except ValueError:
        return False


def lineage(store: Store) -> dict[int, tuple[int, int]]:
    """image id -> (ancestor id, depth): an image without a parent is its own ancestor at depth 0."""
    parent = {r[0]: r[1] for r in store.db.execute("SELECT id, parent_id FROM images")}
    out: dict[int, tuple[int, int]] = {}

    def walk(i: int) -> tuple[int, int]:
        chain = []
        while i not in out and parent.get(i) is not None and len(chain) < 10_000:
            chain.append(i)
            i = parent[i]
        root, depth = out.get(i, (i, 0))
        for k, j in enumerate(reversed(chain), 1):
            out[j] = (root, depth + k)
        out.setdefault(i, (root, depth))
        return out[chain[0]] if chain else out[i]

    for i in parent:
        walk(i)
    return out


def cap_ancestors(rows: list, roots: dict[int, tuple[int, int]], cap: float) -> list:
    """Keep rows (already in order of preference) so that no ancestor's descendants exceed `cap` of the set.

    A lineage over the cap is trimmed to the most it may hold next to the others, floor(cap/(1-cap) * others),
    keeping its preferred rows, and this repeats until every lineage fits. With a single ancestor there is
    nothing to balance: all rows stay."""
    groups: dict[int, list] = {}
    for r in rows:
        groups.setdefault(roots[r["id"]][0], []).append(r)
    if len(groups) <= 1 or cap >= 1:
        return rows
    size = {g: len(v) for g, v in groups.items()}
    for _ in range(len(groups) + 1):
        total = sum(size.values())
        over = [g for g, n in size.items() if n > cap * total]
        if not over:
            break
        for g in over:
            size[g] = max(1, int(cap / (1 - cap) * (total - size[g])))
    keep = {r["id"] for g, v in groups.items() for r in v[: size[g]]}
    return [r for r in rows if r["id"] in keep]


def _features(ws: Workspace, rows: list) -> tuple[list[int], list]:
    """(ids, cheap features) of the rows whose image file can be read; the others are left out."""
    from loop.images import load_rgb
    from loop.metrics import features

    ids, feats = [], []
    for r in rows:
        try:
            feats.append(features(load_rgb(ws.root / r["path"])))
            ids.append(r["id"])
        except (OSError, ValueError):
            continue
    return ids, feats


def novelty_centre(ws: Workspace, store: Store, cap: int = 256, feature_of=None):
    """The mean feature of the base model's images (unit 0; at most `cap`, evenly spread), which novelty is
    measured from (see loop.metrics.novel_hits); None when no unit-0 image can be read. `feature_of(row)` gives
    a row's feature (None: unreadable) where the caller has them already; by default they are read here."""
    import numpy as np

    from loop.metrics import spread

    rows = spread(store.images(unit=0), cap)
    if feature_of is None:
        feats = _features(ws, rows)[1]
    else:
        feats = [f for f in map(feature_of, rows) if f is not None]
    return np.mean(feats, axis=0) if feats else None


def novel_hit_ids(ws: Workspace, rows: list, distance: float, centre=None) -> set[int]:
    """UR images (in the order they were made) farther than `distance` from every earlier UR image, measured
    from `centre` (novelty_centre)."""
    from loop.metrics import novel_hits

    ids, feats = _features(ws, sorted((r for r in rows if r["tier"] == "UR"), key=lambda r: r["id"]))
    return {i for i, hit in zip(ids, novel_hits(feats, distance, centre)) if hit}


def round_floors(images: list, tiers: tuple[str, ...], share: float) -> dict[int, int]:
    """round -> index (in TIERS) of the lowest tier taken from it: tiers are taken best first until they hold
    `share` of the round's rated images (`images`: every image row), and never below the last of `tiers`."""
    counts: dict[int, dict[str, int]] = {}
    for r in images:
        if r["tier"] is not None and r["round"] is not None and r["unit"] is not None:
            c = counts.setdefault(r["round"], {})
            c[r["tier"]] = c.get(r["tier"], 0) + 1
    floors = {}
    for rnd, c in counts.items():
        total, held = sum(c.values()), 0
        floors[rnd] = TIERS.index(tiers[-1])
        for t in tiers:
            held += c.get(t, 0)
            if held >= share * total:
                floors[rnd] = TIERS.index(t)
                break
    return floors


def choose(ws: Workspace, store: Store, sc: SelectConfig, round: int) -> list[dict]:
    """The selection for unit round+1 as items with a sampling weight; [] when nothing qualifies."""
    tiers = eligible_tiers(sc)
    everything = store.images()
    rows = [r for r in everything if r["tier"] in tiers]
    if not sc.accumulate:  # the ablation: this round's images (and what came from outside) only
        rows = [r for r in rows if r["round"] == round or r["unit"] is None]
    if sc.top_share and sc.strategy in ("converge", "longtail"):  # golden takes UR alone; grow every accepted one
        floors = round_floors(everything, tiers, sc.top_share)
        rows = [r for r in rows if TIERS.index(r["tier"]) <= floors.get(r["round"], len(TIERS))]
    roots = lineage(store)
    if sc.strategy == "grow":
        best_first = sorted(rows, key=lambda r: (TIERS.index(r["tier"]), r["id"]))
        rows = sorted(cap_ancestors(best_first, roots, sc.ancestor_cap), key=lambda r: r["id"])
    weights = {r["id"]: float(sc.tier_weights[TIERS.index(r["tier"])]) for r in rows}
    novel: set[int] = set()
    if sc.strategy == "longtail" and rows:
        novel = novel_hit_ids(ws, rows, sc.novel_distance, novelty_centre(ws, store))
        for i in novel:
            weights[i] *= 2.0
    if sc.balance_rounds and rows:
        totals: dict = {}
        for r in rows:
            totals[r["round"]] = totals.get(r["round"], 0.0) + weights[r["id"]]
        mean = sum(totals.values()) / len(totals)
        for r in rows:
            weights[r["id"]] *= mean / totals[r["round"]]
    # images from outside the loop keep at least outside_share of the weight
    out_w = sum(w for r in rows for w in [weights[r["id"]]] if is_outside(r))
    in_w = sum(weights.values()) - out_w
    if out_w and in_w and out_w / (out_w + in_w) < sc.outside_share:
        f = sc.outside_share * in_w / ((1 - sc.outside_share) * out_w)
        for r in rows:
            if is_outside(r):
                weights[r["id"]] *= f
    return [
        {
            "id": r["id"],
            "sha256": r["sha256"],
            "path": r["path"],
            "caption": r["prompt"],
            "tier": r["tier"],
            "unit": r["unit"],
            "round": r["round"],
            "source": r["source"],
            "weight": _rounded(weights[r["id"]], 4),
            "ancestor": roots.get(r["id"], (r["id"], 0))[0],
            "depth": roots.get(r["id"], (r["id"], 0))[1],
            "exploration": is_exploration(r),
            "novel_hit": r["id"] in novel,
        }
        for r in rows
    ]


def select(ws: Workspace, store: Store, sc: SelectConfig, round: int) -> list[dict]:
    """The training set for unit round+1, written to its selection.json; LoopError if it is empty."""
    tiers = eligible_tiers(sc)
    items = choose(ws, store, sc, round)
    if not items:
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
    out = ws.checkpoint(round + 1) / "selection.json"
    summary = {
        "outside_weight": _rounded(sum(i["weight"] for i in items if is_outside(i)), 3),
        "total_weight": _rounded(sum(i["weight"] for i in items), 3),
        "novel_hits": sum(i["novel_hit"] for i in items),
        "exploration": sum(i["exploration"] for i in items),
    }
    atomic_write(
        out,
        json.dumps(
            {"strategy": sc.strategy, "tiers": list(tiers), "round": round, **summary, "images": items},
            indent=2,
            ensure_ascii=False,
        ),
    )
    return items


def _rounded(x: float, digits: int) -> float:
    return float(f"{x:.{digits}f}")  # (the `round` parameter of the functions above shadows the builtin)
