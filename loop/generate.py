"""Generation: K images per line of configs/prompts.txt, in batches, each a self-describing PNG plus a row.

    loop generate [--unit N]            one pass over the prompt file with unit N (default: the current unit)
    loop run --round                    the generate phase of a round

Image k of a prompt uses seed `generate.seed + k` (or the line's `--seed`), so any two units can be compared
at the same seeds. A pass skips the (prompt, seed) pairs this unit already made in this round, so an
interrupted pass resumes instead of starting over.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from loop.config import GenerateConfig, LoopConfig
from loop.errors import LoopError
from loop.images import png_bytes
from loop.models import load_unit, set_scheduler
from loop.store import IMAGE_COLUMNS, Store
from loop.workspace import Workspace, atomic_write, sha256_bytes

# per-line overrides, as in A1111's "prompts from file": `a red circle --n 4 --seed 7 --cfg 5`
LINE_OPTIONS = {"--n": int, "--seed": int, "--steps": int, "--cfg": float, "--neg": str, "--w": int, "--h": int}


@dataclass(frozen=True)
class PromptLine:
    text: str
    lineno: int
    n: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    neg: str | None = None
    w: int | None = None
    h: int | None = None


def parse_line(raw: str, lineno: int) -> PromptLine:
    """One prompt line; raises ValueError naming the bad option."""
    text, sep, rest = raw.partition(" --")
    line = PromptLine(text=text.strip(), lineno=lineno)
    if not sep:
        return line
    tokens = shlex.split("--" + rest)
    values = {}
    i = 0
    while i < len(tokens):
        opt = tokens[i]
        if opt not in LINE_OPTIONS:
            raise ValueError(f"unknown option {opt!r} (use {', '.join(LINE_OPTIONS)})")
        if i + 1 >= len(tokens):
            raise ValueError(f"option {opt} needs a value")
        try:
            values[opt[2:]] = LINE_OPTIONS[opt](tokens[i + 1])
        except ValueError:
            raise ValueError(f"{opt} {tokens[i + 1]!r} is not a valid {LINE_OPTIONS[opt].__name__}") from None
        i += 2
    if values.get("n", 1) <= 0:
        raise ValueError(f"--n must be positive, got {values['n']}")
    return replace(line, **values)


def read_prompts(path: Path) -> tuple[list[PromptLine], list[str]]:
    """The usable lines of a prompt file, and one message per line that could not be used."""
    if not path.exists():
        raise LoopError(f"no prompt file at {path}; write one prompt per line there (`loop init` makes a sample)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoopError(f"{path} is not UTF-8 (byte {e.start}); save it as UTF-8") from e
    lines, problems = [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        try:
            line = parse_line(raw, lineno)
        except ValueError as e:
            problems.append(f"{path.name}:{lineno}: {e}; line skipped")
            continue
        if not line.text:
            problems.append(f"{path.name}:{lineno}: no prompt text before the options; line skipped")
            continue
        lines.append(line)
    if not lines:
        raise LoopError(f"{path} has no prompts; write one prompt per line (lines starting with # are comments)")
    return lines, problems


@dataclass(frozen=True)
class Job:
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int


def plan_jobs(lines: list[PromptLine], g: GenerateConfig, native: int) -> list[Job]:
    jobs = []
    for line in lines:
        base_seed = line.seed if line.seed is not None else g.seed
        for k in range(line.n or g.images_per_prompt):
            jobs.append(
                Job(
                    prompt=line.text,
                    negative=line.neg if line.neg is not None else g.negative_prompt,
                    seed=base_seed + k,
                    steps=line.steps or g.steps,
                    cfg=line.cfg if line.cfg is not None else g.cfg,
                    width=line.w or g.width or native,
                    height=line.h or g.height or native,
                )
            )
    return jobs


def _batches(jobs: list[Job], size: int):
    """Consecutive jobs that share every setting but prompt and seed go through one pipe() call."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) == size or _settings(batch[0]) != _settings(job)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def _settings(j: Job):
    return (j.negative, j.steps, j.cfg, j.width, j.height)


def generate(ws: Workspace, store: Store, cfg: LoopConfig, unit: int, round: int | None = None, log=print) -> dict:
    """One pass over the prompt file with `unit`; returns counts. Already-made (prompt, seed) pairs are skipped."""
    lines, problems = read_prompts(ws.prompts_path)
    for p in problems:
        log(f"warning: {p}")
    round = unit if round is None else round
    g = cfg.generate

    # 1. load the unit once; the scheduler comes from the config
    pipe = load_unit(cfg.model, ws.checkpoint(unit), unit)
    set_scheduler(pipe, g.scheduler)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor

    # 2. plan, leaving out what this unit already made in this round
    done = {(r["prompt"], r["seed"]) for r in store.images(unit=unit, round=round)}
    jobs = [j for j in plan_jobs(lines, g, native) if (j.prompt, j.seed) not in done]
    out_dir = ws.generations(unit)
    out_dir.mkdir(parents=True, exist_ok=True)
    made, t0 = 0, time.time()
    bar = tqdm(total=len(jobs), desc=f"generate unit {unit}", unit="img", disable=not jobs)
    model_name = cfg.model.base

    # 3. one pipe() call per batch; each image is written atomically, then gets its row
    for batch in _batches(jobs, g.batch_size):
        b0 = batch[0]
        with torch.inference_mode():
            images = pipe(
                prompt=[j.prompt for j in batch],
                negative_prompt=[j.negative for j in batch] if b0.negative else None,
                num_inference_steps=b0.steps,
                guidance_scale=b0.cfg,
                width=b0.width,
                height=b0.height,
                generator=[torch.Generator(pipe.device).manual_seed(j.seed) for j in batch],
            ).images
        for job, image in zip(batch, images):
            meta = dict(
                prompt=job.prompt,
                negative_prompt=job.negative,
                seed=job.seed,
                steps=job.steps,
                cfg=job.cfg,
                sampler=g.scheduler,
                width=job.width,
                height=job.height,
                model=model_name,
                unit=unit,
                round=round,
                parent=None,
                strategy=cfg.select.strategy,
                exploration=False,
            )
            data = png_bytes(image, meta)
            sha = sha256_bytes(data)
            path = atomic_write(out_dir / f"{sha[:16]}.png", data)
            cols = {k: meta[k] for k in IMAGE_COLUMNS}
            store.add_image(sha256=sha, path=ws.rel(path), source="generated", params=meta, **cols)
            made += 1
        bar.update(len(batch))
        bar.set_postfix(per_min=f"{made / max(time.time() - t0, 1e-9) * 60:.0f}")
    bar.close()
    return {
        "made": made,
        "skipped": len(done),
        "prompts": len(lines),
        "problems": len(problems),
        "seconds": round_(time.time() - t0),
    }


def round_(x: float) -> float:
    return float(f"{x:.2f}")
