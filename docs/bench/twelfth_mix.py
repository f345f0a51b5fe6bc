"""The twelfth study's mix of units (docs/convergence.md), kept so the figures can be made again.

    python docs/bench/twelfth_mix.py centred_big ur 4,5       (or: all 4,5)

Is the fit's narrowing a drift that differs from one training to the next (units trained at other seeds move
each prompt's colours elsewhere, so drawing each picture with one of them would keep the variety), or a bias?
As `python -m loop.bench fit` does, units are trained supervised from the base on the base's own pictures (all of
them, or those the scripted taste rates UR with its noise), here one per training seed; each is drawn at the
bench's measuring seeds (32 per prompt), and so is their mix (the first unit at the even seeds, the second at the
odd). Printed: UR rate, each attribute's spread kept (each prompt's share of the base's, averaged), and how far
each prompt's mean colour moved in the opponent plane (o1, o2); first, how far the pictures learnt from differ
in mean colour from all the pool's pictures of their prompt.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from loop.bench.converge import EVAL_SEED, PROMPTS, base_images, share_pool
from loop.bench.fit import training_pictures
from loop.compare import render_unit
from loop.config import RateConfig, load_config
from loop.images import load_rgb
from loop.models import load_base
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS, attributes, spread
from loop.train import train_unit
from loop.train.pool import base_pool
from loop.workspace import Workspace, atomic_write

taste, pictures = sys.argv[1], sys.argv[2]
seeds = [int(s) for s in sys.argv[3].split(",")]
extra = sys.argv[4:]
PER = 32
rc = RateConfig(preference=taste, noise=10.0)
with tempfile.TemporaryDirectory(prefix="ens-") as tmp:
    ws = Workspace.init(Path(tmp) / "ws")
    ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
    cfgs = [load_config(ws.root, ["train.objective=supervised", "train.taste_pool=0", f"rate.preference={taste}",
                                  "rate.noise=10", f"train.seed={s}", *extra]) for s in seeds]
    share_pool(ws, into_workspace=True)
    pipe = load_base(cfgs[0].model, device=torch.device("cpu"), dtype=torch.float32)
    pool = base_pool(ws, pipe, PROMPTS, 128, cfgs[0], log=print)
    del pipe
    chosen = training_pictures(ws, pool, rc, pictures, 1)
    print("learning from", len(chosen))
    pool_attrs = {it["path"]: attributes(load_rgb(ws.root / it["path"])) for it in pool}  # each picture read once
    for p in PROMPTS:
        every = [pool_attrs[it["path"]] for it in pool if it["caption"] == p]
        learnt = [pool_attrs[it["path"]] for it in chosen if it["caption"] == p]
        print(f"   {p}: {len(learnt)} learnt from; their mean colour differs from the pool's by "
              f"({np.mean([t['o1'] for t in learnt]) - np.mean([t['o1'] for t in every]):.1f}, "
              f"{np.mean([t['o2'] for t in learnt]) - np.mean([t['o2'] for t in every]):.1f})")
    with ws.store() as store:
        store.ensure_base_unit(cfgs[0].model.base)
        for i, c in enumerate(cfgs):
            ws.checkpoint(i + 1).mkdir(parents=True, exist_ok=True)
            atomic_write(ws.checkpoint(i + 1) / "selection.json", json.dumps({"images": chosen, "strategy": "golden"}))
            train_unit(ws, store, c, i, log=lambda m: None)
    probes = [(p, EVAL_SEED + k) for p in PROMPTS for k in range(PER)]
    out = {}
    for u in range(len(seeds) + 1):
        ims = base_images(ws, cfgs[0], probes) if u == 0 else render_unit(ws, cfgs[0], u, probes)
        out[u] = [np.asarray(im.convert("RGB")) for im in ims]


def summary(rgbs):
    by = {p: [] for p in PROMPTS}
    for (p, _), a in zip(probes, rgbs):
        by[p].append(attributes(a))
    ur = np.mean([tier_for(score(a, rc), list(rc.cutoffs)) == "UR" for a in rgbs])
    return by, ur


b0, ur0 = summary(out[0])


def report(name, rgbs):
    by, ur = summary(rgbs)
    kept = {k: np.mean([spread(by[p], k) / spread(b0[p], k) for p in PROMPTS]) for k in ATTRIBUTE_KEYS}
    moved = {p: tuple(round(float(np.mean([t[o] for t in by[p]]) - np.mean([t[o] for t in b0[p]])), 1)
                      for o in ("o1", "o2")) for p in PROMPTS}
    print(f"{name}: UR {ur0:.0%} -> {ur:.0%} ({ur/ur0:.2f}x); kept (mean of prompt shares) " +
          ", ".join(f"{k} {v:.0%}" for k, v in kept.items()))
    print("   mean colour moved, per prompt (o1, o2):", moved)


for u in range(1, len(seeds) + 1):
    report(f"unit at train seed {seeds[u-1]}", out[u])
mix = [out[1 + (i % len(seeds))][i] for i in range(len(probes))]
report("mix, one unit per picture", mix)
