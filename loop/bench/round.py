"""`python -m loop.bench round`: seconds per phase of whole rounds on the embedded model, scripted rater.

Also reports, per unit, the scripted rater's mean score and UR rate on that unit's round, the evidence that
training on selections moves the model toward the rater's taste.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from loop.bench.report import table, write
from loop.config import load_config
from loop.images import load_rgb, preference_score
from loop.round import run_round
from loop.workspace import Workspace

PROMPTS = ["a circle", "a square", "a triangle", "a ring"]


def unit_scores(ws: Workspace, unit: int, preference: str) -> dict:
    with ws.store() as store:
        rows = store.images(unit=unit)
    scores = [preference_score(load_rgb(ws.root / r["path"]), preference) for r in rows]
    ur = sum(r["tier"] == "UR" for r in rows)
    return {"mean_score": float(np.mean(scores)), "ur_rate": ur / len(rows), "images": len(rows)}


def bench_round(images: int = 64, rounds: int = 2, train_steps: int = 300, out: str = "docs") -> dict:
    per_prompt = max(1, images // len(PROMPTS))
    overrides = [f"generate.images_per_prompt={per_prompt}", f"train.steps={train_steps}"]
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
        cfg = load_config(ws.root, overrides)
        rows, per_unit = [], []
        for n in range(rounds):
            t0 = time.time()
            res = run_round(ws, cfg, n, auto_rate_=True, log=lambda m: None)
            total = time.time() - t0
            rows.append(
                {
                    "round": n,
                    **{f"{p}_s": res.seconds.get(p, 0.0) for p in ("generate", "rate", "select", "train")},
                    "total_s": round(total, 2),
                }
            )
            per_unit.append({"unit": n, **unit_scores(ws, n, cfg.rate.preference)})
        # the last unit's own images, rated by the same scripted rater, close the comparison
        last = rounds
        run_round(ws, cfg, last, auto_rate_=True, log=lambda m: None, stop_after="rate")
        per_unit.append({"unit": last, **unit_scores(ws, last, cfg.rate.preference)})

    first = rows[0]
    figures = {
        "generate_s": first["generate_s"],
        "rate_s": first["rate_s"],
        "select_s": first["select_s"],
        "train_s": first["train_s"],
        "total_s": first["total_s"],
        "images": per_prompt * len(PROMPTS),
        "train_steps": train_steps,
        "rounds": rounds,
    }
    for u in per_unit:
        figures[f"unit{u['unit']}_mean_score"] = round(u["mean_score"], 2)
        figures[f"unit{u['unit']}_ur_rate"] = round(u["ur_rate"], 4)
    t1 = table(rows)
    t2 = table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in u.items()} for u in per_unit])
    print(t1, "\n", t2, sep="\n")
    write(
        "round",
        figures,
        f"""## round

`python -m loop.bench round`: whole rounds on the embedded model with the scripted warm-colour rater,
{figures["images"]} images per round, {train_steps} LoRA steps. Seconds per phase:

{t1}

The rater's mean score and UR rate on each unit's own images (same prompts, same seeds):

{t2}
""",
        out,
    )
    return figures
