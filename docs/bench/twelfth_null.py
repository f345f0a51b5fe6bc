"""The twelfth study's null band for the least-kept prompt (docs/convergence.md), kept so the table can be made again.

    python docs/bench/twelfth_null.py [draws]

How low does one prompt's share of its spread read when nothing changed? bench converge measures a unit on 32
pictures per prompt and divides each prompt's spread by unit 0's. Here both sides are the base: 128 base pictures
per prompt (the taste pool's seeds, as `python -m loop.bench fit` draws them; cached), and each draw takes two
disjoint random sets of 32 per prompt, one standing for unit 0 and one for the unit. Printed per attribute: the
least of the four prompts' shares (what `worst_prompt_kept` reports) and the mean over prompts (what the target
reads), as quantiles over the draws and the share of draws under 80%. The bench's own sides are the same seeds,
drawn by two models that stay close, which correlates them: this band is wider than theirs, an upper bound on the
noise.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from loop.bench.converge import PROMPTS, share_pool
from loop.config import load_config
from loop.images import load_rgb
from loop.models import load_base
from loop.tastes import ATTRIBUTE_KEYS, attributes, spread
from loop.train.pool import base_pool
from loop.workspace import Workspace

draws = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
PER_PROMPT, SIDE = 128, 32
with tempfile.TemporaryDirectory(prefix="loop-null-") as tmp:
    ws = Workspace.init(Path(tmp) / "ws")
    cfg = load_config(ws.root, [])
    share_pool(ws, into_workspace=True)
    pipe = load_base(cfg.model, device=torch.device("cpu"), dtype=torch.float32)
    pool = base_pool(ws, pipe, PROMPTS, PER_PROMPT, cfg, log=print)
    share_pool(ws, into_workspace=False)
    by_prompt = {p: [] for p in PROMPTS}
    for it in pool:
        by_prompt[it["caption"]].append(attributes(load_rgb(ws.root / it["path"])))

rng = np.random.default_rng(0)
print(f"{draws} draws, {SIDE} pictures per prompt a side, from {PER_PROMPT} per prompt")
print("| attribute | least-kept prompt: median | 10th percentile | 2nd percentile | under 80% | mean over prompts: "
      "2nd percentile | under 80% |")
print("|---|---|---|---|---|---|---|")
for att in ATTRIBUTE_KEYS:
    least, mean = [], []
    for _ in range(draws):
        shares = []
        for attrs in by_prompt.values():
            idx = rng.permutation(len(attrs))
            unit, base = [attrs[i] for i in idx[:SIDE]], [attrs[i] for i in idx[SIDE : 2 * SIDE]]
            shares.append(spread(unit, att) / spread(base, att))
        least.append(min(shares))
        mean.append(np.mean(shares))
    least, mean = np.array(least), np.array(mean)
    print(f"| {att} | {np.median(least):.0%} | {np.percentile(least, 10):.0%} | {np.percentile(least, 2):.0%} | "
          f"{np.mean(least < 0.8):.0%} | {np.percentile(mean, 2):.0%} | {np.mean(mean < 0.8):.1%} |")
