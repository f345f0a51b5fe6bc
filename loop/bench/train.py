"""`python -m loop.bench train`: our trainer against a reference loop that re-encodes every step.

ours       `fit` on latents and text embeddings encoded once and cached (what `loop train` does)
reference  what diffusers' train_dreambooth_lora.py does each step: read the batch's images, VAE-encode them
           (sampling the latent distribution), tokenize and text-encode the captions, then the same UNet step

Same tiny model, images, batch, steps, seed and LoRA. After one warm-up step each, the sides (the reference,
ours, ours with the default train.uncond_preservation, ours with train.compile) take turns in short blocks
(--reps blocks of --steps steps) in a rotating order, since this machine's speed drifts for tens of seconds at a
time; each block's times give one paired ratio, and the median ratio is reported (and median times). The
compile time is reported too: the first (inductor's cache empty) and a later one (from the cache).

It also times the preprocessing of a second round in which half the images are new: with the cache of the
first round (only the new half is encoded) and with an empty cache (everything is encoded).

On a machine with CUDA it reports LoRA training images/s on the SD1.5-shaped random-weight pipeline at
512x512, bf16, batch 4.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loop.bench.report import table, write
from loop.config import load_config
from loop.generate import generate_ring
from loop.models import load_base
from loop.train import TrainData, _token_ids, add_lora, encode_latents, encode_texts, fit, load_square, loss_target
from loop.workspace import Workspace

PROMPTS = ["a circle", "a square", "a triangle", "a ring"]


def _items(ws: Workspace, unit: int | None = None) -> list[dict]:
    with ws.store() as store:
        rows = store.images(unit=unit)
    return [{"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"]} for r in rows]


class _Reference:
    """diffusers' DreamBooth-LoRA loop: everything re-encoded every step."""

    def __init__(self, pipe, ws, items, tc, size: int):
        from diffusers import DDPMScheduler

        self.pipe, self.ws, self.items, self.size = pipe, ws, items, size
        self.unet = add_lora(pipe.unet, tc)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=1e-2)
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.bs = min(tc.batch_size, len(items))
        self.unet.train()

    def run(self, steps: int) -> tuple[float, float]:
        """Seconds for `steps` steps, and of them the seconds spent reading and encoding the batch (what a cache
        can save)."""
        pipe, items, gen, sched = self.pipe, self.items, self.gen, self.sched
        t0, encoding = time.perf_counter(), 0.0
        for _ in range(steps):
            e0 = time.perf_counter()
            idx = torch.randint(0, len(items), (self.bs,), generator=gen).tolist()
            pixels = torch.stack([load_square(self.ws.root / items[i]["path"], self.size) for i in idx])
            with torch.no_grad():
                x0 = pipe.vae.encode(pixels).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
                cond = pipe.text_encoder(_token_ids(pipe.tokenizer, [items[i]["caption"] for i in idx]))[0]
            encoding += time.perf_counter() - e0
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (self.bs,), generator=gen)
            pred = self.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, loss_target(sched, x0, noise, t))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, encoding


class _Ours:
    """Our loop (`fit`) on latents and embeddings encoded once and cached. keep=0: the reference's objective
    exactly; keep>0: with train.uncond_preservation, whose extra no-grad base forward the reference does not
    have. compiled: with train.compile."""

    def __init__(self, pipe, ws, items, tc, size: int, base: str, keep: float = 0.0, compiled: bool = False):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        lat, kept, _ = encode_latents(ws, pipe, items, size, base, log=lambda m: None)
        embeds = encode_texts(ws, pipe, [it["caption"] for it in kept], base)
        self.data = TrainData(latents=torch.stack(lat), embeds=embeds)
        self.data.empty = self.data.empty_embed = encode_texts(ws, pipe, [""], base)[0]
        self.unet = add_lora(pipe.unet, tc)
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.acc = Accelerator(cpu=True)
        self.common = [f"train.batch_size={tc.batch_size}", f"train.uncond_preservation={keep}",
                       f"train.compile={compiled}"]  # fmt: skip

    def run(self, steps: int) -> tuple[float, float]:
        tc = load_config(None, [f"train.steps={steps}", *self.common]).train
        t0 = time.perf_counter()
        fit(self.unet, self.data, self.sched, tc, self.acc, desc="ours", log=lambda m: None)
        return time.perf_counter() - t0, 0.0


def _prep(ws: Workspace, pipe, items, size, base) -> float:
    t0 = time.perf_counter()
    lat, kept, _ = encode_latents(ws, pipe, items, size, base, log=lambda m: None)
    encode_texts(ws, pipe, [it["caption"] for it in kept], base)
    return time.perf_counter() - t0


def bench_train(images: int = 32, steps: int = 30, batch: int = 8, reps: int = 10, out: str = "docs") -> dict:
    from loop.config import ModelConfig

    with tempfile.TemporaryDirectory(prefix="loop-bench-train-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
        cfg = load_config(ws.root, ["generate.steps=8", f"train.batch_size={batch}"])
        print(f"train: making {images} images with the embedded model ...")
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            generate_ring(ws, store, cfg, unit=0, count=images, log=lambda m: None)
        items = _items(ws)
        size = 32
        # train.compile's first compile in this run is a cold one: inductor's cache starts empty here, as on a
        # machine that never compiled this model (later runs compile from that cache, as later rounds would)
        before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        shutil.rmtree(ws.root / "cache", ignore_errors=True)
        keep = cfg.train.uncond_preservation
        sides = {
            "reference": _Reference(load_base(ModelConfig()), ws, items, cfg.train, size),
            "ours": _Ours(load_base(ModelConfig()), ws, items, cfg.train, size, "embedded"),
            "ours_keep": _Ours(load_base(ModelConfig()), ws, items, cfg.train, size, "embedded", keep=keep),
            "ours_compiled": _Ours(load_base(ModelConfig()), ws, items, cfg.train, size, "embedded", compiled=True),
        }
        warm = {name: side.run(1)[0] for name, side in sides.items()}  # one warm-up step each; compiles
        compile_cold = warm["ours_compiled"] - warm["ours"]
        torch._dynamo.reset()  # compile again, now from inductor's disk cache, as a later round would
        compile_warm = sides["ours_compiled"].run(1)[0] - sides["ours"].run(1)[0]
        # This machine is noisy (another tenant can slow it by a third for tens of seconds), so the sides take
        # turns in short blocks, in a rotating order, and each block's times make one paired ratio
        names = list(sides)
        per_step = {name: [] for name in names}
        enc = []
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                secs, e = sides[name].run(steps)
                per_step[name].append(secs / steps)
                if name == "reference":
                    enc.append(e / secs)
            print("  block " + f"{rep + 1}: " + ", ".join(f"{n} {per_step[n][-1]:.3f}" for n in names) + " s/step")
        ref, ours, ours_keep, ours_c = (per_step[n] for n in names)

        # a second round where half the images are new: with round 1's cache, and with an empty one
        pipe = load_base(ModelConfig())
        half = items[: len(items) // 2]
        shutil.rmtree(ws.root / "cache", ignore_errors=True)
        _prep(ws, pipe, half, size, "embedded")  # round 1 fills the cache with its half
        prep_cached = _prep(ws, pipe, items, size, "embedded")
        shutil.rmtree(ws.root / "cache", ignore_errors=True)
        prep_uncached = _prep(ws, pipe, items, size, "embedded")
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before

    # each block's paired ratio; the median over the blocks is reported, and times are medians
    ratios = [r / o for r, o in zip(ref, ours)]
    ratios_keep = [r / o for r, o in zip(ref, ours_keep)]
    ratios_c = [r / o for r, o in zip(ref, ours_c)]
    figures = {
        "images": len(items),
        "steps": steps,
        "batch_size": batch,
        "runs": reps,
        "ours_s_per_step": round(statistics.median(ours), 4),
        "reference_s_per_step": round(statistics.median(ref), 4),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_runs": " ".join(f"{x:.2f}" for x in ratios),
        # of the reference's step, the time spent reading the batch and VAE- and text-encoding it: what the cache
        # takes away
        "reference_encoding_s_per_step": round(statistics.median(enc) * statistics.median(ref), 4),
        "reference_encoding_share": round(statistics.median(enc), 3),
        "ours_uncond_preservation_s_per_step": round(statistics.median(ours_keep), 4),
        "ratio_with_uncond_preservation": round(statistics.median(ratios_keep), 2),
        "ours_compiled_s_per_step": round(statistics.median(ours_c), 4),
        "ratio_compiled": round(statistics.median(ratios_c), 2),
        "ratio_compiled_runs": " ".join(f"{x:.2f}" for x in ratios_c),
        "compile_cold_s": round(compile_cold, 1),  # the first compile, inductor's cache empty
        "compile_warm_s": round(compile_warm, 1),  # a later compile, from that cache
        # steps after which train.compile has paid back its (warm) compile
        "compile_break_even_steps": (
            round(compile_warm / (statistics.median(ours) - statistics.median(ours_c)))
            if statistics.median(ours) > statistics.median(ours_c)
            else None
        ),
        "prep_cached_s": round(prep_cached, 3),
        "prep_uncached_s": round(prep_uncached, 3),
        "prep_ratio": round(prep_uncached / max(prep_cached, 1e-9), 2),
    }
    rows = [
        {"side": "reference (re-encode every step)", "s/step": figures["reference_s_per_step"]},
        {"side": "ours (cached latents + text)", "s/step": figures["ours_s_per_step"]},
        {
            "side": f"ours + train.uncond_preservation={cfg.train.uncond_preservation} (the default objective)",
            "s/step": figures["ours_uncond_preservation_s_per_step"],
        },
        {"side": "ours + train.compile=true", "s/step": figures["ours_compiled_s_per_step"]},
    ]
    prep_rows = [
        {"second round, half new": "with round 1's cache", "prep_s": figures["prep_cached_s"]},
        {"second round, half new": "empty cache", "prep_s": figures["prep_uncached_s"]},
    ]
    if torch.cuda.is_available():
        figures.update(_gpu_images_per_s())
    else:
        figures["gpu"] = "not measured: no CUDA device on this machine"
    md = (
        "## train\n\n"
        f"`python -m loop.bench train`: LoRA (rank 8, attention) on the embedded model, {len(items)} images, "
        f"batch {batch}; after one warm-up step each, the sides take turns in {reps} blocks of {steps} steps, in a "
        f"rotating order; times are medians over the blocks, the ratio is the median of each block's reference / "
        f"ours (blocks: {figures['ratio_runs']}).\n\n"
        + table(rows)
        + f"\n\nratio (reference / ours, the same objective): **{figures['ratio']}x**. Of the reference's "
        f"{figures['reference_s_per_step']} s step, {figures['reference_encoding_s_per_step']} s "
        f"({100 * figures['reference_encoding_share']:.0f}%) go to reading the batch and encoding it, which the "
        f"cache removes; on the embedded model the VAE and text encoder are small next to the UNet's forward and "
        f"backward, so the ratio stays modest here. With the default uncond "
        f"preservation, whose base-model targets are predicted ahead in chunks (loop.train.BaseTargets): "
        f"{figures['ratio_with_uncond_preservation']}x\n\n"
        f"With `train.compile=true` (off by default): **{figures['ratio_compiled']}x** (blocks: "
        f"{figures['ratio_compiled_runs']}). Compiling is a one-off per training: {figures['compile_cold_s']} s the "
        f"first time (inductor's cache empty), {figures['compile_warm_s']} s later (from the cache); it pays back "
        f"after about {figures['compile_break_even_steps']} steps (train.steps is 300 by default).\n\n"
        + "Preprocessing of a second round in which half the images are new:\n\n"
        + table(prep_rows)
        + "\n\n"
        + (
            f"GPU LoRA training: {figures['gpu_train_images_per_s']} images/s (SD1.5 shape, 512px, bf16, batch 4)\n"
            if "gpu_train_images_per_s" in figures
            else f"GPU: {figures['gpu']}\n"
        )
    )
    print(table(rows))
    print(table(prep_rows))
    print(
        f"ratio reference/ours: {figures['ratio']}x (reading + encoding: "
        f"{100 * figures['reference_encoding_share']:.0f}% of the reference's step); with train.compile: "
        f"{figures['ratio_compiled']}x, compiling {figures['compile_cold_s']} s cold, {figures['compile_warm_s']} s "
        f"warm, break-even after {figures['compile_break_even_steps']} steps"
    )
    write("train", figures, md, out)
    return figures


def _gpu_images_per_s(steps: int = 20, batch: int = 4, latent: int = 64) -> dict:
    """LoRA training throughput on the SD1.5-shaped random-weight UNet at 512px (64x64 latents), bf16. Runs on
    whatever device accelerate picks (on a CPU only as a smoke test, with a small `latent`)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from loop.bench.generate import sd15_folder

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="loop-sd15-") as tmp:
        folder = sd15_folder(Path(tmp) / "sd15", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tc = load_config(None, [f"train.steps={steps}", f"train.batch_size={batch}", "train.mixed_precision=bf16"]).train
    acc = Accelerator(mixed_precision="bf16")
    unet = add_lora(unet.to(acc.device), tc)
    g = torch.Generator().manual_seed(0)
    data = TrainData(
        latents=torch.randn(16, 4, latent, latent, generator=g), embeds=torch.randn(16, 77, 768, generator=g)
    )
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    warm = load_config(None, ["train.steps=2", f"train.batch_size={batch}", "train.mixed_precision=bf16"]).train
    fit(unet, data, sched, warm, acc, desc="gpu warm-up")
    sync()
    t0 = time.perf_counter()
    fit(unet, data, sched, tc, acc, desc="gpu")
    sync()
    return {"gpu_train_images_per_s": round(steps * batch / (time.perf_counter() - t0), 2)}
