"""Does a noise prior add to a trained unit? Fit unit (supervised on the base's UR pictures), then a prior from
(a) the base's pool noises and (b) the unit's own draws, both labelled by the scripted taste; measure each."""
import json, sys
from loop import noise_prior
from loop.bench.converge import PROMPTS, measure_unit
from loop.bench.fit import EVAL_PER_PROMPT, fitted_unit
from loop.compare import render_unit
from loop.images import load_rgb
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS
import numpy as np

taste, seed, strengths = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
extra = sys.argv[4:]
with fitted_unit(taste, seed, 128, "ur", 1, extra) as (ws, cfg, rc, pool, chosen):
    def liked(rgb): return tier_for(score(rgb, rc), list(rc.cutoffs)) == "UR"
    base = measure_unit(ws, cfg, 0, EVAL_PER_PROMPT, rc)
    def report(name):
        u = measure_unit(ws, cfg, 1, EVAL_PER_PROMPT, rc)
        kept = {k: round(u["spread"][k] / base["spread"][k], 3) for k in ATTRIBUTE_KEYS if base["spread"].get(k)}
        print("RESULT", json.dumps({"taste": taste, "seed": seed, "prior": name, "ur": [base["ur_rate"], u["ur_rate"]],
              "gain": round(u["ur_rate"] / base["ur_rate"], 2), "kept": kept}), flush=True)
    report("none")
    zb = noise_prior.initial_noise([int(it["path"].rsplit("-", 1)[1][:-4]) for it in pool], (4, 16, 16))  # name: <key>-<seed>.png
    pb = noise_prior.fit(zb, [liked(load_rgb(ws.root / it["path"])) for it in pool], 4)
    useeds = [3_100_000 + k for k in range(128)]
    probes = [(p, s) for p in PROMPTS for s in useeds]
    ims = render_unit(ws, cfg, 1, probes)
    zu = noise_prior.initial_noise([s for _, s in probes], (4, 16, 16))
    pu = noise_prior.fit(zu, [liked(np.asarray(im.convert("RGB"))) for im in ims], 4)
    print("cos(base, unit) =", float((pb["direction"] * pu["direction"]).sum()), pb["accuracy"], pu["accuracy"], pb["liked"], pu["liked"], flush=True)
    for name, pr in (("base", pb), ("unit", pu)):
        for s in strengths:
            noise_prior.save(ws.checkpoint(1), pr, s); report(f"{name}@{s}")
