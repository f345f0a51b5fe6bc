"""`python -m loop.bench fit`: does fine-tuning itself narrow what a unit draws, whatever it is shown?

    python -m loop.bench fit [--taste centred_big] [--seed 4] [--pool 128] [--pictures all|ur] [--hues 1]
                             [key=value ...]

The control for docs/convergence.md's sixth study. Every setting of bench converge lay on one trade-off between
how far a unit moved towards the taste and how much of the variety the taste ignores it kept. That could be what
the unit is shown (a handful of rated winners, labels from a taste model, winners that happen to share a colour)
or what fine-tuning does to this model. This takes the first away: one unit is trained supervised from the base
on the base's own pictures (`--pool` per prompt, at the taste pool's seeds), either all of them (`all`: the unit
should draw what the base draws) or those the scripted taste, with the rater's noise, rates UR (`ur`: the base
conditioned on the taste, with no rating, no selection and no taste model between), optionally each also in
`--hues` colourings (loop.images.rotate_hue). The unit is measured as bench converge measures (128 images at the
measuring seeds): UR rate and each attribute's per-prompt spread as a share of the base's.

Writes docs/bench/fit.json (one entry per setting, replaced when it runs again).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

from loop.bench.converge import PROMPTS, measure_unit, share_pool
from loop.config import RateConfig, load_config
from loop.tastes import ATTRIBUTE_KEYS
from loop.workspace import Workspace, atomic_write

EVAL_PER_PROMPT = 128 // len(PROMPTS)  # as bench converge measures a unit: 128 images at its measuring seeds


def training_pictures(ws, pool: list[dict], rc: RateConfig, pictures: str, hues: int) -> list[dict]:
    """The pool's pictures the unit learns from: all, or those the scripted taste rates UR; with their copies in
    `hues` colourings (each rated again: a copy that the taste likes less is left out of `ur`)."""
    from loop.images import load_rgb
    from loop.rate.auto import score, tier_for
    from loop.train.pool import hue_copies

    chosen = []
    for it in pool + hue_copies(ws, pool, hues):
        tier = tier_for(score(load_rgb(ws.root / it["path"]), rc), list(rc.cutoffs))
        if pictures == "all" or tier == "UR":
            chosen.append(dict(it, tier=tier, winner=True))
    return chosen


def setting(entry: dict) -> tuple:
    return entry["taste"], entry["seed"], entry["pool"], entry["pictures"], entry["hues"], entry["overrides"]


@contextlib.contextmanager
def fitted_unit(taste: str, seed: int, pool_size: int, pictures: str, hues: int, overrides: list[str]):
    """A temporary workspace whose unit 1 is trained supervised from the base on the base's own pictures (as the
    module says); yields (ws, cfg, rc, pool, chosen) for measuring it, and removes the workspace after."""
    import torch

    from loop.models import load_base
    from loop.train import train_unit
    from loop.train.pool import base_pool

    with tempfile.TemporaryDirectory(prefix="loop-bench-fit-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
        cfg = load_config(ws.root, ["train.objective=supervised", "train.taste_pool=0", f"rate.preference={taste}",
                                    "rate.noise=10", f"train.seed={seed}", *overrides])  # fmt: skip
        share_pool(ws, into_workspace=True)
        pipe = load_base(cfg.model, device=torch.device("cpu"), dtype=torch.float32)
        pool = base_pool(ws, pipe, PROMPTS, pool_size, cfg, log=print)
        del pipe
        rc = RateConfig(preference=taste, noise=10.0)
        chosen = training_pictures(ws, pool, rc, pictures, hues)
        print(f"fit: {taste}, seed {seed}: learning from {len(chosen)} of {len(pool) * hues} base picture(s)")
        ws.checkpoint(1).mkdir(parents=True, exist_ok=True)
        atomic_write(ws.checkpoint(1) / "selection.json", json.dumps({"images": chosen, "strategy": "golden"}))
        with ws.store() as store:
            store.ensure_base_unit(cfg.model.base)
            train_unit(ws, store, cfg, 0, log=lambda m: None)
        share_pool(ws, into_workspace=False)
        yield ws, cfg, rc, pool, chosen


def bench_fit(taste: str, seed: int, pool_size: int, pictures: str, hues: int, overrides: list[str],
              out: str = "docs") -> dict:  # fmt: skip
    t0 = time.time()
    with fitted_unit(taste, seed, pool_size, pictures, hues, overrides) as (ws, cfg, rc, pool, chosen):
        base, unit = measure_unit(ws, cfg, 0, EVAL_PER_PROMPT, rc), measure_unit(ws, cfg, 1, EVAL_PER_PROMPT, rc)
    entry = {
        "taste": taste, "seed": seed, "pool": pool_size, "pictures": pictures, "hues": hues, "overrides": overrides,
        "learnt_from": len(chosen), "ur": [round(base["ur_rate"], 4), round(unit["ur_rate"], 4)],
        "kept": {k: round(unit["spread"][k] / base["spread"][k], 3) for k in ATTRIBUTE_KEYS if base["spread"].get(k)},
        "minutes": round((time.time() - t0) / 60, 1),
    }  # fmt: skip
    print(json.dumps(entry))
    path = Path(out) / "bench" / "fit.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if setting(e) != setting(entry)] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(entries, indent=1) + "\n")
    return entry
