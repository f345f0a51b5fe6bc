"""The twelfth study's VAE round trip (docs/convergence.md), kept so the figures can be made again.

    python docs/bench/twelfth_roundtrip.py [per_prompt]

A unit learns from pictures encoded by the VAE (loop.train.data.encode_latents: the latent distribution's mean),
not from the latents the sampler drew them from. If encoding and decoding again narrowed the colours, every unit
would learn narrower pictures than it was shown. This takes the base's pictures (the taste pool's, 64 per prompt
by default), encodes and decodes each once and twice, and prints each attribute's per-prompt spread (as bench
converge computes it) as a share of the pictures' own.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from loop.bench.converge import PROMPTS, share_pool
from loop.config import load_config
from loop.models import load_base
from loop.tastes import ATTRIBUTE_KEYS, attributes, per_prompt_spread
from loop.train.data import load_square
from loop.train.pool import base_pool
from loop.workspace import Workspace

per_prompt = int(sys.argv[1]) if len(sys.argv) > 1 else 64
with tempfile.TemporaryDirectory(prefix="loop-roundtrip-") as tmp:
    ws = Workspace.init(Path(tmp) / "ws")
    cfg = load_config(ws.root, [])
    share_pool(ws, into_workspace=True)
    pipe = load_base(cfg.model, device=torch.device("cpu"), dtype=torch.float32)
    pool = base_pool(ws, pipe, PROMPTS, per_prompt, cfg, log=print)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sides = {name: {p: [] for p in PROMPTS} for name in ("pictures", "once", "twice")}
    with torch.no_grad():
        for it in pool:
            x = load_square(ws.root / it["path"], size).unsqueeze(0)
            sides["pictures"][it["caption"]].append(attributes(((x[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()))
            for name in ("once", "twice"):
                x = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
                rgb = ((x[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                sides[name][it["caption"]].append(attributes(rgb))
print(f"{per_prompt} pictures per prompt; each attribute's per-prompt spread as a share of the pictures' own")
print("| attribute | encoded and decoded once | twice |")
print("|---|---|---|")
for att in ATTRIBUTE_KEYS:
    own = per_prompt_spread(sides["pictures"], att)
    once, twice = (per_prompt_spread(sides[n], att) / own for n in ("once", "twice"))
    print(f"| {att} | {once:.0%} | {twice:.0%} |")
print("mean colour (o1, o2), pictures -> once:",
      [(round(float(np.mean([t[o] for v in sides[n].values() for t in v])), 1)) for n in ("pictures", "once")
       for o in ("o1", "o2")])  # fmt: skip
