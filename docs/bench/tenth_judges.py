"""The tenth study's offline comparison of gate judges (docs/convergence.md), kept so the table can be made again.

    python -m loop.bench converge --tastes centred_big --strategies golden --seeds 3 --keep /tmp/ws --out /tmp/docs
    python docs/bench/tenth_judges.py /tmp/ws/centred_big-golden-3 centred_big 32

(the eleventh study ran it on `contrast` golden seed 2 as well, with its workspace kept the same way)

Renders units 0-3 of a kept bench workspace at the gate's held-out probe seeds (32 per prompt), and prints what
each judge says of each new unit against the unit it would replace: the scripted rater on 40 pairs, the taste
without noise, the workspace's taste model by expected tier on 40, 64 and all pairs, and by P(UR).
"""
import sys
import numpy as np
from scipy.stats import wilcoxon, binomtest
from loop.config import load_config, RateConfig
from loop.workspace import Workspace
from loop.compare import render_unit
from loop.rate.auto import score, tier_for
from loop.images import preference_score
from loop.taste_model import fit_workspace, features_of_images
from loop.bench.converge import PROMPTS

root, taste = sys.argv[1], sys.argv[2]
n_seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 64
ws = Workspace(root)
cfg = load_config(ws.root)
rc = RateConfig(preference=taste, noise=10.0)
rc0 = RateConfig(preference=taste, noise=0.0)
seeds = [1_000_000 + k for k in range(n_seeds)]
probes = [(p, s) for s in seeds for p in PROMPTS]  # seed-major, as the gate orders its pairs
with ws.store() as store:
    tm = fit_workspace(ws, store, cfg.eval)
print("taste model:", tm.ratings, "ratings, agreement", tm.agreement)
units = [u for u in range(4) if (ws.checkpoint(u)).exists() or u == 0]
data = {}
for u in units:
    ims = render_unit(ws, cfg, u, probes)
    rgbs = [np.asarray(im.convert("RGB")) for im in ims]
    noisy = np.array([score(a, rc) for a in rgbs]); clean = np.array([preference_score(a, taste) for a in rgbs])
    pred = tm.predict(features_of_images(ws, cfg.eval, ims))
    data[u] = dict(noisy=noisy, clean=clean, ur=np.array([tier_for(s, rc.cutoffs) == "UR" for s in noisy]),
                   p_ur=pred["p_ur"], mscore=pred["score"])
    print(f"unit {u}: probe UR {data[u]['ur'].mean():.1%}, model mean p_ur {data[u]['p_ur'].mean():.3f}, "
          f"model predicts UR {np.mean(pred['p_ur'] > 0.5):.1%}")
def sign(a, b):
    w, l = int((a > b).sum()), int((b > a).sum())
    p = binomtest(w, w + l, 0.5, alternative="less").pvalue if w + l else 1.0
    return f"{w}-{l} p={p:.3f}"
for new, old in [(1, 0), (2, 1), (3, 1), (3, 2)]:
    if new not in data or old not in data: continue
    A, B = data[new], data[old]
    line = [f"unit {new} vs {old}: probe UR {A['ur'].mean():.0%} vs {B['ur'].mean():.0%}"]
    line.append("scripted40 " + sign(A["noisy"][:40], B["noisy"][:40]))
    line.append("clean40 " + sign(A["clean"][:40], B["clean"][:40]))
    line.append("model40 " + sign(A["mscore"][:40], B["mscore"][:40]))
    line.append("model64 " + sign(A["mscore"][:64], B["mscore"][:64]))
    line.append(f"model{len(probes)} " + sign(A["mscore"], B["mscore"]))
    line.append("p_ur64 " + sign(A["p_ur"][:64], B["p_ur"][:64]))
    line.append(f"p_ur{len(probes)} " + sign(A["p_ur"], B["p_ur"]))  # the eleventh study's judge by P(UR)
    d = A["p_ur"][:64] - B["p_ur"][:64]
    line.append(f"p_ur64 mean diff {d.mean():+.3f} wilcoxon p={wilcoxon(d, alternative='less').pvalue:.3f}")
    d = A["p_ur"] - B["p_ur"]
    line.append(f"p_ur{len(probes)} mean diff {d.mean():+.3f} wilcoxon p={wilcoxon(d, alternative='less').pvalue:.3f}")
    print(" | ".join(line))
