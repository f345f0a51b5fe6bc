"""Does a noise prior add to a trained unit? Fit unit (supervised on the base's UR pictures), then a prior from
(a) the base's pool noises and (b) the unit's own draws, both labelled by the scripted taste; measure each."""
import json, sys, tempfile
from pathlib import Path
import torch
from loop import noise_prior
from loop.bench.converge import PROMPTS, measure_unit, share_pool
from loop.bench.fit import training_pictures, EVAL_PER_PROMPT
from loop.compare import render_unit
from loop.config import RateConfig, load_config
from loop.images import load_rgb
from loop.rate.auto import score, tier_for
from loop.tastes import ATTRIBUTE_KEYS
from loop.workspace import Workspace, atomic_write
import numpy as np

taste, seed, strengths = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
extra = sys.argv[4:]
rc = RateConfig(preference=taste, noise=10.0)
def liked(rgb): return tier_for(score(rgb, rc), list(rc.cutoffs)) == "UR"
with tempfile.TemporaryDirectory(prefix="loop-pou-") as tmp:
    ws = Workspace.init(Path(tmp) / "ws"); ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(ws.root, ["train.objective=supervised", "train.taste_pool=0", f"rate.preference={taste}",
                                "rate.noise=10", f"train.seed={seed}", *extra])
    from loop.models import load_base
    from loop.train import train_unit
    from loop.train.pool import base_pool
    share_pool(ws, into_workspace=True)
    pipe = load_base(cfg.model, device=torch.device("cpu"), dtype=torch.float32)
    pool = base_pool(ws, pipe, PROMPTS, 128, cfg, log=print); del pipe
    chosen = training_pictures(ws, pool, rc, "ur", 1)
    ws.checkpoint(1).mkdir(parents=True, exist_ok=True)
    atomic_write(ws.checkpoint(1) / "selection.json", json.dumps({"images": chosen, "strategy": "golden"}))
    with ws.store() as store:
        store.ensure_base_unit(cfg.model.base); train_unit(ws, store, cfg, 0, log=lambda m: None)
    share_pool(ws, into_workspace=False)
    base = measure_unit(ws, cfg, 0, EVAL_PER_PROMPT, rc)
    def report(name):
        u = measure_unit(ws, cfg, 1, EVAL_PER_PROMPT, rc)
        kept = {k: round(u["spread"][k] / base["spread"][k], 3) for k in ATTRIBUTE_KEYS if base["spread"].get(k)}
        print("RESULT", json.dumps({"taste": taste, "seed": seed, "prior": name, "ur": [base["ur_rate"], u["ur_rate"]],
              "gain": round(u["ur_rate"] / base["ur_rate"], 2), "kept": kept}), flush=True)
    report("none")
    zb = noise_prior.initial_noise([it["seed"] for it in pool], (4, 16, 16))
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
