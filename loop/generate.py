"""Generation: the prompt ring buffer, one-pass rounds, and img2img variations. Every image is a
self-describing PNG, written atomically, then its row.

    loop generate                       one pass over configs/prompts.txt with the unit that generates
    loop generate --forever             the prompt file as a ring, until SIGINT/SIGTERM
    loop generate --count K             K images from the ring, then stop (the next run continues)
    loop generate --processes N         the same, split between N processes (accelerate)
    loop vary IMAGE --n K --strength S  img2img variations of an image, linked to their parent
    loop run --round                    the generate phase of a round is one pass

Seeds: image k of a line uses `seed + k` in a pass (so any two units can be compared at the same seeds) and
`seed + cycle*n + k` in the ring's later cycles. Process r of N makes the images whose k % N == r, so no seed
is made twice. Before each batch the store is asked which seeds this unit already made for the prompt, so an
interrupted pass or slot resumes instead of redoing work.

Stopping: the first SIGINT or SIGTERM sets a flag. The batch being denoised is discarded at its next step;
a batch being written is finished (file, then row). A second Ctrl-C stops at once; the next command then
adopts any file whose row was not yet written (workspace.recover).

Speed: one pipe() call per batch, torch.inference_mode, diffusers' SDPA attention processor (its default),
the scheduler from config (DPM++ by default); on GPU fp16, channels_last and optionally torch.compile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from loop import memory, noise_prior
from loop.config import MAX_SEED, GenerateConfig, LoopConfig
from loop.errors import LoopError
from loop.images import png_bytes, schedule_type, to_rgb
from loop.models import load_unit, set_scheduler, unit_trigger
from loop.prompts import LINE_OPTIONS, PromptLine, Ring, parse_line, read_prompts  # noqa: F401 (re-exported)
from loop.store import IMAGE_COLUMNS, Store
from loop.workspace import Workspace, atomic_write, sha256_bytes

SEED_RANGE = MAX_SEED + 1  # a seed + k past the top (SQLite's integers) wraps round to 0


# -- stopping ----------------------------------------------------------------------------------------------
class Stopped(Exception):
    """Raised between denoising steps once a stop was asked for: the batch is discarded."""


class StopFlag:
    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop") -> None:
        self.reason = reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


@contextlib.contextmanager
def stop_on_signals(log=print):
    """SIGINT/SIGTERM set the returned flag; a second SIGINT raises KeyboardInterrupt (stop now)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set(signal.Signals(signum).name)
        log(f"{signal.Signals(signum).name}: stopping after the images being written (Ctrl-C again: stop now)")

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- processes ---------------------------------------------------------------------------------------------
def process_share() -> tuple[int, int]:
    """(rank, world) under `accelerate launch` (or torchrun); (0, 1) in a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    # cpu=True without a GPU: accelerate otherwise ignores WORLD_SIZE on CPU-only machines
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


# -- jobs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    lineno: int = 0
    parent: dict | None = field(default=None, compare=False)  # img2img: the parent's row (id, sha256, path)
    strength: float | None = None


def line_jobs(line: PromptLine, g: GenerateConfig, native: int, cycle: int = 0, rank: int = 0, world: int = 1):
    """The jobs of one line in one cycle of the ring; this process's share of them."""
    n = line.n or g.images_per_prompt
    base_seed = (line.seed if line.seed is not None else g.seed) + cycle * n
    return [
        Job(
            prompt=line.text,
            negative=line.neg if line.neg is not None else g.negative_prompt,
            seed=(base_seed + k) % SEED_RANGE,
            steps=line.steps or g.steps,
            cfg=line.cfg if line.cfg is not None else g.cfg,
            width=line.w or g.width or native,
            height=line.h or g.height or native,
            lineno=line.lineno,
        )
        for k in range(n)
        if k % world == rank
    ]


def plan_jobs(
    lines: list[PromptLine], g: GenerateConfig, native: int, rank: int = 0, world: int = 1, cycle: int = 0
) -> list[Job]:
    return [j for line in lines for j in line_jobs(line, g, native, cycle, rank, world)]


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


def unmade(store: Store, unit: int, jobs: list[Job]) -> list[Job]:
    """The jobs whose (prompt, seed) this unit hasn't made yet: one store query per distinct prompt."""
    seeds: dict[str, list[int]] = {}
    for j in jobs:
        seeds.setdefault(j.prompt, []).append(j.seed)
    done = {p: store.made_seeds(unit, p, s) for p, s in seeds.items()}
    return [j for j in jobs if j.seed not in done[j.prompt]]


def _settings(j: Job):
    return (j.negative, j.steps, j.cfg, j.width, j.height, j.strength)


# -- rendering and writing ---------------------------------------------------------------------------------
def tune_for_speed(pipe, g: GenerateConfig) -> None:
    """GPU-only layout and compilation; on CPU these cost more than they give for our model sizes."""
    if pipe.device.type != "cuda":
        return
    if g.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if g.compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")


class Renderer:
    """One loaded unit: turns batches of jobs into PNG files and their rows."""

    def __init__(
        self, ws: Workspace, store: Store | None, cfg: LoopConfig, unit: int, round: int | None = None, stop=None
    ):  # store=None: render only (loop compare)
        self.ws, self.store, self.cfg, self.unit = ws, store, cfg, unit
        self.round = unit if round is None else round
        self.stop = stop if stop is not None else StopFlag()
        self.pipe = load_unit(cfg.model, ws.checkpoint(unit), unit)
        # a Custom Diffusion unit's modifier token goes before every prompt (the row keeps the file's prompt)
        self.trigger = unit_trigger(ws.checkpoint(unit)) if unit > 0 else ""
        # a unit's noise prior (loop.noise_prior): its txt2img pictures start from initial noises moved towards
        # where the base draws what the person likes
        self.prior = noise_prior.load(ws.checkpoint(unit)) if unit > 0 else None
        set_scheduler(self.pipe, cfg.generate.scheduler)
        self.schedule_type = schedule_type(self.pipe.scheduler.config, cfg.generate.scheduler)  # (A1111 1.9+)
        tune_for_speed(self.pipe, cfg.generate)
        if cfg.generate.vae_slicing:  # decode a batch one image at a time (the same images, less memory)
            self.pipe.vae.enable_slicing()
        if cfg.generate.vae_tiling:  # decode each image in overlapping tiles
            self.pipe.vae.enable_tiling()
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        # img2img input sides: multiples of the VAE's and the UNet's downsampling together (at least 8)
        downs = 2 ** max(0, len(self.pipe.unet.config.block_out_channels) - 1)
        self.size_step = max(8, self.pipe.vae_scale_factor * downs)
        self._img2img = None
        self.share = process_share()

    def memory_line(self) -> str:
        """The estimated peak memory of a batch at generate.* (loop.memory) on this pipeline's device."""
        g, pipe = self.cfg.generate, self.pipe
        models = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
        side = max(g.width or self.native, g.height or self.native)
        estimate = memory.generate_peak(
            sum(memory.count(*models)),
            batch=g.batch_size,
            side=side,
            latent_side=side // pipe.vae_scale_factor,
            width=sum(pipe.unet.config.block_out_channels),
            weight_bytes=pipe.unet.dtype.itemsize,
            vae_slicing=g.vae_slicing,
            vae_tiling=g.vae_tiling,
        )
        return estimate.line(f"generate unit {self.unit}", pipe.device.type, memory.available(pipe.device))

    def _check_stop(self, pipe, step, timestep, kwargs):
        if self.stop:
            raise Stopped
        return kwargs

    def render(self, batch: list[Job], parent_images: list[Image.Image] | None = None) -> list[Image.Image]:
        b0 = batch[0]
        args = dict(
            prompt=[f"{self.trigger} {j.prompt}" if self.trigger else j.prompt for j in batch],
            negative_prompt=[j.negative for j in batch] if b0.negative else None,
            num_inference_steps=b0.steps,
            guidance_scale=b0.cfg,
            generator=[torch.Generator(self.pipe.device).manual_seed(j.seed) for j in batch],
            callback_on_step_end=self._check_stop,
        )
        if self.stop:
            raise Stopped
        with torch.inference_mode():
            if parent_images is None:
                rescale = self.cfg.generate.guidance_rescale
                extra = {"guidance_rescale": rescale} if rescale else {}
                if self.prior is not None:
                    vsf = self.pipe.vae_scale_factor
                    shape = (self.pipe.unet.config.in_channels, (b0.height or self.native) // vsf,
                             (b0.width or self.native) // vsf)  # fmt: skip
                    extra["latents"] = noise_prior.latents_for(self.prior, [j.seed for j in batch], shape,
                                                               self.pipe.device, self.pipe.unet.dtype)  # fmt: skip
                return self.pipe(width=b0.width, height=b0.height, **args, **extra).images
            if self._img2img is None:  # the family's img2img pipeline on the same components
                from loop.families import img2img_from

                self._img2img = img2img_from(self.pipe)
            return self._img2img(image=parent_images, strength=b0.strength, **args).images

    def write(self, job: Job, image: Image.Image, **extra) -> int:
        """The PNG first (atomically), then its row; a crash in between leaves a file recovery adopts."""
        meta = dict(
            prompt=job.prompt,
            negative_prompt=job.negative,
            seed=job.seed,
            steps=job.steps,
            cfg=job.cfg,
            sampler=self.cfg.generate.scheduler,
            schedule_type=self.schedule_type,
            width=image.width,
            height=image.height,
            model=self.cfg.model.base,
            unit=self.unit,
            round=self.round,
            parent=job.parent["sha256"] if job.parent else None,
            strength=job.strength,
            source="variation" if job.parent else "generated",
            strategy=self.cfg.select.strategy,
            exploration=False,
        )
        if self.trigger:
            meta["trigger"] = self.trigger
        if self.cfg.generate.guidance_rescale and not job.parent:  # (img2img has no guidance rescale)
            meta["guidance_rescale"] = self.cfg.generate.guidance_rescale
        if self.share[1] > 1:
            meta["process"] = f"{self.share[0]}/{self.share[1]}"  # which of the launched processes made it
        meta.update(extra)
        data = png_bytes(image, meta)
        sha = sha256_bytes(data)
        out_dir = self.ws.generations(self.unit)
        path = atomic_write(out_dir / f"{sha[:16]}.png", data)
        cols = {k: meta[k] for k in IMAGE_COLUMNS}
        return self.store.add_image(
            sha256=sha,
            path=self.ws.rel(path),
            source=meta["source"],
            params=meta,
            parent_id=job.parent["id"] if job.parent else None,
            **cols,
        )

    def run(self, jobs: list[Job], bar=None, log=print) -> tuple[int, bool]:
        """Render and write `jobs` batch by batch; returns (images made, stopped early)."""
        made = 0
        for batch in _batches(jobs, self.cfg.generate.batch_size):
            # leave out what was made meanwhile (another process, an earlier run)
            batch = unmade(self.store, self.unit, batch)
            if not batch:
                continue
            try:
                images = self.render(batch)
            except Stopped:
                return made, True
            except (RuntimeError, ValueError) as e:  # a line whose settings the model can't take
                log(f"warning: line {batch[0].lineno} ({batch[0].prompt!r}): {str(e).splitlines()[0]}; skipped")
                continue
            for job, image in zip(batch, images):
                self.write(job, image)
                made += 1
            if bar is not None:
                bar.update(len(batch))
        return made, bool(self.stop)


def _bar(total: int | None, desc: str):
    """A progress bar with images per minute (tqdm's own rate is per second)."""
    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
    t0 = time.time()
    update = bar.update

    def update_with_rate(n=1):
        update(n)
        bar.set_postfix_str(f"{bar.n / max(time.time() - t0, 1e-9) * 60:.0f} img/min", refresh=False)

    bar.update = update_with_rate
    return bar


# -- one pass ----------------------------------------------------------------------------------------------
def generate(
    ws: Workspace, store: Store, cfg: LoopConfig, unit: int, round: int | None = None, log=print, stop=None
) -> dict:
    """One pass over the prompt file with `unit`; returns counts. Already-made (prompt, seed) pairs are skipped.

    A later round that an older unit generates (the units after it were refused by the promotion gate) takes that
    unit's next cycle of seeds (cycle = round - unit, as the ring's later cycles), so the round has new images."""
    lines, problems = read_prompts(ws.prompts_path)
    for p in problems:
        log(f"warning: {p}")
    rank, world = process_share()
    t0 = time.time()
    renderer = Renderer(ws, store, cfg, unit, round, stop)
    cycle = max(0, round - unit) if round is not None else 0
    jobs = plan_jobs(lines, cfg.generate, renderer.native, rank, world, cycle)
    todo = unmade(store, unit, jobs)
    if todo and rank == 0:  # before the long part: the estimated peak, and what lowers it when it will not fit
        log(renderer.memory_line())
    bar = _bar(len(todo), f"generate unit {unit}" + (f" [{rank + 1}/{world}]" if world > 1 else ""))
    made, stopped = renderer.run(todo, bar, log)
    bar.close()
    return {
        "made": made,
        "skipped": len(jobs) - len(todo),
        "prompts": len(lines),
        "problems": len(problems),
        "seconds": _round(time.time() - t0),
        "stopped": stopped,
    }


# -- the ring ----------------------------------------------------------------------------------------------
def generate_ring(
    ws: Workspace,
    store: Store,
    cfg: LoopConfig,
    unit: int | None = None,
    count: int | None = None,
    log=print,
    stop=None,
    poll: float = 2.0,
) -> dict:
    """The prompt file as a ring: `count` images, or until stopped. `unit=None` follows the unit that generates
    (store.generating_unit: the newest the promotion gate passed), switching when a round promotes a new one, and
    puts its images in the current round. The position is saved per process, so a restart continues."""
    stop = stop if stop is not None else StopFlag()
    rank, world = process_share()
    if count is not None:  # --count K is the total: each process makes its share
        count = count // world + (rank < count % world)
    ring = Ring(ws.prompts_path, store, key=f"ring/{rank}of{world}", log=log)
    if ring.current() is None:
        raise LoopError(f"{ws.prompts_path} has no usable prompts; write one prompt per line (# starts a comment)")
    renderer, made, waiting, t0 = None, 0, False, time.time()
    bar = _bar(count, "generate" + (f" [{rank + 1}/{world}]" if world > 1 else ""))
    try:
        while not stop and (count is None or made < count):
            want = store.generating_unit() if unit is None else unit
            if renderer is None or renderer.unit != want:
                if renderer is not None:
                    log(f"unit {want} is ready: generating with it from now on")
                renderer = Renderer(ws, store, cfg, want, stop=stop)
                bar.set_description(f"generate unit {want}" + (f" [{rank + 1}/{world}]" if world > 1 else ""))
            if unit is None:  # the round goes on even where its unit was refused and an older one generates
                renderer.round = store.current_unit()
            line = ring.current()
            if line is None:  # everything was deleted or commented out: wait for the file to have prompts again
                if not waiting:
                    log(f"waiting: {ws.prompts_path.name} has no usable prompt; add one and generation goes on")
                waiting = True
                stop.wait(poll)
                continue
            waiting = False
            ring.save()  # the slot being made; a restart resumes it and skips the seeds already made
            jobs = line_jobs(line, cfg.generate, renderer.native, ring.pos.cycle, rank, world)
            jobs = unmade(store, renderer.unit, jobs)
            take = jobs if count is None else jobs[: count - made]
            n, stopped = renderer.run(take, bar, log)
            made += n
            if stopped or len(take) < len(jobs):  # stopped, or the count ran out mid-slot: the slot stays current
                break
            ring.advance()
    finally:
        bar.close()
    return {
        "made": made,
        "seconds": _round(time.time() - t0),
        "stopped": bool(stop),
        "position": {**ring.pos.as_dict(), "lineno": ring.line.lineno if ring.line else None},
        "unit": renderer.unit if renderer else unit,
    }


# -- img2img variations ------------------------------------------------------------------------------------
def resolve_image(ws: Workspace, store: Store, ref: str):
    """An image of the store named by a file path, a sha256 prefix (6+ hex digits) or an id."""
    from loop.workspace import sha256_file

    p = Path(ref)
    if p.is_file():
        rows = store.image_by_sha(sha256_file(p))
        if rows:
            return rows[0]
        raise LoopError(f"{ref} is not in this workspace's store; bring it in with `loop import` first")
    text = ref.lstrip("#")
    if len(text) >= 6 and all(c in "0123456789abcdefABCDEF" for c in text):
        rows = store.image_by_sha(text)
        if len(rows) == 1:
            return rows[0]
        if len(rows) > 1:
            raise LoopError(f"{ref!r} matches several images; give more of the sha256")
    if text.isdigit() and store.image(int(text)) is not None:
        return store.image(int(text))
    raise LoopError(f"no image {ref!r} in this workspace; give a file path, a sha256 prefix (6+ hex) or an image id")


def vary(
    ws: Workspace,
    store: Store,
    cfg: LoopConfig,
    parents: list,
    n: int,
    strength: float | None = None,
    unit: int | None = None,
    prompt: str | None = None,
    log=print,
    stop=None,
    round: int | None = None,
) -> list[int]:
    """`n` img2img variations of each parent (rows of the store); returns the new image ids.

    Each variation's row has parent_id, its PNG names the parent's sha256, and its seeds continue after the
    variations this unit already made of that parent, so asking again gives new ones. `unit=None`: the unit that
    generates, its images in the current round; `round=None` otherwise: the unit's own."""
    if n <= 0:
        raise LoopError(f"--n must be a positive number of variations, got {n}")
    strength = cfg.generate.strength if strength is None else strength
    if not 0 < strength <= 1:
        raise LoopError(f"--strength must be in (0, 1], got {strength}")
    if unit is None:
        unit, round = store.generating_unit(), store.current_unit() if round is None else round
    g = cfg.generate
    renderer = Renderer(ws, store, cfg, unit, round=round, stop=stop)
    ids: list[int] = []
    bar = _bar(n * len(parents), f"vary with unit {unit}")
    try:
        for parent in parents:
            try:
                with Image.open(ws.inside(parent["path"])) as im:
                    if im.format == "JPEG":  # decode a large photo at a reduced scale (still >= native)
                        im.draft(None, (renderer.native, renderer.native))
                    source = to_rgb(im)  # as people see it: EXIF orientation, first frame, 16-bit scaled
            except (OSError, LoopError, ValueError, SyntaxError) as e:
                log(f"warning: image {parent['id']} ({parent['path']}) could not be read ({e}); skipped")
                continue
            w, h = fit_size(source.size, renderer.native, renderer.size_step)
            if (w, h) != source.size:
                source = source.resize((w, h), Image.Resampling.LANCZOS)
            seeds = [c["seed"] for c in store.children(parent["id"]) if c["unit"] == unit and c["seed"] is not None]
            first = max(seeds) + 1 if seeds else g.seed
            parent_info = {"id": parent["id"], "sha256": parent["sha256"]}
            jobs = [
                Job(
                    prompt=parent["prompt"] if prompt is None else prompt,
                    negative=g.negative_prompt,
                    seed=(first + k) % SEED_RANGE,
                    steps=g.steps,
                    cfg=g.cfg,
                    width=w,
                    height=h,
                    parent=parent_info,
                    strength=strength,
                )
                for k in range(n)
            ]
            for batch in _batches(jobs, g.batch_size):
                try:
                    images = renderer.render(batch, [source] * len(batch))
                except Stopped:
                    return ids
                except (RuntimeError, ValueError) as e:  # out of memory, a size the model can't take
                    why = str(e).splitlines()[0] if str(e) else type(e).__name__
                    log(f"warning: image {parent['id']} ({parent['path']}) could not be varied ({why}); skipped")
                    break
                for job, image in zip(batch, images):
                    ids.append(renderer.write(job, image))
                bar.update(len(batch))
    finally:
        bar.close()
    return ids


def fit_size(size: tuple[int, int], native: int, step: int = 8) -> tuple[int, int]:
    """An img2img input size for an image of `size`: scaled down (aspect kept) so its longer side is the model's
    native size when it is larger, then each side rounded down to a multiple of `step` (at least one step).
    A 6000x4000 photo at full size would need gigabytes for one variation."""
    w, h = size
    longer = max(w, h, 1)
    if longer > native:
        w, h = w * native / longer, h * native / longer
    return tuple(max(step, int(round(v)) // step * step) for v in (w, h))


def _round(x: float) -> float:
    return float(f"{x:.2f}")
