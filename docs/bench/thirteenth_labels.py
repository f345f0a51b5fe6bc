"""Prior-only on the base: does a 64-per-prompt pool with scripted labels reach the 128-pool's gain? And the Stein
direction (mean of score-weighted block means) from the continuous score vs the logistic one."""
import tempfile, sys, numpy as np, torch
from loop import noise_prior
from loop.bench.converge import PROMPTS, EVAL_SEED
from loop.config import load_config, RateConfig
from loop.models import load_base, set_scheduler
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS, attributes, per_prompt_spread
cfg = load_config(tempfile.mkdtemp(), []); g = cfg.generate
pipe = load_base(cfg.model); set_scheduler(pipe, g.scheduler); pipe.set_progress_bar_config(disable=True)
taste = sys.argv[1]; S = [float(x) for x in sys.argv[2].split(",")]
rc = RateConfig(preference=taste, noise=10.0)
def draw(p, z):
    with torch.inference_mode():
        return [np.asarray(im.convert("RGB")) for im in pipe([p]*len(z), num_inference_steps=g.steps, guidance_scale=g.cfg, latents=z.clone()).images]
seeds = [3_000_000 + k for k in range(64)]
z = noise_prior.initial_noise(seeds, (4, 16, 16)); Z = torch.cat([z]*4)
rgbs = [a for p in PROMPTS for a in draw(p, z)]
sc = np.array([score(a, rc) for a in rgbs]); y = np.array([tier_for(s, list(rc.cutoffs)) == "UR" for s in sc])
F = noise_prior.block_means(Z, 4)
dirs = {"logistic": noise_prior.fit(Z, list(y), 4)["direction"]}
for name, t in (("stein_score", sc), ("stein_ur", y.astype(float))):
    w = ((t - t.mean())[:, None] * F).mean(0); dirs[name] = torch.tensor(w / np.linalg.norm(w), dtype=torch.float32).reshape(4, 4, 4)
print("cos", {a: round(float((dirs["logistic"] * dirs[a]).sum()), 3) for a in dirs})
ze = noise_prior.initial_noise([EVAL_SEED + k for k in range(32)], (4, 16, 16))
def measure(shift):
    attrs, ur = {}, 0
    for p in PROMPTS:
        r = draw(p, ze + shift); attrs[p] = [attributes(a) for a in r]
        ur += sum(tier_for(score(a, rc), list(rc.cutoffs)) == "UR" for a in r)
    return ur / 128, {k: per_prompt_spread(attrs, k) for k in ATTRIBUTE_KEYS}
b_ur, b_sp = measure(0)
for name, d in dirs.items():
    for s in S:
        ur, sp = measure(noise_prior.shift(d, s, 16, 16))
        print("RESULT", taste, name, s, round(ur / b_ur, 2), {k: round(sp[k] / b_sp[k], 2) for k in ATTRIBUTE_KEYS if b_sp.get(k)}, flush=True)
