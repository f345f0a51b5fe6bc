"""`python -m loop.bench train`: our trainer against a reference loop that re-encodes every step.

ours       `fit` on latents and text embeddings encoded once and cached (what `loop train` does)
reference  what diffusers' train_dreambooth_lora.py does each step: read the batch's images, VAE-encode them
           (sampling the latent distribution), tokenize and text-encode the captions, then the same UNet step

Same tiny model, images, batch, steps, seed and LoRA. Both sides are timed after one warm-up step; the
reference is run first and ours second, five times over (--reps). Each run's two times, taken back to back,
give one ratio; the median ratio is reported (and median times), since this machine's speed drifts from run to
run.

It also times the preprocessing of a second round in which half the images are new: with the cache of the
first round (only the new half is encoded) and with an empty cache (everything is encoded).

On a machine with CUDA it reports LoRA training images/s on the SD1.5-shaped random-weight pipeline at
512x512, bf16, batch 4.
"""

from __future__ import annotations

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


def _reference(pipe, ws, items, tc, steps: int, size: int) -> tuple[float, float]:
    """diffusers' DreamBooth-LoRA loop: everything re-encoded every step. Seconds per step, and of them the
    seconds spent reading and encoding the batch (what a cache can save)."""
    from diffusers import DDPMScheduler

    unet = add_lora(pipe.unet, tc)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(tc.seed)
    bs = min(tc.batch_size, len(items))
    unet.train()
    t0, encoding = None, 0.0
    for step in range(steps + 1):
        if step == 1:
            t0, encoding = time.perf_counter(), 0.0  # after one warm-up step
        e0 = time.perf_counter()
        idx = torch.randint(0, len(items), (bs,), generator=gen).tolist()
        pixels = torch.stack([load_square(ws.root / items[i]["path"], size) for i in idx])
        with torch.no_grad():
            x0 = pipe.vae.encode(pixels).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
            cond = pipe.text_encoder(_token_ids(pipe.tokenizer, [items[i]["caption"] for i in idx]))[0]
        encoding += time.perf_counter() - e0
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, loss_target(sched, x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps, encoding / steps


def _ours(pipe, ws, items, tc, steps: int, size: int, base: str, keep: float = 0.0) -> float:
    """Our loop on cached latents and embeddings. keep=0: the reference's objective exactly; keep>0: with
    train.uncond_preservation, whose extra no-grad base forward the reference does not have."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    lat, kept, _ = encode_latents(ws, pipe, items, size, base, log=lambda m: None)
    data = TrainData(latents=torch.stack(lat), embeds=encode_texts(ws, pipe, [it["caption"] for it in kept], base))
    data.empty = data.empty_embed = encode_texts(ws, pipe, [""], base)[0]
    unet = add_lora(pipe.unet, tc)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    acc = Accelerator(cpu=True)
    common = [f"train.batch_size={tc.batch_size}", f"train.uncond_preservation={keep}"]
    warm = load_config(None, ["train.steps=1", *common]).train
    fit(unet, data, sched, warm, acc, desc="warm-up")
    timed = load_config(None, [f"train.steps={steps}", *common]).train
    t0 = time.perf_counter()
    fit(unet, data, sched, timed, acc, desc="ours")
    return (time.perf_counter() - t0) / steps


def _prep(ws: Workspace, pipe, items, size, base) -> float:
    t0 = time.perf_counter()
    lat, kept, _ = encode_latents(ws, pipe, items, size, base, log=lambda m: None)
    encode_texts(ws, pipe, [it["caption"] for it in kept], base)
    return time.perf_counter() - t0


def bench_train(images: int = 32, steps: int = 60, batch: int = 8, reps: int = 5, out: str = "docs") -> dict:
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
        ours, ref, ours_keep, enc = [], [], [], []
        for rep in range(reps):
            shutil.rmtree(ws.root / "cache", ignore_errors=True)
            r, e = _reference(load_base(ModelConfig()), ws, items, cfg.train, steps, size)
            ref.append(r)
            enc.append(e)
            ours.append(_ours(load_base(ModelConfig()), ws, items, cfg.train, steps, size, "embedded"))
            keep = cfg.train.uncond_preservation
            ours_keep.append(_ours(load_base(ModelConfig()), ws, items, cfg.train, steps, size, "embedded", keep))
            print(
                f"  run {rep + 1}: reference {ref[-1]:.3f} s/step, ours {ours[-1]:.3f} s/step, "
                f"ours with uncond preservation {ours_keep[-1]:.3f} s/step"
            )

        # a second round where half the images are new: with round 1's cache, and with an empty one
        pipe = load_base(ModelConfig())
        half = items[: len(items) // 2]
        shutil.rmtree(ws.root / "cache", ignore_errors=True)
        _prep(ws, pipe, half, size, "embedded")  # round 1 fills the cache with its half
        prep_cached = _prep(ws, pipe, items, size, "embedded")
        shutil.rmtree(ws.root / "cache", ignore_errors=True)
        prep_uncached = _prep(ws, pipe, items, size, "embedded")

    # This machine is noisy (another tenant can slow a whole run by a third), so each run's reference and ours,
    # measured back to back, make one paired ratio, and the median over the runs is reported; times are medians.
    ratios = [r / o for r, o in zip(ref, ours)]
    ratios_keep = [r / o for r, o in zip(ref, ours_keep)]
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
        "reference_encoding_s_per_step": round(statistics.median(enc), 4),
        "reference_encoding_share": round(statistics.median([e / r for e, r in zip(enc, ref)]), 3),
        "ours_uncond_preservation_s_per_step": round(statistics.median(ours_keep), 4),
        "ratio_with_uncond_preservation": round(statistics.median(ratios_keep), 2),
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
        f"batch {batch}, {steps} timed steps after one warm-up; {reps} alternating runs, medians (the ratio: the "
        f"median of each run's reference / ours; runs: {figures['ratio_runs']}).\n\n"
        + table(rows)
        + f"\n\nratio (reference / ours, the same objective): **{figures['ratio']}x**. Of the reference's "
        f"{figures['reference_s_per_step']} s step, {figures['reference_encoding_s_per_step']} s "
        f"({100 * figures['reference_encoding_share']:.0f}%) go to reading the batch and encoding it, which the "
        f"cache removes; on the embedded model the VAE and text encoder are small next to the UNet's forward and "
        f"backward, so the ratio stays modest here. With the default uncond "
        f"preservation, whose base-model targets are predicted ahead in chunks (loop.train.BaseTargets): "
        f"{figures['ratio_with_uncond_preservation']}x\n\n"
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
        f"{100 * figures['reference_encoding_share']:.0f}% of the reference's step)"
    )
    write("train", figures, md, out)
    return figures


def _gpu_images_per_s(steps: int = 20, batch: int = 4) -> dict:
    """LoRA training throughput on the SD1.5-shaped random-weight UNet at 512px (64x64 latents), bf16."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from loop.bench.generate import sd15_folder

    with tempfile.TemporaryDirectory(prefix="loop-sd15-") as tmp:
        folder = sd15_folder(Path(tmp) / "sd15", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    tc = load_config(None, [f"train.steps={steps}", f"train.batch_size={batch}", "train.mixed_precision=bf16"]).train
    acc = Accelerator(mixed_precision="bf16")
    unet = add_lora(unet.to(acc.device), tc)
    g = torch.Generator().manual_seed(0)
    data = TrainData(latents=torch.randn(16, 4, 64, 64, generator=g), embeds=torch.randn(16, 77, 768, generator=g))
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    warm = load_config(None, ["train.steps=2", f"train.batch_size={batch}", "train.mixed_precision=bf16"]).train
    fit(unet, data, sched, warm, acc, desc="gpu warm-up")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fit(unet, data, sched, tc, acc, desc="gpu")
    torch.cuda.synchronize()
    return {"gpu_train_images_per_s": round(steps * batch / (time.perf_counter() - t0), 2)}
