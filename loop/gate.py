"""The promotion gate: a newly trained unit generates only if it keeps the variety of what it learnt from and is
no worse than the unit it would replace.

    loop run --round      the train phase gates the unit it made (gate.enabled)
    loop train            the same, for the unit it made
    loop promote N        overrides a refusal
    loop status           says which unit generates, and why a refused one was refused

Held-out probes: every prompt of the unit's selection at seeds gate.probe_seed + k (k < gate.probes_per_prompt),
seeds no round uses, rendered by the new unit, by the unit it would replace and by unit 0; nothing is written to
generations/. Coverage (Naeem et al. 2020) is measured per prompt against the selection's own images of that
prompt: a unit gone to one mode per prompt covers few of them. The unit passes coverage if its mean coverage over
prompts is at least gate.min_coverage_share of unit 0's coverage of the same selection. A judge, where one
exists (gate.judge: the taste model on gate.model_pairs or more probe pairs, the blind A/B votes between the two
units, or the scripted rater on at most gate.votes probe pairs), must not find it worse than the unit it would
replace by a one-sided sign test at gate.alpha.

"The unit it would replace" is its parent, or, where the parent was refused itself, the unit that generated the
round it learnt from (the newest promoted unit before it).
"""

from __future__ import annotations

import getpass
import json
import time
from collections import OrderedDict

import numpy as np

from loop.config import LoopConfig
from loop.errors import LoopError
from loop.store import Store, raise_missing_unit
from loop.workspace import Workspace, atomic_write

# -- the check ---------------------------------------------------------------------------------------------
# Probes already rendered in this process, by unit: the next round's gate renders the same probes with the unit
# that passed this one and with unit 0 (`loop run --rounds`, the benchmarks). Keyed by the unit's weight files (their
# names, sizes and modification times), the generation and model settings and the prompts' lines, so a retrained
# unit or a changed setting renders afresh. Only the last few units are kept: probes of a large model are large.
RENDERED_UNITS = 4
_RENDERED: OrderedDict[tuple, dict] = OrderedDict()


def _weights_key(ws: Workspace, cfg: LoopConfig, unit: int, lines: dict) -> tuple:
    folder = ws.checkpoint(unit)
    files = () if unit == 0 or not folder.is_dir() else tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".json") and f.name != "manifest.json"
    )  # fmt: skip
    return (str(ws.root), unit, files, repr(cfg.generate), repr(cfg.model), repr(sorted(map(repr, lines.values()))))


def selection_of(ws: Workspace, store: Store, unit: int, log=print) -> tuple[list[str], list, list[str]]:
    """The prompt, the picture (HxWx3 array) and the sha256 of each readable image the unit learnt from (its
    manifest's "images"): the prompt of the image's row; an imported image without one, its caption."""
    from loop.images import load_rgb

    manifest = unit_manifest(ws, store, unit)
    prompts, pictures, shas, missing = [], [], [], 0
    for item in manifest.get("images", []):
        rows = store.image_by_sha(item["sha256"]) if item.get("sha256") else []
        row = rows[0] if rows else (store.image(item["id"]) if item.get("id") is not None else None)
        if row is None:
            missing += 1
            continue
        try:
            pictures.append(load_rgb(ws.inside(row["path"])))
        except Exception:  # missing or undecodable: PIL raises many kinds
            missing += 1
            continue
        prompts.append(row["prompt"] or item.get("caption") or "")
        shas.append(row["sha256"])
    if missing:
        log(f"gate: {missing} image(s) of unit {unit}'s selection could not be read; left out")
    return prompts, pictures, shas


def unit_manifest(ws: Workspace, store: Store, unit: int) -> dict:
    path = ws.checkpoint(unit) / "manifest.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    row = store.unit(unit)
    return json.loads(row["manifest"] or "{}") if row is not None else {}


def replaced_unit(store: Store, unit: int) -> int:
    """The unit `unit` would take over from: its parent if that generates, else the newest promoted one before."""
    row = store.unit(unit)
    parent = row["parent"] if row is not None and row["parent"] is not None else unit - 1
    return store.generating_unit(parent)


def check_unit(ws: Workspace, store: Store, cfg: LoopConfig, unit: int, log=print) -> dict:
    """The gate's verdict on `unit`, with its figures; records nothing (see gate_unit)."""
    from loop.compare import render_unit
    from loop.features import group_rows, image_features, mean_of, per_prompt_prdc
    from loop.metrics import seed_diversity_per_group, sign_test_worse, thumbnail
    from loop.prompts import read_prompts
    from loop.rate.auto import score

    g, ec = cfg.gate, cfg.eval
    t0 = time.time()
    if unit == 0:
        raise LoopError("unit 0 is the base model; the promotion gate never checks it")
    if store.unit(unit) is None:
        raise_missing_unit(store, unit)
    against = replaced_unit(store, unit)

    # 1. the selection, by prompt; the prompts where coverage has a figure (3+ images: loop.metrics.prdc)
    sel_prompts, sel_pictures, sel_shas = selection_of(ws, store, unit, log)
    order = list(dict.fromkeys(sel_prompts))
    counts = {p: sel_prompts.count(p) for p in order}
    measured = [p for p in order if counts[p] >= 3]
    judge = g.judge
    votes = {"new_wins": 0, "parent_wins": 0, "ties": 0}
    if judge == "votes":
        votes = stored_votes(store, unit, against)
        if not sum(votes.values()):
            judge = "none"  # no A/B votes between the two yet: coverage alone decides
    seeds = [g.probe_seed + k for k in range(g.probes_per_prompt)]
    taste = None
    if judge == "model":  # the workspace's taste model (loop.taste_model), fitted on every rating so far
        from loop.taste_model import fit_workspace

        taste = fit_workspace(ws, store, ec)
        if not taste.ready:
            judge = "none"
    judged = order if judge in ("scripted", "model") else []
    rendered = list(dict.fromkeys(measured + judged))
    # the judge's pairs, spread over the prompts: the taste model's cost no one's time, so it judges at least
    # gate.model_pairs of them, with more held-out seeds per prompt where the selection has few prompts
    per_prompt_judged = len(seeds)
    if judge == "model" and judged:
        per_prompt_judged = max(len(seeds), -(-g.model_pairs // len(judged)))
    judge_seeds = [g.probe_seed + k for k in range(per_prompt_judged)]
    pairs = [(p, s) for s in judge_seeds for p in judged]
    if judge == "scripted":
        pairs = pairs[: g.votes]  # it stands in for a person, whose votes cost time
    versus = f"unit {against} and unit 0" if against else "unit 0"
    log(
        f"gate: unit {unit} against {versus}, {len(rendered)} prompt(s) x {len(seeds)} held-out "
        f"seed(s) ({len(measured)} with 3+ selected images for coverage; judge: {judge}"
        f"{f' on {len(pairs)} pairs' if pairs else ''})"
    )

    # 2. render the probes: each unit once, only the prompts it is measured on
    lines = {}
    try:
        for ln in read_prompts(ws.prompts_path)[0]:
            lines.setdefault(ln.text, ln)  # a probe takes its line's options, as the selection's images did
    except (OSError, LoopError):
        pass
    both = list(dict.fromkeys([(p, s) for p in rendered for s in seeds] + pairs))
    needs = {unit: both, against: both}
    needs[0] = list(dict.fromkeys(needs.get(0, []) + [(p, s) for p in measured for s in seeds]))
    images: dict[int, dict] = {}
    for u, probes in needs.items():
        key = _weights_key(ws, cfg, u, lines)
        seen = _RENDERED.get(key, {})
        todo = [pr for pr in probes if pr not in seen]
        if todo:
            t = time.time()
            seen = {**seen, **dict(zip(todo, render_unit(ws, cfg, u, todo, lines)))}
            log(f"gate: rendered {len(todo)} probe(s) with unit {u} in {time.time() - t:.1f}s")
        images[u] = {pr: seen[pr] for pr in probes}
        _RENDERED[key] = seen
        _RENDERED.move_to_end(key)
        while len(_RENDERED) > RENDERED_UNITS:
            _RENDERED.popitem(last=False)

    # 3. coverage of the selection, per prompt, by the new unit, the unit it would replace and unit 0
    per_prompt: dict[str, dict] = {p: {"selection": counts[p]} for p in measured}
    means = {}
    if measured:
        real = group_rows(sel_prompts, image_features(ws, ec, sel_pictures, sel_shas))
        real = {p: real[p] for p in measured}
        for name, u in (("coverage", unit), ("parent_coverage", against), ("base_coverage", 0)):
            keys = [(p, s) for p in measured for s in seeds]
            feats = image_features(ws, ec, [images[u][k] for k in keys])
            fig = per_prompt_prdc(real, group_rows([p for p, _ in keys], feats), ec.k)
            for p, d in fig.items():
                per_prompt[p][name] = round(d["coverage"], 4)
                if u == unit:
                    per_prompt[p]["precision"] = round(d["precision"], 4)
                    per_prompt[p]["recall"] = round(d["recall"], 4)
            means[name] = mean_of(fig, "coverage")
    cov, base = means.get("coverage"), means.get("base_coverage")
    share = cov / base if cov is not None and base else None

    # 4. the judge: the new unit against the one it would replace, at the same prompt and seed
    if judge == "scripted":
        for key in pairs:
            a = score(np.asarray(images[unit][key].convert("RGB")), cfg.rate)
            b = score(np.asarray(images[against][key].convert("RGB")), cfg.rate)
            votes["new_wins" if a > b else "parent_wins" if b > a else "ties"] += 1
    if judge == "model":  # the pairs scored by the expected tier the taste model predicts
        from loop.taste_model import features_of_images

        a = taste.predict(features_of_images(ws, ec, [images[unit][k] for k in pairs]))["score"]
        b = taste.predict(features_of_images(ws, ec, [images[against][k] for k in pairs]))["score"]
        for x, y in zip(a, b):
            votes["new_wins" if x > y else "parent_wins" if y > x else "ties"] += 1
    p_value = sign_test_worse(votes["new_wins"], votes["parent_wins"]) if judge != "none" else None
    p_better = sign_test_worse(votes["parent_wins"], votes["new_wins"]) if judge != "none" else None

    # 5. variety: how much its probes of each prompt differ from one seed to the next, against its parent's
    def variety(u: int) -> dict[str, float | None]:
        groups = [[thumbnail(np.asarray(images[u][(p, s)].convert("RGB"))) for s in seeds] for p in rendered]
        return dict(zip(rendered, seed_diversity_per_group(groups)))

    mine, theirs = variety(unit), variety(against)
    ratios = [mine[p] / theirs[p] for p in rendered if mine[p] is not None and theirs[p]]
    variety_share = float(np.mean(ratios)) if ratios else None
    for p in per_prompt:
        per_prompt[p]["variety_share"] = _r(mine[p] / theirs[p]) if mine[p] is not None and theirs[p] else None

    # 6. the verdict
    reasons, notes = [], []
    if share is None:
        why = "no prompt of its selection has 3 or more images" if not measured else "unit 0 covers none of it"
        notes.append(f"coverage not measured: {why}")
    elif share < g.min_coverage_share:
        reasons.append(
            f"covers {share:.0%} of what unit 0 covers of its selection (coverage {cov:.2f} vs {base:.2f}, "
            f"mean over {sum('coverage' in d for d in per_prompt.values())} prompt(s); < {g.min_coverage_share:.0%})"
        )
    if g.judge == "votes" and judge == "none":
        notes.append(f"no A/B votes between unit {unit} and unit {against} yet: coverage alone decides")
    if g.judge == "model" and judge == "none":
        notes.append(f"no taste model to judge with ({taste.reason}): coverage alone decides")
    elif taste is not None:
        notes.append(f"taste model fitted on {taste.ratings} rating(s), held-out agreement "
                     f"{'-' if taste.agreement is None else f'{taste.agreement:.0%}'}")  # fmt: skip
    if p_value is not None and p_value < g.alpha:
        reasons.append(
            f"the {judge_name(judge)} {'prefer' if judge == 'votes' else 'prefers'} unit {against}: "
            f"{votes['parent_wins']}-{votes['new_wins']}{_ties(votes)}, p={p_value:.3g} < {g.alpha}"
        )
    if g.min_variety_share and variety_share is not None and variety_share < g.min_variety_share:
        if p_better is None:
            notes.append(f"draws {variety_share:.0%} of unit {against}'s variety per prompt; no judge to say "
                         "whether it is better for it")  # fmt: skip
        elif p_better >= g.alpha:
            reasons.append(
                f"draws {variety_share:.0%} of unit {against}'s variety per prompt (< {g.min_variety_share:.0%}) "
                f"and the {judge_name(judge)} {'do' if judge == 'votes' else 'does'} not find it better: "
                f"{votes['new_wins']}-{votes['parent_wins']}{_ties(votes)}, p={p_better:.3g}"
            )
    return {
        "unit": unit,
        "parent": against,
        "passed": not reasons,
        "reasons": reasons,
        "notes": notes,
        "coverage_share": _r(share),
        "coverage": _r(cov),
        "parent_coverage": _r(means.get("parent_coverage")),
        "base_coverage": _r(base),
        "min_coverage_share": g.min_coverage_share,
        "per_prompt": per_prompt,
        "judge": judge,
        "votes": votes,
        "p_value": _r(p_value),
        "p_better": _r(p_better),
        "alpha": g.alpha,
        "variety_share": _r(variety_share),
        "min_variety_share": g.min_variety_share,
        "probes": sum(len(v) for v in images.values()),
        "features": ec.features,
        "seconds": round(time.time() - t0, 2),
    }


def stored_votes(store: Store, unit: int, other: int) -> dict:
    """The blind A/B votes (loop.rate.ab's table, taken-back votes left out) between `unit` and `other`."""
    out = {"new_wins": 0, "parent_wins": 0, "ties": 0}
    if not store.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ab_votes'").fetchone():
        return out  # the A/B tab was never opened here
    undone = (
        "id NOT IN (SELECT vote_id FROM ab_undone)"
        if store.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ab_undone'").fetchone()
        else "1"
    )
    rows = store.db.execute(
        f"SELECT left_unit, right_unit, winner FROM ab_votes WHERE {undone} "
        "AND ((left_unit = ? AND right_unit = ?) OR (left_unit = ? AND right_unit = ?))",
        (unit, other, other, unit),
    )
    for left, right, winner in rows:
        if winner == "tie":
            out["ties"] += 1
        else:
            out["new_wins" if (left if winner == "left" else right) == unit else "parent_wins"] += 1
    return out


# -- recording ---------------------------------------------------------------------------------------------
def gate_unit(ws: Workspace, store: Store, cfg: LoopConfig, unit: int, log=print) -> dict:
    """Gate a newly trained unit (gate.enabled; else it is promoted as it is), record the verdict in its units row
    and in its manifest.json under "gate", and log one line saying which unit generates now."""
    if cfg.gate.enabled:
        result = check_unit(ws, store, cfg, unit, log)
    else:
        result = {"gate": "off", "passed": True, "unit": unit}
    store.set_gate(unit, result, result["passed"])
    write_manifest_gate(ws, unit, result)
    log(verdict_line(store, unit, result))
    return result


def write_manifest_gate(ws: Workspace, unit: int, gate: dict) -> None:
    path = ws.checkpoint(unit) / "manifest.json"
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["gate"] = gate
    atomic_write(path, json.dumps(manifest, indent=2, ensure_ascii=False))


def promote_unit(ws: Workspace, store: Store, unit: int, by: str | None = None) -> int:
    """`loop promote N`: unit N generates whatever the gate said (the override is recorded with who and when).
    Returns the unit that generates now."""
    row = store.unit(unit)
    if row is None:
        raise_missing_unit(store, unit)
    if unit == 0:
        raise LoopError("unit 0 is the base model; it needs no promotion (it generates until a unit passes)")
    if row["promoted"] == 1:
        why = " (by `loop promote`)" if (json.loads(row["gate"] or "{}")).get("overridden") else ""
        raise LoopError(f"unit {unit} is promoted already{why}; unit {store.generating_unit()} generates now")
    gate = store.promote(unit, by or _user())
    write_manifest_gate(ws, unit, gate)
    return store.generating_unit()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return "unknown"


# -- words -------------------------------------------------------------------------------------------------
def judge_name(judge: str) -> str:
    return {"scripted": "scripted judge", "votes": "A/B votes", "model": "taste model"}.get(judge, judge)


def _ties(votes: dict) -> str:
    return f" ({votes['ties']} tie(s))" if votes.get("ties") else ""


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def summary(gate: dict) -> str:
    """'coverage share 0.91, variety 0.97 of unit 1's, scripted judge 18-12, p=0.18': the figures that decided,
    in a few words."""
    if gate.get("gate") == "off":
        return "gate off"
    parts = []
    if gate.get("coverage_share") is not None:
        parts.append(f"coverage share {gate['coverage_share']:.2f}")
    else:
        parts.append("coverage not measured")
    if gate.get("variety_share") is not None:
        parts.append(f"variety {gate['variety_share']:.2f} of unit {gate['parent']}'s")
    if gate.get("judge") not in (None, "none"):
        v = gate["votes"]
        parts.append(
            f"{judge_name(gate['judge'])} {v['new_wins']}-{v['parent_wins']}{_ties(v)}, p={gate['p_value']:.2g}"
        )
    return ", ".join(parts)


def verdict_line(store: Store, unit: int, gate: dict) -> str:
    """One line for the log: promoted (with the figures) or refused (with why, and what to do)."""
    if gate.get("passed"):
        return f"gate: unit {unit} promoted ({summary(gate)}); it generates from now on"
    now = store.generating_unit()
    return (
        f"gate: unit {unit} refused: {'; '.join(gate.get('reasons') or ['failed'])}; unit {now} keeps generating; "
        f"`loop promote {unit}` overrides"
    )


def state_of(store: Store, row) -> tuple[str, str]:
    """(word, why) for `loop status`: generates / promoted / refused / pending / base, and a refusal's reasons."""
    gate = json.loads(row["gate"] or "{}") if row["gate"] else {}
    if row["unit"] == store.generating_unit():
        word = "generates"
    elif row["unit"] == 0:
        word = "base"
    elif row["promoted"] == 1:
        word = "promoted"
    elif row["promoted"] == 0:
        word = "refused"
    else:
        word = "pending"
    why = ""
    if row["promoted"] == 0:
        why = "; ".join(gate.get("reasons") or ["failed the gate"])
    elif gate.get("overridden"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(gate.get("at", 0)))
        refused = "; ".join(gate.get("reasons") or [])
        why = f"promoted by {gate.get('by', '?')} ({when})" + (f" over the gate: {refused}" if refused else "")
    return word, why
