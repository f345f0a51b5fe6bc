"""Screen: reweight the base instead of tilting its denoiser. The base maps an initial noise z to a picture; a
taste that is a function of the picture is, through the base, a function of z. Fit p(UR | z) on the base's own
pictures (logistic regression on a low-pass of z), then draw z from N(0, I) tilted by exp(lambda * w.Az): that is
N(lambda * A^T w, I), a shifted Gaussian. The denoiser is untouched, so whatever the taste does not tie to z's
low frequencies keeps the base's variety."""
import json, sys
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from loop.bench.converge import PROMPTS, EVAL_SEED
from loop.config import RateConfig, load_config
from loop.models import load_base, set_scheduler
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS, attributes, per_prompt_spread
import tempfile

taste = sys.argv[1]
pool_n = int(sys.argv[2])
k = int(sys.argv[3])  # low-pass block
lams = [float(x) for x in sys.argv[4].split(",")]
C = float(sys.argv[5]) if len(sys.argv) > 5 else 0.1
cfg = load_config(tempfile.mkdtemp(), [])
g = cfg.generate
pipe = load_base(cfg.model)
set_scheduler(pipe, g.scheduler)
pipe.set_progress_bar_config(disable=True)
rc = RateConfig(preference=taste, noise=10.0)

def noise(seeds):
    return torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])

def draw(prompt, seeds, shift=None, bs=64):
    out = []
    for i in range(0, len(seeds), bs):
        z = noise(seeds[i:i + bs])
        if shift is not None:
            z = z + shift
        with torch.inference_mode():
            ims = pipe(prompt=[prompt] * len(z), num_inference_steps=g.steps, guidance_scale=g.cfg, latents=z).images
        out += [np.asarray(im.convert("RGB")) for im in ims]
    return out

def low(z):
    return F.avg_pool2d(z, k).flatten(1).numpy()

def measure(shift_for):
    attrs, tiers = {}, []
    for p in PROMPTS:
        rgbs = draw(p, [EVAL_SEED + j for j in range(32)], shift_for(p))
        attrs[p] = [attributes(a) for a in rgbs]
        tiers += [tier_for(score(a, rc), list(rc.cutoffs)) for a in rgbs]
    return sum(t == "UR" for t in tiers) / len(tiers), {key: per_prompt_spread(attrs, key) for key in ATTRIBUTE_KEYS}

base_ur, base_sp = measure(lambda p: None)
print("BASE", taste, base_ur, flush=True)
POOL = 3_100_000
X, y, P = [], [], []
for p in PROMPTS:
    seeds = [POOL + j for j in range(pool_n)]
    rgbs = draw(p, seeds)
    X.append(low(noise(seeds)))
    y += [tier_for(score(a, rc), list(rc.cutoffs)) == "UR" for a in rgbs]
    P += [p] * pool_n
X, y = np.concatenate(X), np.array(y)
print("pool UR", y.mean(), flush=True)
for mode in ("global",):
    clf = LogisticRegression(C=C, max_iter=2000).fit(X, y)
    w = torch.tensor(clf.coef_[0], dtype=torch.float32).reshape(1, 4, 16 // k, 16 // k)
    direction = F.interpolate(w, scale_factor=k, mode="nearest") / (k * k)  # A^T w
    print("train acc", clf.score(X, y), "|A^T w|", float(direction.norm()), flush=True)
    for lam in lams:
        ur, sp = measure(lambda p: lam * direction)
        kept = {key: round(sp[key] / base_sp[key], 3) for key in ATTRIBUTE_KEYS if base_sp.get(key)}
        print("RESULT", json.dumps({"taste": taste, "k": k, "C": C, "pool": pool_n, "lam": lam, "ur": [base_ur, ur],
              "gain": round(ur / base_ur, 2), "kept": kept}), flush=True)
