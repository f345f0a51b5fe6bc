"""`python -m loop.bench generate`: the generator against a naive loop, same model, images and steps, one run.

ours   `generate_ring(count=N)`, the code behind `loop generate --count N`: batches, inference_mode, the
       scheduler from config, PNG with metadata written atomically, one database row per image
naive  one `pipe()` call per image, then `image.save()`: what a first script does

Both are timed twice, alternately, and the better of the two runs is kept for each (the machine is shared
and noisy; alternating keeps a slow spell from landing on one side only). The same seeds are used, and the
largest pixel difference between the two sides' images is reported, to show they made the same images.

On a machine with CUDA the same comparison runs on an SD1.5-shaped pipeline with random weights (UNet
block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768; a matching VAE and CLIP text encoder)
at 512x512, 25 steps, CFG, in fp16 with channels_last. Speed depends on the shapes, not the weights.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loop.bench.report import table, write
from loop.config import load_config
from loop.generate import generate_ring
from loop.images import load_rgb
from loop.models import load_base, set_scheduler
from loop.workspace import Workspace

PROMPTS = ["a circle", "a square", "a triangle", "a ring"]


def _naive(pipe, jobs: list[tuple[str, int]], steps: int, cfg: float, out: Path, size: int | None = None) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, (prompt, seed) in enumerate(jobs):
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=torch.Generator(pipe.device).manual_seed(seed),
            height=size,
            width=size,
        ).images[0]
        image.save(out / f"{i:05d}.png")
    _sync()
    return time.perf_counter() - t0


def _ours(ws: Workspace, cfg, count: int) -> float:
    with ws.store() as store:
        store.ensure_base_unit(cfg.model.base)
        t0 = time.perf_counter()
        out = generate_ring(ws, store, cfg, unit=0, count=count, log=lambda m: None)
        _sync()
        seconds = time.perf_counter() - t0
    assert out["made"] == count, out
    return seconds


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _compare(ws: Workspace, naive_dir: Path, jobs: list[tuple[str, int]]) -> float:
    """The largest per-pixel difference (0..255) between our image and the naive one for the same job."""
    with ws.store() as store:
        rows = {(r["prompt"], r["seed"]): r["path"] for r in store.images(unit=0)}
    worst = 0
    for i, job in enumerate(jobs):
        a = load_rgb(ws.root / rows[job]).astype(int)
        b = load_rgb(naive_dir / f"{i:05d}.png").astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def _side_by_side(base: str, images: int, steps: int, batch: int, extra: list[str], reps: int, size=None) -> dict:
    per_prompt = max(1, images // len(PROMPTS))
    count = per_prompt * len(PROMPTS)
    overrides = [
        f"model.base={base}",
        f"generate.images_per_prompt={per_prompt}",
        f"generate.steps={steps}",
        f"generate.batch_size={batch}",
        *extra,
    ]
    jobs = [(p, k) for p in PROMPTS for k in range(per_prompt)]
    ours, naive = [], []
    with tempfile.TemporaryDirectory(prefix="loop-bench-gen-") as tmp:
        cfg = None
        for rep in range(reps):
            # ours, in a fresh workspace each time (nothing to skip)
            ws = Workspace.init(Path(tmp) / f"ws{rep}")
            ws.prompts_path.write_text("\n".join(PROMPTS) + "\n")
            cfg = load_config(ws.root, overrides)
            ours.append(_ours(ws, cfg, count))
            # naive, with the same model, scheduler, steps, CFG and seeds
            pipe = load_base(cfg.model)
            set_scheduler(pipe, cfg.generate.scheduler)
            with torch.inference_mode():  # a kindness to the naive side: no autograd bookkeeping either
                naive.append(_naive(pipe, jobs, steps, cfg.generate.cfg, Path(tmp) / f"naive{rep}", size))
            del pipe
        diff = _compare(ws, Path(tmp) / f"naive{reps - 1}", jobs)
    return {
        "images": count,
        "ours_s": min(ours),
        "naive_s": min(naive),
        "ours_images_per_s": count / min(ours),
        "naive_images_per_s": count / min(naive),
        "max_pixel_diff": diff,
    }


def sd15_folder(folder: Path, dtype=torch.float16) -> Path:
    """An SD1.5-shaped pipeline with random weights, saved as a diffusers folder (nothing is downloaded)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loop.tiny.build import load_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    tok = load_tokenizer()  # the shipped byte-level tokenizer; the text encoder keeps SD1.5's 49408-row table
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    )
    for module in (unet, vae, text):  # small random weights: never time on zeros, and keep fp16 finite
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(dtype=dtype).save_pretrained(folder)
    return folder


def bench_generate(images: int = 64, steps: int = 20, batch: int = 16, reps: int = 2, out: str = "docs") -> dict:
    print(f"generate: {images} images of the embedded model, {steps} steps, ours (batch {batch}) vs naive ...")
    cpu = _side_by_side("embedded", images, steps, batch, ["model.device=cpu"], reps)
    figures = {
        "images": cpu["images"],
        "steps": steps,
        "batch_size": batch,
        "ours_images_per_s": round(cpu["ours_images_per_s"], 2),
        "naive_images_per_s": round(cpu["naive_images_per_s"], 2),
        "ratio": round(cpu["ours_images_per_s"] / cpu["naive_images_per_s"], 2),
        "max_pixel_diff": cpu["max_pixel_diff"],
        "cpu_threads": torch.get_num_threads(),
    }
    rows = [
        {"device": "cpu", "model": "embedded 32px", "side": "ours", "images/s": figures["ours_images_per_s"]},
        {"device": "cpu", "model": "embedded 32px", "side": "naive", "images/s": figures["naive_images_per_s"]},
    ]
    if torch.cuda.is_available():
        gpu_images = max(64, images)
        print(f"generate: SD1.5-shaped random weights on {torch.cuda.get_device_name()}, 512px, 25 steps ...")
        with tempfile.TemporaryDirectory(prefix="loop-sd15-") as tmp:
            folder = sd15_folder(Path(tmp) / "sd15")
            gpu = _side_by_side(str(folder), gpu_images, 25, batch, ["model.device=cuda", "model.dtype=float16",
                                "generate.cfg=7.5"], reps, size=512)  # fmt: skip
        figures.update(
            gpu_images_per_s=round(gpu["ours_images_per_s"], 2),
            gpu_naive_images_per_s=round(gpu["naive_images_per_s"], 2),
            gpu_ratio=round(gpu["ours_images_per_s"] / gpu["naive_images_per_s"], 2),
            gpu_floor_images_per_s=round(1 / 0.054, 1),
            gpu_name=torch.cuda.get_device_name(),
        )
        rows += [
            {"device": "gpu", "model": "SD1.5 shape 512px", "side": "ours", "images/s": figures["gpu_images_per_s"]},
            {"device": "gpu", "model": "SD1.5 shape 512px", "side": "naive",
             "images/s": figures["gpu_naive_images_per_s"]},
        ]  # fmt: skip
    else:
        figures["gpu"] = "not measured: no CUDA device on this machine"
    md = (
        "## generate\n\n"
        f"`python -m loop.bench generate`: {figures['images']} images, {steps} steps, DPM++, CFG; ours is "
        f"`loop generate --count` (batch {batch}, PNG + metadata + row per image), naive is one `pipe()` call "
        "per image plus `image.save()`. Best of "
        f"{reps} alternating runs each. Largest pixel difference between the two sides' images: "
        f"{figures['max_pixel_diff']} of 255.\n\n"
        + table(rows)
        + f"\n\nratio (ours / naive, CPU): **{figures['ratio']}x**"
        + (f"; GPU: **{figures['gpu_ratio']}x**" if "gpu_ratio" in figures else f"; GPU: {figures['gpu']}")
        + "\n"
    )
    print(table(rows))
    print(f"ratio ours/naive: {figures['ratio']}x")
    write("generate", figures, md, out)
    return figures


def sd15_check(size: int = 64) -> None:
    """Build the SD1.5-shaped folder and make 2 images through `loop generate`'s code at a small size: proves
    the GPU benchmark's path on a machine without a GPU (slowly, in fp32)."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="loop-sd15-") as tmp:
        folder = sd15_folder(Path(tmp) / "sd15", dtype=torch.float32)
        with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:  # headers only
            unet = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        ws = Workspace.init(Path(tmp) / "ws")
        ws.prompts_path.write_text("a circle\n")
        cfg = load_config(ws.root, [f"model.base={folder}", "generate.images_per_prompt=2", "generate.steps=2",
                                    f"generate.width={size}", f"generate.height={size}"])  # fmt: skip
        seconds = _ours(ws, cfg, 2)
        print(f"SD1.5-shaped UNet: {unet / 1e6:.1f}M parameters; 2 images at {size}px, 2 steps in {seconds:.1f}s")
