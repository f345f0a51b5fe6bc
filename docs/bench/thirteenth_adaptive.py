"""A strength set by the taste: s such that a 1-D logistic on the projection onto the liked direction predicts
`gain` times the pool's liked share. Base only, scripted labels (as thirteenth_labels.py)."""
import tempfile, sys, json, numpy as np, torch
from scipy.optimize import brentq
from sklearn.linear_model import LogisticRegression
from loop import noise_prior
from loop.bench.converge import PROMPTS, EVAL_SEED
from loop.config import load_config, RateConfig
from loop.models import load_base, set_scheduler
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS, attributes, per_prompt_spread
cfg = load_config(tempfile.mkdtemp(), []); g = cfg.generate
pipe = load_base(cfg.model); set_scheduler(pipe, g.scheduler); pipe.set_progress_bar_config(disable=True)
G = float(sys.argv[1]); tastes = sys.argv[2].split(",")
def draw(p, z):
    with torch.inference_mode():
        return [np.asarray(im.convert("RGB")) for im in pipe([p]*len(z), num_inference_steps=g.steps, guidance_scale=g.cfg, latents=z.clone()).images]
z = noise_prior.initial_noise([3_500_000 + k for k in range(128)], (4, 16, 16)); Z = torch.cat([z]*4)
pool = [a for p in PROMPTS for a in draw(p, z)]
ze = noise_prior.initial_noise([EVAL_SEED + k for k in range(32)], (4, 16, 16))
base = {p: draw(p, ze) for p in PROMPTS}
F = noise_prior.block_means(Z, 4)
for taste in tastes:
    rc = RateConfig(preference=taste, noise=10.0)
    y = np.array([tier_for(score(a, rc), list(rc.cutoffs)) == "UR" for a in pool])
    pr = noise_prior.fit(Z, list(y), 4); u = pr["direction"].flatten().numpy()
    proj = F @ u
    one = LogisticRegression(C=1e6).fit(proj[:, None], y)
    a, b = one.coef_[0][0], one.intercept_[0]
    rate = lambda s: (1 / (1 + np.exp(-(a * (proj + s) + b)))).mean()
    s = brentq(lambda s: rate(s) - min(0.95, G * y.mean()), 0, 20)
    attrs, ur, b_attrs, b_ur = {}, 0, {}, 0
    for p in PROMPTS:
        r = draw(p, ze + noise_prior.shift(pr["direction"], s, 16, 16))
        attrs[p] = [attributes(x) for x in r]; b_attrs[p] = [attributes(x) for x in base[p]]
        ur += sum(tier_for(score(x, rc), list(rc.cutoffs)) == "UR" for x in r)
        b_ur += sum(tier_for(score(x, rc), list(rc.cutoffs)) == "UR" for x in base[p])
    kept = {k: round(per_prompt_spread(attrs, k) / per_prompt_spread(b_attrs, k), 2) for k in ATTRIBUTE_KEYS}
    print("RESULT", json.dumps({"taste": taste, "target_gain": G, "pool_liked": round(float(y.mean()), 3), "slope": round(float(a), 2),
          "strength": round(float(s), 2), "gain": round(ur / b_ur, 2), "kept": kept}), flush=True)
