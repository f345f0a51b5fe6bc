"""`python -m loop.bench converge`: does the loop learn a taste, and not just the few pictures it was shown?

    python -m loop.bench converge [--tastes warm,small_dark,contrast,centred_big] [--strategies golden,converge]
                                  [--seeds 0,1,2,3] [--rounds 3] [--images 64] [--eval 128] [--name NAME]
                                  [key=value ...]

For each taste (loop.tastes: each scores some attributes of the picture and is indifferent to others), strategy
and seed, a fresh workspace runs `rounds` whole rounds on the embedded model with the scripted rater (that taste,
noise 10), the promotion gate judged as the defaults say (gate.judge=model: the workspace's taste model, fitted on
those noisy ratings; gate.judge=scripted: the same taste on at most 40 noisy blind votes, as a person would give).
Every unit is then measured on `eval` images at fixed seeds no round used (128 by default: a UR rate from 64
images is +-12 points): its UR rate, and the per-prompt spread of every attribute (loop.tastes.spread), as a
share of unit 0's; and how much of its selection's variety it covers (loop.metrics.prdc, per prompt, as a share
of the base model's coverage of the same selection).

The targets (per taste and strategy, at 3 or more of 4 seeds): the unit that generates at the end draws UR at 2x
or more unit 0's rate, every attribute the taste is indifferent to keeps 80% or more of unit 0's per-prompt
spread, and no unit that generated lost more than 10 points of UR rate against an earlier one.

Each invocation writes docs/bench/converge_<name>.json (its runs, by taste, strategy and seed, so a long study
can run as several invocations); then every docs/bench/converge_*.json of the same settings is merged into
docs/bench/converge.json and docs/convergence.md, with a picture per taste.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from loop.bench.report import replace_block, table, write_section
from loop.config import RateConfig, load_config
from loop.rate.auto import score, tier_for
from loop.round import run_round
from loop.tastes import ATTRIBUTE_KEYS, TASTES, attributes, indifferent
from loop.workspace import Workspace, atomic_write, sha256_file

PROMPTS = ["a circle", "a square", "a triangle", "a ring"]
TASTE_NAMES = ["warm", "small_dark", "contrast", "centred_big"]
STRATEGIES = {"golden": ["select.strategy=golden"], "converge": ["select.strategy=converge"]}
EVAL_SEED = 500_000  # the measuring seeds: EVAL_SEED + k, far from every round's and the gate's
KEEP_SPREAD = 0.8  # an indifferent attribute keeps at least this share of unit 0's per-prompt spread
UR_GAIN = 2.0  # the unit that generates at the end: at least this multiple of unit 0's UR rate
MAX_FALL = 0.10  # no unit that generates loses more than this (absolute UR rate) against an earlier one
SHEET = 4  # images per prompt per unit in the contact sheet


def measure_unit(ws, cfg, unit: int, per_prompt: int, rc: RateConfig) -> dict:
    """The unit drawn at the measuring seeds: UR rate and mean score under the taste (with the rater's noise), and
    each attribute's per-prompt spread; the images and their cheap features for coverage and the sheet."""
    from loop.compare import render_unit
    from loop.metrics import features
    from loop.tastes import per_prompt_spread, spread

    probes = [(p, EVAL_SEED + k) for p in PROMPTS for k in range(per_prompt)]
    images = base_images(ws, cfg, probes) if unit == 0 else render_unit(ws, cfg, unit, probes)
    rgbs = [np.asarray(im.convert("RGB")) for im in images]
    scores = [score(a, rc) for a in rgbs]
    tiers = [tier_for(s, list(rc.cutoffs)) for s in scores]
    attrs = {p: [] for p in PROMPTS}
    feats = {p: [] for p in PROMPTS}
    sheet = {p: [] for p in PROMPTS}
    for (p, _), a, im in zip(probes, rgbs, images):
        attrs[p].append(attributes(a))
        feats[p].append(features(a))
        if len(sheet[p]) < SHEET:
            sheet[p].append(im)
    return {
        "unit": unit,
        "ur_rate": sum(t == "UR" for t in tiers) / len(tiers),
        "mean_score": float(np.mean(scores)),
        "spread": {k: per_prompt_spread(attrs, k) for k in ATTRIBUTE_KEYS},
        "spread_by_prompt": {k: {p: spread(attrs[p], k) for p in PROMPTS} for k in ATTRIBUTE_KEYS},
        "feats": {p: np.stack(v) for p, v in feats.items()},
        "sheet": [im for p in PROMPTS for im in sheet[p]],
    }


def base_images(ws, cfg, probes: list[tuple[str, int]]) -> list:
    """Unit 0 at the measuring seeds: the same pictures in every run (one base, one set of seeds, whatever the taste,
    strategy or round seed), so rendered once and kept in loop's cache ($LOOP_CACHE/bench, keyed by the model and
    generation settings and the probes)."""
    import dataclasses
    import hashlib

    from PIL import Image

    from loop.compare import render_unit
    from loop.tiny.build_xl import cache_root

    gen = dataclasses.replace(cfg.generate, seed=0, images_per_prompt=1)  # a probe carries its own seed
    key = hashlib.sha256(repr((cfg.model, gen, probes)).encode()).hexdigest()[:16]
    path = cache_root() / "bench" / f"converge-unit0-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return [Image.fromarray(a) for a in z["images"]]
    images = render_unit(ws, cfg, 0, probes)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.stack([np.asarray(im.convert("RGB")) for im in images]))
    atomic_write(path, buf.getvalue())
    return images


def share_pool(ws, into_workspace: bool) -> None:
    """The taste pool (train.taste_pool, loop.train.pool) is the base's pictures of the same prompts at the same seeds
    in every run, as are their latents: kept once in loop's cache ($LOOP_CACHE/bench/converge-pool) and copied into
    each new workspace, so a run does not draw and encode them again. File by file, each written under a temporary
    name and renamed, so two benchmark processes can share it."""
    import os
    import shutil

    from loop.tiny.build_xl import cache_root

    shared = cache_root() / "bench" / "converge-pool"
    pool, latents = ws.cache("pool"), ws.cache("latents")
    if into_workspace:
        pairs = [(f, pool / f.relative_to(shared / "pool")) for f in (shared / "pool").rglob("*.png")]
        pairs += [(f, latents / f.name) for f in (shared / "latents").glob("*.safetensors")]
    else:
        shas = {sha256_file(f) for f in pool.rglob("*.png")}
        pairs = [(f, shared / "pool" / f.relative_to(pool)) for f in pool.rglob("*.png")]
        pairs += [(f, shared / "latents" / f.name) for f in latents.glob("*.safetensors")
                  if f.name.split("-")[0] in shas]  # fmt: skip
    for src, dst in pairs:
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def selection_coverage(ws, store, unit: int, measured: dict, base: dict, k: int) -> tuple[float | None, float | None]:
    """The unit's mean per-prompt coverage of its selection (manifest.json's images), and the base model's coverage
    of the same selection at the same seeds."""
    from loop.features import mean_of, per_prompt_prdc
    from loop.images import load_rgb
    from loop.metrics import features

    manifest = json.loads((ws.checkpoint(unit) / "manifest.json").read_text())
    sel: dict[str, list] = {}
    for it in manifest.get("images", []):
        row = store.image(it["id"]) if it.get("id") is not None else None
        if row is None or row["prompt"] not in PROMPTS:
            continue
        sel.setdefault(row["prompt"], []).append(features(load_rgb(ws.root / row["path"])))
    real = {p: np.stack(v) for p, v in sel.items()}
    mine = mean_of(per_prompt_prdc(real, measured["feats"], k), "coverage")
    theirs = mean_of(per_prompt_prdc(real, base["feats"], k), "coverage")
    return mine, theirs


def run_one(taste: str, strategy: str, seed: int, where: Path, rounds: int, per_prompt: int, eval_per_prompt: int,
            overrides: list[str], log=print) -> dict:  # fmt: skip
    """rounds whole rounds of one strategy under one taste at one seed, then every unit measured."""
    ws = Workspace.init(where / f"{taste}-{strategy}-{seed}")
    ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(
        ws.root,
        [f"generate.images_per_prompt={per_prompt}", f"rate.preference={taste}", "rate.noise=10",
         f"generate.seed={seed}", f"train.seed={seed}", *STRATEGIES[strategy], *overrides],
    )  # fmt: skip
    share_pool(ws, into_workspace=True)
    t0 = time.time()
    generating = [0]  # the unit that generates after each round (the gate may keep the parent)
    gates = []
    for n in range(rounds):
        try:
            run_round(ws, cfg, n, auto_rate_=True, log=lambda m: None)
        except Exception as e:  # an empty selection ends this run; report what it reached
            log(f"  {taste}/{strategy}/seed {seed}: round {n} stopped: {str(e).splitlines()[0][:160]}")
            break
        with ws.store() as store:
            generating.append(store.generating_unit())
            row = store.unit(n + 1)
            gate = json.loads(row["gate"]) if row is not None and "gate" in row.keys() and row["gate"] else {}
        kept = ("passed", "parent", "votes", "p_value", "p_better", "variety_share")
        gates.append({"unit": n + 1, "reasons": gate.get("reasons", []), **{k: gate.get(k) for k in kept}})
        log(f"  {taste}/{strategy}/seed {seed}: round {n} done ({time.time() - t0:.0f} s), generating: unit "
            f"{generating[-1]}")  # fmt: skip
    share_pool(ws, into_workspace=False)
    rc = RateConfig(preference=taste, noise=10.0)
    units = sorted({u for u in range(len(generating))})
    measured = {u: measure_unit(ws, cfg, u, eval_per_prompt, rc) for u in units}
    with ws.store() as store:
        cov = {u: selection_coverage(ws, store, u, measured[u], measured[0], cfg.eval.k) for u in units if u}
    return {"taste": taste, "strategy": strategy, "seed": seed, "generating": generating, "gates": gates,
            "measured": measured, "coverage": cov, "seconds": time.time() - t0}  # fmt: skip


def figures_of(run: dict) -> dict:
    """The flat, JSON-able figures of one run, and whether it meets every target."""
    m, gen = run["measured"], run["generating"]
    ur = {u: round(x["ur_rate"], 4) for u, x in m.items()}
    final = gen[-1]
    spreads = {}
    for attr in ATTRIBUTE_KEYS:
        s0 = m[0]["spread"][attr]
        spreads[attr] = {u: (round(x["spread"][attr] / s0, 3) if s0 else None) for u, x in m.items()}
    ind = indifferent(run["taste"])
    kept = {a: spreads[a][final] for a in ind}
    # the target reads the spread averaged over the prompts, so one prompt can lose an attribute inside a mean that
    # passes: reported beside it (not a target), the prompt that kept the least of each attribute the taste ignores
    worst = {a: worst_prompt(m[0], m[final], a) for a in ind if "spread_by_prompt" in m[final]}
    gen_ur = [ur[u] for u in gen]
    fall = max([max(gen_ur[:i]) - gen_ur[i] for i in range(1, len(gen_ur))] + [0.0])
    gain = ur[final] / ur[0] if ur[0] else float("inf")
    met = gain >= UR_GAIN and all(v is not None and v >= KEEP_SPREAD for v in kept.values()) and fall <= MAX_FALL
    peak = max(ur, key=lambda u: ur[u])
    return {
        "taste": run["taste"], "strategy": run["strategy"], "seed": run["seed"],
        "ur": {str(u): v for u, v in ur.items()}, "peak": ur[peak], "peak_unit": peak,
        "generating": gen, "final_unit": final, "ur_final": ur[final], "ur_gain": round(gain, 3),
        "max_fall": round(fall, 4),
        "spread_share": {a: {str(u): v for u, v in d.items()} for a, d in spreads.items()},
        "indifferent_kept": kept,
        "worst_prompt_kept": worst,
        "coverage": {str(u): (None if v[0] is None else round(v[0], 3)) for u, v in run["coverage"].items()},
        "coverage_base": {str(u): (None if v[1] is None else round(v[1], 3)) for u, v in run["coverage"].items()},
        "gates": run["gates"], "met": bool(met), "minutes": round(run["seconds"] / 60, 1),
    }  # fmt: skip


def worst_prompt(base: dict, unit: dict, attribute: str) -> dict | None:
    """The prompt whose spread of `attribute` the unit kept least of, as a share of unit 0's spread of that prompt."""
    shares = {}
    for p, s0 in base["spread_by_prompt"][attribute].items():
        s = unit["spread_by_prompt"][attribute].get(p)
        if s0 and s is not None:
            shares[p] = s / s0
    if not shares:
        return None
    p = min(shares, key=shares.get)
    return {"prompt": p, "share": round(shares[p], 3)}


def contact_sheet(runs: list[dict], taste: str) -> bytes:
    """For one taste: a row per (strategy, seed, unit), the first images of each prompt at the measuring seeds."""
    from loop.compare import grid_image

    rows, columns = [], [(p, EVAL_SEED + k) for p in PROMPTS for k in range(SHEET)]
    for r in runs:
        if r["taste"] != taste:
            continue
        for u, x in r["measured"].items():
            mark = "*" if u == r["generating"][-1] else ""
            rows.append((f"{r['strategy'][:4]} s{r['seed']} u{u}{mark}", x["sheet"]))
    buf = io.BytesIO()
    grid_image(rows, columns, label_w=96, cell_min=40).save(buf, format="PNG")
    return buf.getvalue()


def bench_converge(tastes: list[str], strategies: list[str], seeds: list[int], rounds: int = 3, images: int = 64,
                   eval_images: int = 128, out: str = "docs", name: str = "run", overrides: list[str] | None = None,
                   keep: str | None = None) -> dict:  # fmt: skip
    per_prompt = max(1, images // len(PROMPTS))
    eval_per_prompt = max(2, eval_images // len(PROMPTS))
    overrides = list(overrides or [])
    bad = [t for t in tastes if t not in TASTES]
    if bad:
        raise SystemExit(f"--tastes: unknown {', '.join(bad)}; use {', '.join(TASTES)}")
    runs, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="loop-bench-converge-") as tmp:
        where = Path(keep or tmp)
        where.mkdir(parents=True, exist_ok=True)
        for taste in tastes:
            for strategy in strategies:
                for seed in seeds:
                    print(f"converge: {taste} / {strategy} / seed {seed} ({rounds} rounds, {images} images a round"
                          f"{''.join(' ' + o for o in overrides)})", flush=True)  # fmt: skip
                    runs.append(run_one(taste, strategy, seed, where, rounds, per_prompt, eval_per_prompt, overrides))
                    f = figures_of(runs[-1])
                    print(f"  UR {' -> '.join(f'{v:.0%}' for v in f['ur'].values())}, generating unit "
                          f"{f['final_unit']}, kept {f['indifferent_kept']}, coverage {f['coverage']} "
                          f"(base {f['coverage_base']}), "
                          f"{'met' if f['met'] else 'NOT met'}", flush=True)  # fmt: skip
    part = {"settings": {"rounds": rounds, "images_per_round": per_prompt * len(PROMPTS),
                         "eval_images": eval_per_prompt * len(PROMPTS), "overrides": " ".join(overrides),
                         "defaults": defaults_fingerprint()},
            "minutes": round((time.time() - t0) / 60, 1), "runs": [figures_of(r) for r in runs]}  # fmt: skip
    outp = Path(out)
    atomic_write(outp / "bench" / f"converge_{name}.json", json.dumps(part, indent=1) + "\n")
    for taste in tastes:
        atomic_write(outp / "img" / f"converge_{name}_{taste}.png", contact_sheet(runs, taste))
    report(out)
    return part


def part_name(overrides: list[str], tastes: list[str], strategies: list[str], seeds: list[int]) -> str:
    """A file-name-safe name for an invocation's part: its overrides (or "defaults"), tastes, strategies, seeds."""
    import hashlib
    import re

    what = "-".join(re.sub(r"[^A-Za-z0-9.=]+", "_", o) for o in overrides) or "defaults"
    name = f"{what}-{'_'.join(tastes)}-{'_'.join(strategies)}-s{'_'.join(map(str, seeds))}"
    return name if len(name) <= 100 else name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


# Settings added after the defaults' study began, with the value that keeps the earlier behaviour: left out of the
# fingerprint while they hold it (memory options draw and learn the same on the CPU; dpo_match=0 is every pair),
# so adding an option does not disown the figures measured before it existed.
ADDED_SINCE = {"generate.vae_slicing": False, "generate.vae_tiling": False, "train.gradient_checkpointing": False,
               "train.optimizer": "adamw", "train.dpo_match": 0,
               "train.taste_pool": 0, "train.taste_pool_share": 0.0, "train.taste_pool_bar": "selection",
               "train.dpo_reference": "base", "train.taste_pool_hues": 1,
               "train.invariance": "none", "train.invariance_weight": 1.0,
               "train.lora_dropout": 0.0, "train.guidance": 0.0, "gate.min_variety_share": 0.0,
               "train.noise_prior": 0.0, "train.noise_prior_pool": 128, "train.noise_prior_grid": 4}  # fmt: skip


def defaults_fingerprint() -> str:
    """A short hash of the default train, select and gate settings: a part run before the defaults changed is not
    counted as the defaults' figures."""
    import dataclasses
    import hashlib

    cfg = load_config(None, [])
    doc = {k: dataclasses.asdict(getattr(cfg, k)) for k in ("train", "select", "gate", "generate")}
    for key, neutral in ADDED_SINCE.items():
        section, name = key.split(".")
        if doc[section].get(name) == neutral:
            del doc[section][name]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def is_defaults(part: dict) -> bool:
    """A part of the defaults' study: no overrides, and run with today's defaults."""
    st = part["settings"]
    return not st["overrides"] and st.get("defaults") == defaults_fingerprint()


def summary(parts: dict[str, dict]) -> tuple[dict, list[dict]]:
    """The flat figures over every run of the default settings: per taste and strategy the seeds run and met
    (0 and 0 where none ran), worst_seeds_met, and each seed's figures; plus the table's rows."""
    flat, rows = {}, []
    for t in TASTE_NAMES:
        for st in STRATEGIES:
            flat[f"{t}_{st}_seeds"] = flat[f"{t}_{st}_seeds_met"] = 0
    runs = sorted((r for p in parts.values() if is_defaults(p) for r in p["runs"]),
                  key=lambda r: (TASTE_NAMES.index(r["taste"]), r["strategy"], r["seed"]))  # fmt: skip
    for r in runs:
        key = f"{r['taste']}_{r['strategy']}"
        flat[f"{key}_seeds"] += 1
        flat[f"{key}_seeds_met"] += int(r["met"])
        flat[f"{key}_seed{r['seed']}_ur"] = " ".join(f"{v:.3f}" for v in r["ur"].values())
        flat[f"{key}_seed{r['seed']}_peak"] = r["peak"]
        flat[f"{key}_seed{r['seed']}_final_unit"] = r["final_unit"]
        for a, v in r["indifferent_kept"].items():
            flat[f"{key}_seed{r['seed']}_{a}_kept"] = v
        flat[f"{key}_seed{r['seed']}_coverage"] = r.get("coverage", {}).get(str(r["final_unit"]))
        rows.append(run_row(r))
    met = [v for k, v in flat.items() if k.endswith("_seeds_met")]
    flat["worst_seeds_met"] = min(met) if met else 0
    return flat, rows


def run_row(r: dict) -> dict:
    u = str(r["final_unit"])
    cov, base = r.get("coverage", {}).get(u), r.get("coverage_base", {}).get(u)
    kept = [f"{a} {v:.0%}{least_prompt(r, a)}" for a, v in r["indifferent_kept"].items()]
    return {"taste": r["taste"], "strategy": r["strategy"], "seed": r["seed"],
            "UR per unit": " ".join(f"{v:.0%}" for v in r["ur"].values()),
            "generates": r["final_unit"], "gain": r["ur_gain"], "fall (points)": round(100 * r["max_fall"]),
            "kept (indifferent)": ", ".join(kept),
            "coverage (base)": "-" if cov is None else f"{cov:.2f} ({'-' if base is None else f'{base:.2f}'})",
            "met": "yes" if r["met"] else "no"}  # fmt: skip


def least_prompt(r: dict, attribute: str) -> str:
    """The prompt that kept the least of `attribute`, as " (least: a triangle 40%)"; "" for parts measured before."""
    w = (r.get("worst_prompt_kept") or {}).get(attribute)
    return f" (least: {w['prompt']} {w['share']:.0%})" if w else ""


def label_of(part: dict) -> str:
    if is_defaults(part):
        return "defaults"
    return part["settings"]["overrides"] or "defaults of an earlier version"


def tradeoff_points(parts: dict[str, dict]) -> list[dict]:
    """One point per setting (a part's overrides; parts of one setting pooled): the mean UR gain of the unit that
    generates at the end (its UR rate over unit 0's) against the mean of the smallest share of spread kept among
    the attributes the taste is indifferent to; with the seeds and tastes behind it."""
    pooled: dict[str, list[dict]] = {}
    for part in parts.values():
        pooled.setdefault(label_of(part), []).extend(part["runs"])
    # the same runs for every setting (taste, strategy, seed), so that the points compare like with like
    keys = [{(r["taste"], r["strategy"], r["seed"]) for r in runs} for runs in pooled.values()]
    common = set.intersection(*keys) if keys else set()
    if common:
        pooled = {k: [r for r in v if (r["taste"], r["strategy"], r["seed"]) in common] for k, v in pooled.items()}
    points = []
    for label, runs in pooled.items():
        kept = [min(v for v in r["indifferent_kept"].values() if v is not None) for r in runs]
        gain = [r["ur_final"] - float(r["ur"]["0"]) for r in runs]
        points.append({"setting": label, "runs": len(runs), "ur_gain_points": round(100 * float(np.mean(gain)), 1),
                       "min_kept": round(float(np.mean(kept)), 3), "met": sum(r["met"] for r in runs),
                       "tastes": ",".join(sorted({r["taste"] for r in runs})),
                       "seeds": ",".join(str(s) for s in sorted({r["seed"] for r in runs}))})  # fmt: skip
    ordered = sorted(points, key=lambda q: (q["setting"] != "defaults", q["setting"]))
    return [{"#": i + 1, **q} for i, q in enumerate(ordered)]  # "#": the point's number on the plot


def _png(fig, rect=(0, 0, 1, 1)) -> bytes:
    """The figure laid out within `rect` as PNG bytes, and closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout(rect=rect)
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def tradeoff_plot(points: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=100)
    for q in points:
        star = q["setting"] == "defaults"
        ax.scatter(q["min_kept"], q["ur_gain_points"], s=220 if star else 50, marker="*" if star else "o",
                   color="crimson" if star else "steelblue", zorder=3)  # fmt: skip
        # numbers, not the settings' names, which overlap where settings sit close: the table below names them
        ax.annotate("defaults" if star else str(q["#"]), (q["min_kept"], q["ur_gain_points"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")  # fmt: skip
    ax.axvline(KEEP_SPREAD, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("per-prompt spread kept, the least-kept indifferent attribute (share of unit 0's; mean of runs)")
    ax.set_ylabel("UR rate gain, last generating unit vs unit 0 (points)")
    ax.set_title(
        "What each setting trades: taste learnt against variety kept (* = defaults; numbers: the rows of the "
        "table below)",
        fontsize=9,
    )
    ax.set_xlim(
        min([0.2] + [q["min_kept"] - 0.05 for q in points]), max([1.3] + [q["min_kept"] + 0.35 for q in points])
    )
    ax.grid(alpha=0.3)
    return _png(fig)


# the families of settings the per-unit plot colours: (label, colour, does a part's setting belong to it)
FAMILIES = [
    ("today's defaults", "crimson", lambda label: label == "defaults"),
    ("dpo against the parent", "darkorange", lambda label: "dpo_reference=parent" in label),
    ("supervised", "grey", lambda label: "objective=supervised" in label),
    ("other dpo settings", "steelblue", lambda label: True),
]


def unit_points(parts: dict[str, dict]) -> dict[str, list[tuple[float, float, str]]]:
    """Per taste, every unit after unit 0 of every run: (least-kept indifferent attribute's share of unit 0's
    per-prompt spread, UR rate over unit 0's, the setting's family). Units that did not generate are included:
    the plot shows what training reaches, not what the gate let through."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for part in parts.values():
        label = label_of(part)
        family = next(name for name, _, belongs in FAMILIES if belongs(label))
        for r in part["runs"]:
            ur0 = float(r["ur"]["0"])
            attrs = list(r["indifferent_kept"])
            for unit, ur in r["ur"].items():
                shares = [r["spread_share"][a].get(unit) for a in attrs]
                if unit == "0" or not ur0 or any(v is None for v in shares):
                    continue
                out.setdefault(r["taste"], []).append((float(min(shares)), float(ur) / ur0, family))
    return out


def control_points(entries: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per taste, each unit of `python -m loop.bench fit` (docs/bench/fit.json: one unit fine-tuned on the base's
    own pictures, nothing rated between) as (least-kept indifferent spread, UR rate over the base's)."""
    from loop.tastes import indifferent

    out: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        shares = [e["kept"].get(a) for a in indifferent(e["taste"])]
        if e["ur"][0] and shares and None not in shares:
            out.setdefault(e["taste"], []).append((float(min(shares)), e["ur"][1] / e["ur"][0]))
    return out


def unit_plot(points: dict[str, list[tuple[float, float, str]]], controls: dict | None = None) -> bytes:
    """One panel per taste: every unit of every run at its UR gain against the variety it kept, coloured by the
    setting's family, with the targets' corner (2x, 80%) marked: where the settings lie on one trade-off. With
    `controls` (control_points), bench fit's units too, as black crosses: where fine-tuning lands with nothing
    rated between."""
    controls = controls or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tastes = [t for t in TASTE_NAMES if t in points]
    fig, axes = plt.subplots(1, len(tastes), figsize=(3.6 * len(tastes), 3.8), dpi=100, squeeze=False)
    for ax, taste in zip(axes[0], tastes):
        for name, colour, _ in reversed(FAMILIES):  # today's defaults drawn last, on top
            xs = [x for x, _, f in points[taste] if f == name]
            ys = [y for _, y, f in points[taste] if f == name]
            if xs:
                ax.scatter(xs, ys, s=14, color=colour, alpha=0.75, label=name, zorder=3)
        if controls.get(taste):
            ax.scatter(*zip(*controls[taste]), s=40, marker="x", color="black", zorder=4)
        ax.axvline(KEEP_SPREAD, color="grey", lw=0.8, ls="--")
        ax.axhline(UR_GAIN, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{taste}: the targets' corner is top right", fontsize=9)
        ax.set_xlabel("least-kept indifferent spread (share of unit 0's)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("UR rate, multiple of unit 0's", fontsize=8)
    present = {f for pts in points.values() for _, _, f in pts}
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=n) for n, c, _ in FAMILIES if n in present]
    if any(controls.get(t) for t in tastes):
        handles.append(plt.Line2D([], [], ls="", marker="x", color="black", label="one unit on the base's own "
                                  "pictures (bench fit)"))  # fmt: skip
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    return _png(fig, rect=(0, 0.06, 1, 1))


def report(out: str = "docs") -> dict:
    """Merge every docs/bench/converge_<name>.json into docs/bench/converge.json and docs/convergence.md's
    generated section (between its markers; the prose around it is kept)."""
    outp = Path(out)
    parts = {f.stem.removeprefix("converge_"): json.loads(f.read_text())
             for f in sorted((outp / "bench").glob("converge_*.json"))}  # fmt: skip
    flat, rows = summary(parts)
    points = tradeoff_points(parts)
    doc = {**flat, "defaults": defaults_fingerprint(), "tradeoff": points,
           "parts": {n: {"settings": p["settings"], "minutes": p["minutes"], "runs": p["runs"]}
                     for n, p in parts.items()}}  # fmt: skip
    atomic_write(outp / "bench" / "converge.json", json.dumps(doc, indent=1) + "\n")
    if points:
        atomic_write(outp / "img" / "converge_tradeoff.png", tradeoff_plot(points))
    units = unit_points(parts)
    if units:
        fit = outp / "bench" / "fit.json"
        controls = control_points(json.loads(fit.read_text())) if fit.is_file() else {}
        atomic_write(outp / "img" / "converge_units.png", unit_plot(units, controls))
    md = ["<!-- converge:generated -->", "## The figures (written by `python -m loop.bench converge`)", "",
          f"Targets per taste and strategy, at 3 or more of 4 seeds: the last generating unit's UR rate at least "
          f"{UR_GAIN:g}x unit 0's, every attribute the taste is indifferent to keeping {KEEP_SPREAD:.0%} of unit 0's "
          f"per-prompt spread, and no generating unit losing more than {MAX_FALL * 100:g} points of UR rate.", "",
          "### With the defaults (gate on)", ""]  # fmt: skip
    if rows:
        md += [table(rows), ""]
        md += ["| taste / strategy | seeds run | seeds met |", "|---|---|---|"]
        md += [f"| {t} / {st} | {flat[f'{t}_{st}_seeds']} | {flat[f'{t}_{st}_seeds_met']} |"
               for t in TASTE_NAMES for st in STRATEGIES]  # fmt: skip
        md += ["", f"worst_seeds_met: {flat['worst_seeds_met']}", ""]
    else:
        md += ["Not run yet with today's defaults.", ""]
    md += ["### Every setting tried", "", "![trade-off](img/converge_tradeoff.png)", ""] if points else []
    if points:
        md += [table(points), ""]
    if units:
        md += ["Every unit after unit 0 of every run above, generating or not, by taste:", "",
               "![units](img/converge_units.png)", ""]  # fmt: skip
    for name, part in parts.items():
        if is_defaults(part):
            continue
        md += [f"#### {label_of(part)} (`{name}`)", "", table([run_row(r) for r in part["runs"]]), ""]
    md += ["### What the units draw", "",
           "Rows: strategy, seed, unit (* the unit that generates at the end); columns: the first 4 measuring seeds "
           "of each prompt. One sheet per setting and taste is shown; the other seeds' are linked.", ""]  # fmt: skip
    shown, more = set(), []
    for name, part in sorted(parts.items(), key=lambda kv: (not is_defaults(kv[1]), kv[0])):
        for t in sorted({r["taste"] for r in part["runs"]}, key=TASTE_NAMES.index):
            img = f"img/converge_{name}_{t}.png"
            if not (outp / img).exists():
                continue
            if (label_of(part), t) in shown:
                more.append(f"[{t}, `{name}`]({img})")
                continue
            shown.add((label_of(part), t))
            md += [f"{label_of(part)}, taste {t} (`{name}`):", "", f"![{t}]({img})", ""]
    if more:
        md += ["Other seeds: " + ", ".join(more) + ".", ""]
    md.append("<!-- /converge:generated -->")
    path = outp / "convergence.md"
    text = path.read_text() if path.exists() else "# Convergence without collapse\n"
    atomic_write(path, replace_block(text, md[0], md[-1], "\n".join(md)))
    seeds = {k: v for k, v in flat.items() if k.endswith(("_seeds", "_seeds_met")) or k == "worst_seeds_met"}
    write_section("converge", "## converge\n\nSee [convergence.md](convergence.md): "
                  + ", ".join(f"{k} {v}" for k, v in seeds.items() if k.endswith("_met")) + ".", out)  # fmt: skip
    return doc
