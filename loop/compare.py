"""Compare units side by side: the same probes rendered by each unit, and statistics of what each unit made.

    loop compare --units 0..2 -> cache/compare/compare_grid.png, compare_plot.png, compare.json

The probe set is fixed prompts x fixed seeds (by default the first four prompts of configs/prompts.txt at seeds
1000 and 1001, seeds the generator does not reach soon), so a row of the grid differs from another only by the
unit's weights. The statistics come from the store and the image files: how many images each unit made and how
they were rated, the share of UR among the rated ones, their diversity (Vendi score on cheap colour/layout
features), their seed diversity (how much the images of one prompt differ from seed to seed: a loop that feeds
on itself collapses there first), their near-duplicate rate (64-bit pHash within 4 bits), and their novel hits
(UR images unlike every UR image any unit made before them). See loop/metrics.py for the formulas.

The output leads with what shows a collapse where it happens: per unit and prompt, the precision, recall, density
and coverage (Naeem et al. 2020) of the unit's images against the images it was trained on (its manifest.json) and
against the base model's images, on eval.features; a unit whose coverage of its selection falls below
eval.min_coverage_share of the base's coverage of the same selection is named, with the prompts that lost the most.
A loop that feeds on itself can draw one picture per prompt while the Vendi score across prompts rises.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loop.config import TIERS, EvalConfig
from loop.errors import LoopError
from loop.features import image_features, mean_of, per_prompt_prdc
from loop.images import load_rgb
from loop.metrics import (
    NEAR_DUPLICATE_BITS,
    NOVEL_HIT_THRESHOLD,
    features,
    near_duplicate_rate,
    novel_hits,
    phash,
    seed_diversity_from,
    seed_diversity_per_group,
    spread,
    thumbnail,
    vendi_score,
)
from loop.workspace import atomic_write, unit_name

DEFAULT_PROMPTS = ("a circle", "a square", "a triangle", "a ring")  # when configs/prompts.txt can't be read
DEFAULT_SEEDS = (1000, 1001)
PROBE_PROMPTS = 4  # the first N usable lines of configs/prompts.txt

# grid layout: a label column on the left, a label row on top, then one cell per (unit, probe), no gaps
GRID_LABEL_W = 64  # "unit N"
GRID_LABEL_H = 30  # prompt, then "seed S", one line each; a prompt wider than its cell wraps onto more lines
GRID_LINE_H = 14  # one more line of a wrapped prompt
GRID_FONT_SIZE = 10
GRID_CELL_MIN = 96  # images are upscaled (NEAREST, by a whole factor) until both sides are at least this
GRID_BG = (255, 255, 255)
GRID_INK = (0, 0, 0)

# a prompt whose seed diversity fell by this share or more against the parent unit, beyond the fall of the unit's
# average, is named as collapsing
COLLAPSE_DROP = 0.4
STATS_CAP = 512  # images per unit for the Vendi score and the near-duplicate rate (evenly spaced in time)
WEIGHTS = "pytorch_lora_weights.safetensors"


# -- probes and units --------------------------------------------------------------------------------------
def probe_set(ws, probes: list[str] | None = None, seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """(prompt, seed) pairs, prompt-major: every prompt at every seed."""
    if probes is None:
        from loop.prompts import read_prompts

        try:
            lines, _ = read_prompts(ws.prompts_path)
            probes = [ln.text for ln in lines[:PROBE_PROMPTS]]
        except LoopError:
            probes = list(DEFAULT_PROMPTS)
    seeds = list(DEFAULT_SEEDS) if seeds is None else list(seeds)
    if not probes or not seeds:
        raise LoopError("compare needs at least one probe prompt and one seed")
    return [(p, int(s)) for p in probes for s in seeds]


def probe_lines(ws) -> dict:
    """prompt -> its configs/prompts.txt line (PromptLine: per-line --neg, --steps, --cfg, --w, --h), for the
    probes taken from there; {} when the file cannot be read."""
    from loop.prompts import read_prompts

    try:
        lines, _ = read_prompts(ws.prompts_path)
    except LoopError:
        return {}
    out = {}
    for ln in lines[:PROBE_PROMPTS]:
        out.setdefault(ln.text, ln)
    return out


def units_with_weights(ws) -> list[int]:
    """Unit 0 (the base model) and every unit whose checkpoint folder has LoRA weights."""
    found = {0}
    for folder in (ws.root / "checkpoints").glob("unit_*"):
        tail = folder.name[len("unit_") :]
        if tail.isdigit() and (folder / WEIGHTS).exists():
            found.add(int(tail))
    return sorted(found)


def check_units(ws, units: list[int]) -> list[int]:
    """The units in the order given, without repeats; LoopError naming the first one that can't be loaded."""
    if not units:
        raise LoopError("compare needs at least one unit, for example `loop compare --units 0..1`")
    out: list[int] = []
    for u in units:
        u = int(u)
        if u < 0 or (u > 0 and not (ws.checkpoint(u) / WEIGHTS).exists()):
            if u < 0:
                why = "is not a unit number"
            elif not ws.checkpoint(u).is_dir():
                why = "does not exist"
            else:
                why = f"has no weights at checkpoints/{unit_name(u)}/{WEIGHTS}"
            have = ", ".join(map(str, units_with_weights(ws)))
            raise LoopError(f"unit {u} {why}; units that can be compared here: {have}")
        if u not in out:
            out.append(u)
    return out


# -- rendering ---------------------------------------------------------------------------------------------
def probe_jobs(cfg, probes: list[tuple[str, int]], native: int, lines: dict | None = None) -> list:
    """The generator's Jobs for the probes (loop.generate.line_jobs, one image at the probe's seed): a probe from
    a prompts.txt line takes that line's options (negative prompt, steps, CFG, size), so the grid shows what the
    ring draws."""
    from loop.generate import line_jobs
    from loop.prompts import PromptLine

    lines = lines or {}
    one = [dataclasses.replace(lines.get(p) or PromptLine(text=p, lineno=0), n=1, seed=s) for p, s in probes]
    return [line_jobs(line, cfg.generate, native)[0] for line in one]


def render_unit(
    ws, cfg, unit: int, probes: list[tuple[str, int]], lines: dict | None = None, jobs_out: list | None = None
) -> list[Image.Image]:
    """Every probe with one unit, batched as the generator batches (jobs that share their settings go through one
    pipe() call), through its Renderer: the unit's scheduler and modifier token, and each probe's settings
    (probe_jobs). `jobs_out`, if empty, receives the jobs."""
    import torch

    from loop.generate import Renderer, _batches

    renderer = Renderer(ws, None, cfg, unit)  # render only: nothing is written, so no store
    try:
        jobs = probe_jobs(cfg, probes, renderer.native, lines)
        if jobs_out is not None and not jobs_out:
            jobs_out.extend(jobs)
        return [im for batch in _batches(jobs, max(1, len(jobs))) for im in renderer.render(batch)]
    finally:
        device = renderer.pipe.device
        del renderer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cell_size(width: int, height: int, minimum: int = GRID_CELL_MIN) -> tuple[int, int]:
    """The cell an image of this size fills: scaled by the smallest whole factor that makes both sides >= minimum
    (never shrunk), so NEAREST upscaling keeps every pixel square."""
    factor = max(1, math.ceil(minimum / max(1, min(width, height))))
    return width * factor, height * factor


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis so that it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_image(
    rows: list[tuple[int | str, list[Image.Image]]],
    probes: list[tuple[str, int]],
    label_w: int = GRID_LABEL_W,
    cell_min: int = GRID_CELL_MIN,
    log=None,
) -> Image.Image:
    """Units as rows (a row's label: "unit N" for an int, else the text given), probes as columns. Size:
    (label_w + columns * cell_w, label_h + rows * cell_h), the cell size given by the first image (cell_size
    with `cell_min`); label_h (also in `.info["label_h"]`) is GRID_LABEL_H, plus GRID_LINE_H for each line more
    that the longest prompt wraps onto. The labels' font draws the prompts' characters (loop.fonts.label_font);
    where no installed font does, one line to `log` (default: a warning) names them and the package to install."""
    from loop.fonts import FONT_HINT, label_font, wrap

    first = rows[0][1][0]
    cw, ch = cell_size(first.width, first.height, cell_min)
    row_labels = [f"unit {unit}" if isinstance(unit, int) else str(unit) for unit, _ in rows]
    font, lacking = label_font([p for p, _ in probes] + row_labels, GRID_FONT_SIZE)
    if lacking:
        shown = "".join(sorted(lacking)[:12]) + ("…" if len(lacking) > 12 else "")
        msg = f"compare grid: no installed font draws {len(lacking)} character(s) of the labels ({shown}); {FONT_HINT}"
        if log is None:
            import warnings

            warnings.warn(msg, stacklevel=2)
        else:
            log(msg)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap(measure, prompt, font, cw - 4) for prompt, _ in probes]
    top = GRID_LABEL_H + (max(map(len, wrapped), default=1) - 1) * GRID_LINE_H
    out = Image.new("RGB", (label_w + len(probes) * cw, top + len(rows) * ch), GRID_BG)
    out.info["label_h"] = top
    draw = ImageDraw.Draw(out)
    for c, (lines, (_, seed)) in enumerate(zip(wrapped, probes)):
        x = label_w + c * cw + 2
        for k, line in enumerate(lines):
            draw.text((x, 2 + k * GRID_LINE_H), line, fill=GRID_INK, font=font)
        seed_y = GRID_LABEL_H // 2 + (len(lines) - 1) * GRID_LINE_H
        draw.text((x, seed_y), _fit(draw, f"seed {seed}", font, cw - 4), fill=GRID_INK, font=font)
    for r, ((_, images), label) in enumerate(zip(rows, row_labels)):
        y = top + r * ch
        draw.text((4, y + ch // 2 - 6), _fit(draw, label, font, label_w - 6), fill=GRID_INK, font=font)
        for c, im in enumerate(images):
            # fitted into the cell, its shape kept (a probe line's --w/--h may differ from the first image's)
            k = min(cw / im.width, ch / im.height)
            w, h = max(1, round(im.width * k)), max(1, round(im.height * k))
            cell = im.convert("RGB").resize((w, h), Image.Resampling.NEAREST)
            out.paste(cell, (label_w + c * cw + (cw - w) // 2, y + (ch - h) // 2))
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- statistics --------------------------------------------------------------------------------------------
def unit_stats(
    ws,
    store,
    units: list[int],
    log=print,
    cap: int = STATS_CAP,
    threshold: float = NOVEL_HIT_THRESHOLD,
    ec: EvalConfig | None = None,
) -> list[dict]:
    """One dict per unit: images, rated, tiers (count per tier), ur_rate (UR / rated; None with no ratings),
    vendi and near_dup_rate (over at most `cap` of its images; None with no readable image), seed_diversity
    (over the same images, txt2img only, grouped by prompt; None without two images of one prompt) and
    seed_diversity_by_prompt (each prompt's), collapsing (the prompts whose seed diversity fell by COLLAPSE_DROP
    or more against the parent unit beyond the fall of the unit's average, when the parent is among `units`),
    novel_hits, and the per-prompt precision, recall, density and coverage of its selection and of unit 0's images
    (see coverage_stats; features and k from `ec`, eval.* in the config).

    Novel hits are judged over the UR images of ALL units (imported images, which no unit made, are left out)
    in the order they were stored (row id): a unit is credited with each of its UR images that is farther than
    `threshold` from every earlier UR image, whichever unit made that one; features are centred on the mean
    feature of unit 0's images (the base model's), as the longtail selection's are (loop.select.novelty_centre).
    """
    cache: dict[int, tuple[np.ndarray, int, np.ndarray] | None] = {}
    missing: list[str] = []

    def load(row) -> tuple[np.ndarray, int, np.ndarray] | None:
        if row["id"] not in cache:
            try:
                rgb = load_rgb(ws.root / row["path"])
                thumb = thumbnail(rgb)
                cache[row["id"]] = (features(rgb, thumb), phash(rgb), thumb)
            except (OSError, ValueError):
                cache[row["id"]] = None
                missing.append(row["path"])
        return cache[row["id"]]

    ur = [(r, load(r)) for r in store.images() if r["tier"] == "UR" and r["unit"] is not None]
    ur = [(r, x) for r, x in ur if x is not None]
    from loop.select import novelty_centre  # the same centre the longtail selection measures novelty from

    centre = novelty_centre(ws, store, feature_of=lambda r: (load(r) or (None,))[0])  # reuses what load() read
    hits = novel_hits([x[0] for _, x in ur], threshold, centre)
    hits_by_unit = Counter(r["unit"] for (r, _), hit in zip(ur, hits) if hit)

    out = []
    samples: dict[int, list] = {}  # unit -> its sampled txt2img rows that could be read (for coverage_stats)
    for u in units:
        rows = store.images(unit=u)
        tiers = {t: 0 for t in TIERS}
        for r in rows:
            if r["tier"] in tiers:
                tiers[r["tier"]] += 1
        rated = sum(tiers.values())
        sample = [(r, x) for r in spread(rows, cap) for x in [load(r)] if x is not None]
        got = [x for _, x in sample]
        by_prompt = defaultdict(list)  # txt2img images only: seeds of one prompt (img2img copies a parent by design)
        for r, x in sample:
            if r["parent_id"] is None:
                by_prompt[r["prompt"]].append(x[2])
        samples[u] = [r for r, _ in sample if r["parent_id"] is None]
        per_prompt = dict(zip(by_prompt, seed_diversity_per_group([np.stack(g) for g in by_prompt.values()])))
        out.append(
            dict(
                unit=u,
                images=len(rows),
                rated=rated,
                tiers=tiers,
                ur_rate=tiers["UR"] / rated if rated else None,
                vendi=vendi_score(np.stack([x[0] for x in got])) if got else None,
                near_dup_rate=near_duplicate_rate([x[1] for x in got], NEAR_DUPLICATE_BITS) if got else None,
                seed_diversity=seed_diversity_from(per_prompt.values()),
                seed_diversity_by_prompt={p: round(d, 4) for p, d in per_prompt.items() if d is not None},
                novel_hits=int(hits_by_unit.get(u, 0)),
            )
        )
    # a prompt that collapsed: against the unit's parent (when both are compared here), its seed diversity fell by
    # COLLAPSE_DROP or more beyond what the unit's average did. A taste narrows every prompt in a first round (the
    # average halves: docs/strategies.md), which is not a collapse; one prompt falling far below the rest is, and
    # the average hides it
    by_unit = {s["unit"]: s for s in out}
    for s in out:
        row = store.unit(s["unit"])
        parent = by_unit.get(row["parent"]) if row is not None and row["parent"] is not None else None
        s["collapsing"] = []
        if parent is None or not s["seed_diversity"] or not parent["seed_diversity"]:
            continue
        overall = min(1.0, s["seed_diversity"] / parent["seed_diversity"])
        for p, d in s["seed_diversity_by_prompt"].items():
            before = parent["seed_diversity_by_prompt"].get(p)
            if before and d <= (1 - COLLAPSE_DROP) * overall * before:
                s["collapsing"].append(
                    {"prompt": p, "parent": parent["unit"], "before": before, "after": d, "overall": round(overall, 4)}
                )
    # 4. per prompt: how each unit covers what it was trained on, against how the base model covers it
    if 0 not in samples:
        samples[0] = [r for r in spread(store.images(unit=0), cap) if r["parent_id"] is None and load(r) is not None]
    figures = coverage_stats(ws, store, units, ec or EvalConfig(), samples, lambda r: (load(r) or (None,))[0])
    for s in out:
        s.update(figures[s["unit"]])
    if missing:
        log(f"warning: {len(missing)} image file(s) could not be read and were left out (first: {missing[0]})")
    return out


def selection_rows(ws, store, unit: int) -> list[tuple] | None:
    """The store rows of the images unit `unit` was trained on (checkpoints/unit_NNN/manifest.json "images": id,
    sha256, caption), each as (row, prompt): the row's prompt, or the caption where the row has none (an imported
    image). Found by id, or by sha256 where the id names another file. None when the unit has no manifest; an
    entry the store does not hold is left out."""
    try:
        doc = json.loads((ws.checkpoint(unit) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out = []
    for it in doc.get("images") or []:
        sha = it.get("sha256")
        row = store.image(int(it["id"])) if it.get("id") is not None else None
        if row is None or (sha and row["sha256"] != sha):
            got = store.image_by_sha(sha) if sha else []
            row = got[0] if got and got[0]["sha256"] == sha else None
        if row is not None:
            out.append((row, row["prompt"] or it.get("caption") or ""))
    return out


def coverage_stats(ws, store, units: list[int], ec: EvalConfig, samples: dict[int, list], cheap) -> dict:
    """Per unit, the figures that show a collapse within a prompt (Naeem et al. 2020's precision, recall, density
    and coverage, loop.metrics.prdc, on `ec.features`, prompt by prompt):

    selection_by_prompt   the unit's txt2img images (`samples[unit]`) against the images it was trained on
                          (selection_rows); unit 0, which has none, against unit 1's selection (selection_unit)
    base_coverage_by_prompt  unit 0's coverage of that same selection: what the base model already spans
    vs_base_by_prompt     the unit's images against unit 0's images of the prompt (empty for unit 0)
    selection_coverage, base_selection_coverage  the means over the prompts both have
    coverage_share        selection_coverage / base_selection_coverage (None where either is missing or the base
                          covers nothing); collapsed: below ec.min_coverage_share
    coverage_lost         the prompts the unit covers less of than the base, largest drop first

    A fake set never counts an image of its real set (the base's images of round 0 ARE unit 1's selection: they
    would cover themselves), so each comparison leaves those out. `cheap(row)`: the image's cheap feature
    (loop.metrics.features, which eval.features=cheap is), None where the file cannot be read.
    """
    feats: dict[int, np.ndarray] = {}

    def grouped(pairs: list[tuple]) -> dict[str, list[tuple[int, np.ndarray]]]:
        """(row, prompt) pairs -> prompt -> [(image id, feature)], computing each image's feature once."""
        todo = [r for r, _ in pairs if r["id"] not in feats]
        if ec.features == "cheap":  # image_features would read the files again for what unit_stats has
            feats.update({r["id"]: cheap(r) for r in todo})
            todo = []
        for i in range(0, len(todo), 256):  # a model's embeddings are cached; this bounds the images held at once
            chunk = todo[i : i + 256]
            rows = image_features(ws, ec, [ws.root / r["path"] for r in chunk], [r["sha256"] for r in chunk])
            feats.update({r["id"]: f for r, f in zip(chunk, rows)})
        out = defaultdict(list)
        for r, p in pairs:
            out[p].append((r["id"], feats[r["id"]]))
        return out

    def figures(real: dict, fake: dict) -> dict[str, dict]:
        """per_prompt_prdc of fake against real, each fake set less the images its real set holds."""
        reals, fakes = {}, {}
        for p, items in real.items():
            ids = {i for i, _ in items}
            kept = [f for i, f in fake.get(p, []) if i not in ids]
            if kept:
                reals[p], fakes[p] = np.stack([f for _, f in items]), np.stack(kept)
        return {p: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
                for p, d in per_prompt_prdc(reals, fakes, ec.k).items()}  # fmt: skip

    own = {u: grouped([(r, r["prompt"]) for r in samples.get(u, [])]) for u in {0, *units}}
    selections: dict[int, dict | None] = {}

    def selection(u: int) -> dict | None:
        if u not in selections:
            rows = selection_rows(ws, store, u)
            selections[u] = None if rows is None else grouped([(r, p) for r, p in rows if cheap(r) is not None])
        return selections[u]

    out = {}
    for u in units:
        sel_unit = u if u > 0 else (1 if selection(1) is not None else None)
        sel = selection(sel_unit) if sel_unit is not None else None
        by_prompt = figures(sel, own[u]) if sel else {}
        base = figures(sel, own[0]) if sel else {}
        both = [p for p in by_prompt if p in base]
        cov = mean_of({p: by_prompt[p] for p in both}, "coverage")
        base_cov = mean_of({p: base[p] for p in both}, "coverage")
        share = cov / base_cov if cov is not None and base_cov else None
        lost = sorted(
            ({"prompt": p, "base": base[p]["coverage"], "unit": by_prompt[p]["coverage"]} for p in both
             if by_prompt[p]["coverage"] < base[p]["coverage"]),
            key=lambda d: d["unit"] - d["base"],
        )  # fmt: skip
        out[u] = dict(
            selection_unit=sel_unit if sel is not None else None,
            selection_by_prompt=by_prompt,
            base_coverage_by_prompt={p: d["coverage"] for p, d in base.items()},
            vs_base_by_prompt=figures(own[0], own[u]) if u != 0 else {},
            selection_coverage=None if cov is None else round(cov, 4),
            base_selection_coverage=None if base_cov is None else round(base_cov, 4),
            coverage_share=None if share is None else round(share, 4),
            collapsed=share is not None and share < ec.min_coverage_share,
            coverage_lost=lost,
        )
    return out


# -- plot --------------------------------------------------------------------------------------------------
def plot_png(stats: list[dict]) -> bytes:
    """Three bar charts side by side: UR rate, Vendi diversity and seed diversity per unit ("n/a" where
    undefined)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [f"unit {s['unit']}" for s in stats]
    fig = Figure(figsize=(max(10.0, 1.8 * len(stats) + 4.5), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = (  # key, title, y label, bar label format, lowest top of the y axis
        ("ur_rate", "UR rate (UR / rated)", "UR rate", "{:.0%}", 1.1 / 1.15),
        ("vendi", "Vendi diversity", "effective images", "{:.2f}", 1.0),
        ("seed_diversity", "seed diversity (within a prompt)", "RMS difference", "{:.3f}", 0.1),
    )
    for k, (key, title, ylabel, fmt, floor) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        values = [s[key] for s in stats]
        bars = ax.bar(names, [0.0 if v is None else v for v in values], color="#4c72b0")
        for bar, v in zip(bars, values):
            label = "n/a" if v is None else fmt.format(v)
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        top = [floor] + ([] if key == "ur_rate" else [v for v in values if v is not None])  # a rate stops at 1
        ax.set_ylim(0, max(top) * 1.15)
        ax.tick_params(axis="x", labelrotation=30 if len(stats) > 6 else 0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- the command -------------------------------------------------------------------------------------------
def compare(
    ws,
    store,
    cfg,
    units: list[int],
    out_dir: Path | None = None,
    probes: list[str] | None = None,
    seeds: list[int] | None = None,
    log=print,
) -> dict:
    """Render the probe grid for `units`, compute their statistics, and write compare_grid.png, compare_plot.png
    and compare.json under `out_dir` (default <workspace>/cache/compare). Returns
    {"grid": Path, "plot": Path, "units": [per-unit stats, see unit_stats], "probes": [...], "eval": eval.*,
    "collapsed": [the units whose coverage_share is below eval.min_coverage_share], ...}."""
    units = check_units(ws, units)  # before any rendering: a typo fails at once
    pairs = probe_set(ws, probes, seeds)
    lines = probe_lines(ws) if probes is None else {}
    out_dir = Path(out_dir) if out_dir is not None else ws.root / "cache" / "compare"
    rows, jobs = [], []
    for u in units:
        log(f"compare: rendering {len(pairs)} probe(s) with unit {u}")
        rows.append((u, render_unit(ws, cfg, u, pairs, lines, jobs_out=jobs)))
    grid = atomic_write(out_dir / "compare_grid.png", _png(grid_image(rows, pairs, log=log)))
    log("compare: statistics from the store")
    stats = unit_stats(ws, store, units, log=log, ec=cfg.eval)
    plot = atomic_write(out_dir / "compare_plot.png", plot_png(stats))
    result = {
        "grid": grid,
        "plot": plot,
        "units": stats,
        "probes": [
            {
                "prompt": j.prompt,
                "seed": j.seed,
                "negative_prompt": j.negative,
                "steps": j.steps,
                "cfg": j.cfg,
                "width": j.width,
                "height": j.height,
            }
            for j in jobs
        ],  # fmt: skip
        "novel_hit_threshold": NOVEL_HIT_THRESHOLD,
        "near_duplicate_bits": NEAR_DUPLICATE_BITS,
        "stats_cap": STATS_CAP,
        "eval": dataclasses.asdict(cfg.eval),
        "collapsed": [s["unit"] for s in stats if s["collapsed"]],
    }
    data = {**result, "grid": str(grid), "plot": str(plot)}
    result["json"] = atomic_write(out_dir / "compare.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return result


def _table(head: list[str], body: list[list[str]], left: int = 0) -> list[str]:
    """Plain-text columns under a dashed rule; the first `left` columns flush left, the rest right."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def coverage_lines(result: dict) -> list[str]:
    """What leads compare's output: per unit and prompt, how the unit's images cover its selection (and the base's
    images), then a line for each unit that collapsed, naming the prompts that lost the most."""
    ev = result.get("eval") or dataclasses.asdict(EvalConfig())
    head = ["unit", "prompt", "cov sel", "base cov", "recall sel", "precision", "cov unit 0"]
    body = []
    for s in result["units"]:
        sel, vs0 = s.get("selection_by_prompt") or {}, s.get("vs_base_by_prompt") or {}
        base = s.get("base_coverage_by_prompt") or {}
        for p in [*sel, *(p for p in vs0 if p not in sel)]:
            a, b = sel.get(p) or {}, vs0.get(p) or {}
            body.append([
                str(s["unit"]),
                _fit_text(p, 32),
                _share(a.get("coverage")),
                _share(base.get(p)),
                _share(a.get("recall")),
                _share(a.get("precision")),
                _share(b.get("coverage")),
            ])  # fmt: skip
    if not body:
        return ["per-prompt coverage: nothing to compare yet (it needs a trained unit's manifest.json, or unit 0's "
                "images, with 3 or more readable images of a prompt on each side)"]  # fmt: skip
    lines = [
        f"per prompt, against the unit's own selection (sel) and unit 0's images (features: {ev['features']}, "
        f"k={ev['k']}):",
        *_table(head, body, left=2),
        "(cov sel: the share of the selection's images it draws something near, unit 0 against unit 1's selection;",
        " base cov: the same for unit 0; recall sel / precision: how much of the selection it reaches / how much of",
        " what it draws lies near the selection; cov unit 0: the share of unit 0's images it draws something near)",
    ]
    for s in result["units"]:
        if not s.get("collapsed"):
            continue
        lost = ", ".join(f"{d['prompt']!r} ({d['base']:.2f} -> {d['unit']:.2f})" for d in s["coverage_lost"][:3])
        lines.append(
            f"unit {s['unit']} collapsed: it covers {s['selection_coverage']:.0%} of what its selection spans, "
            f"against {s['base_selection_coverage']:.0%} for the base (share {s['coverage_share']:.2f} < "
            f"{ev['min_coverage_share']:g})" + (f"; lost most: {lost}" if lost else "")
        )
    return lines


def _fit_text(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(result: dict) -> str:
    """Per prompt, each unit's coverage of its selection and any collapse (coverage_lines); then the per-unit
    statistics, one row per unit; then where the files are."""
    head = ["unit", "images", "rated", *TIERS, "UR rate", "vendi", "seed div", "lowest", "near-dup", "novel"]
    body = []
    for s in result["units"]:
        body.append(
            [
                str(s["unit"]),
                str(s["images"]),
                str(s["rated"]),
                *(str(s["tiers"].get(t, 0)) for t in TIERS),
                "-" if s["ur_rate"] is None else f"{s['ur_rate']:.1%}",
                "-" if s["vendi"] is None else f"{s['vendi']:.2f}",
                "-" if s["seed_diversity"] is None else f"{s['seed_diversity']:.3f}",
                "-" if not s.get("seed_diversity_by_prompt") else f"{min(s['seed_diversity_by_prompt'].values()):.3f}",
                "-" if s["near_dup_rate"] is None else f"{s['near_dup_rate']:.1%}",
                str(s["novel_hits"]),
            ]
        )
    lines = [*coverage_lines(result), "", *_table(head, body)]
    lines.append("(seed div: within a prompt, averaged over the prompts; lowest: the prompt that varies least)")
    for s in result["units"]:
        for c in s.get("collapsing", []):
            drop = 1 - c["after"] / c["before"]
            lines.append(
                f"collapsing? unit {s['unit']}: {c['prompt']!r} varies {drop:.0%} less from seed to seed than in "
                f"unit {c['parent']} ({c['before']:.3f} -> {c['after']:.3f}; all prompts: {1 - c['overall']:.0%} "
                "less); look at its images"
            )
    for key in ("grid", "plot"):
        if result.get(key):
            lines.append(f"{key}: {result[key]}")
    return "\n".join(lines)
