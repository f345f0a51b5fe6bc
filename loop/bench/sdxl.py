"""`python -m loop.bench sdxl`: SDXL at 1024 px on the GPU: generation images/s, LoRA training images/s at batch 1 and
4, and the peak memory of a training step with and without gradient checkpointing and an 8-bit AdamW.

The pipeline is SDXL's architecture built from its configs with random weights (nothing is downloaded; speed and
memory depend on the shapes, not the weights): UNet block_out_channels (320, 640, 1280), transformer_layers_per_block
(1, 2, 10), cross-attention over 768 + 1280 text features, the "text_time" added embedding (pooled 1280 + 6 x 256);
CLIP ViT-L and OpenCLIP ViT-bigG-shaped text encoders (12 and 32 layers); SDXL's VAE. Everything in bf16.

- generation: `pipe()` of the family's pipeline (what `loop generate` calls), one image a call, 1024x1024,
  `--steps` steps, CFG 5, after one warm-up image; the VAE decodes in fp32 as SDXL's config asks (force_upcast).
- training: loop's LoRA (loop.train.adapters.add_lora: rank 8 on to_q/k/v/out.0, adapter weights fp32, the
  frozen UNet bf16) and the step loop's UNet call (loop.families.unet_inputs: hidden states, pooled embedding and
  size/crop ids), on cached latents and text embeddings as loop trains (the VAE and text encoders are not in the
  step). Images/s over `--train-steps` steps after two warm-up steps; peak memory is torch's max_memory_allocated
  over those steps.

Without CUDA it says so in one line and exits non-zero, writing nothing. `--tiny` runs the same code on the
embedded SDXL (model.base=embedded-xl, 32 px) on whatever device there is, and writes nothing: a check of the path.
"""

from __future__ import annotations

import contextlib
import time

import torch

from loop.bench.report import table, write

SIZE = 1024
RANK = 8


def sdxl_pipeline(device: str = "cuda", dtype=torch.bfloat16):
    """SDXL-shaped StableDiffusionXLPipeline with random weights (small normal values, so bf16 stays finite)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loop.tiny.build import load_tokenizer

    tok = load_tokenizer()  # the shipped byte-level tokenizer; the encoders keep CLIP's 49408-row tables

    def clip(width: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=width,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=SIZE // 8,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=SIZE,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        te1 = CLIPTextModel(clip(768, 12, 12, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu"))
        for module in (unet, vae, te1, te2):
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.02)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   timestep_spacing="leading")  # fmt: skip
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, add_watermarker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_generation(pipe, size: int, steps: int, images: int) -> float:
    """Images per second of one-image `pipe()` calls, after a warm-up image."""
    gen = lambda i: torch.Generator(pipe.device).manual_seed(i)  # noqa: E731
    with torch.inference_mode():
        pipe("a circle", height=size, width=size, num_inference_steps=2, guidance_scale=5.0, generator=gen(0))
        _sync(pipe.device)
        t0 = time.perf_counter()
        for i in range(images):
            pipe("a circle", height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                 generator=gen(i), output_type="pil")  # fmt: skip
        _sync(pipe.device)
    return images / (time.perf_counter() - t0)


def _optimizer(params, eight_bit: bool):
    if not eight_bit:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)


def bench_training(pipe, size: int, batch: int, steps: int, checkpointing: bool, eight_bit: bool) -> dict:
    """A LoRA on the pipeline's UNet (loop's add_lora), `steps` optimizer steps on random cached latents and text
    features of SDXL's shapes; images/s and peak memory (GiB, CUDA only)."""
    from types import SimpleNamespace

    from loop.families import time_ids, unet_inputs
    from loop.train.adapters import add_lora

    unet, dev = pipe.unet, pipe.device
    tc = SimpleNamespace(rank=RANK, alpha=float(RANK), target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    add_lora(unet, tc)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # adapter weights learn in fp32; the frozen UNet stays in the pipeline's dtype
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    opt = _optimizer(params, eight_bit)
    g = torch.Generator().manual_seed(0)
    lat = size // pipe.vae_scale_factor
    width = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    x0 = torch.randn(batch, 4, lat, lat, generator=g).to(dev)
    hidden = torch.randn(batch, 77, width, generator=g).to(dev)
    pooled = torch.randn(batch, pooled_dim, generator=g).to(dev)
    times = time_ids((size, size), (0, 0), (size, size)).expand(batch, 6).to(dev)
    sched = pipe.scheduler
    cuda = torch.device(dev).type == "cuda"
    autocast = torch.autocast("cuda", dtype=unet.dtype) if cuda and unet.dtype != torch.float32 else None

    def step():
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(dev)
        xt = sched.add_noise(x0, noise, t) if hasattr(sched, "add_noise") else x0 + noise
        with autocast or contextlib.nullcontext():
            pred = unet(xt.to(unet.dtype), t, **unet_inputs(hidden.to(unet.dtype), pooled, times)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    unet.train()
    try:
        for _ in range(2):
            step()
        _sync(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        _sync(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged in the benchmark (loss {loss.item()})")
    finally:
        unet.eval()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        unet.delete_adapters("default")
        unet.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return {"images_per_s": batch * steps / seconds, "peak_gib": peak}


def eight_bit_available(device) -> str:
    """ "" if an 8-bit AdamW can run here, else why not (one line)."""
    if torch.device(device).type != "cuda":
        return "8-bit AdamW needs bitsandbytes on a CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "8-bit AdamW needs bitsandbytes (pip install bitsandbytes)"
    return ""


def bench_sdxl(steps: int = 20, images: int = 4, train_steps: int = 10, out: str = "docs", tiny: bool = False) -> int:
    if not tiny and not torch.cuda.is_available():
        print("python -m loop.bench sdxl needs a CUDA GPU (none here); nothing measured or written "
              "(--tiny checks the code path on the embedded SDXL)")  # fmt: skip
        return 1
    if tiny:
        from loop.config import ModelConfig
        from loop.models import load_base

        pipe = load_base(ModelConfig(base="embedded-xl"))
        pipe.set_progress_bar_config(disable=True)
        size, steps, images, train_steps, what = 32, min(steps, 2), min(images, 1), min(train_steps, 2), "embedded-xl"
    else:
        pipe = sdxl_pipeline("cuda", torch.bfloat16)
        size, what = SIZE, f"SDXL shape, random weights, bf16, {torch.cuda.get_device_name()}"
    dev = pipe.device
    print(f"sdxl: {what}, {size}px: generation ({steps} steps, {images} image(s)) ...")
    figures: dict = {"size": size, "steps": steps, "lora_rank": RANK, "model": what}
    figures["gen_images_per_s"] = round(bench_generation(pipe, size, steps, images), 3)
    no_8bit = eight_bit_available(dev)
    rows = [{"what": f"generate, {steps} steps", "batch": 1, "images/s": figures["gen_images_per_s"],
             "peak GiB": "-"}]  # fmt: skip
    # the pipeline's text encoders and VAE are not in a training step (loop trains on cached encodings)
    for batch in (1, 4):
        for ckpt in (False, True):
            for eight in (False, True):
                if eight and no_8bit:
                    figures[f"peak_gib_b{batch}{'_ckpt' if ckpt else ''}_8bit"] = "n/a"
                    continue
                name = f"b{batch}{'_ckpt' if ckpt else ''}{'_8bit' if eight else ''}"
                print(f"sdxl: LoRA training, batch {batch}, gradient checkpointing {ckpt}, 8-bit AdamW {eight} ...")
                r = bench_training(pipe, size, batch, train_steps, ckpt, eight)
                if not ckpt and not eight:
                    figures[f"train_images_per_s_b{batch}"] = round(r["images_per_s"], 3)
                figures[f"peak_gib_{name}"] = None if r["peak_gib"] is None else round(r["peak_gib"], 2)
                rows.append({
                    "what": "LoRA train" + (", grad ckpt" if ckpt else "") + (", 8-bit AdamW" if eight else ""),
                    "batch": batch, "images/s": round(r["images_per_s"], 3),
                    "peak GiB": "-" if r["peak_gib"] is None else round(r["peak_gib"], 2),
                })  # fmt: skip
    if no_8bit:
        figures["note_8bit"] = no_8bit
    print(table(rows))
    if no_8bit:
        print(no_8bit)
    if tiny:
        print("sdxl --tiny: the code path ran; nothing written")
        return 0
    md = (
        "## sdxl\n\n"
        f"`python -m loop.bench sdxl`: {what}, {size}x{size}. Generation is the SDXL pipeline's `pipe()` (one "
        f"image a call, {steps} steps, CFG 5); training is loop's LoRA (rank {RANK}, to_q/k/v/out.0, fp32 adapter on "
        f"a bf16 UNet) on cached latents and text features, {train_steps} steps after 2 warm-up steps. Peak memory is "
        "torch's max_memory_allocated during the training steps.\n\n" + table(rows) + "\n"
        + (f"\n{no_8bit}.\n" if no_8bit else "")
    )  # fmt: skip
    write("sdxl", figures, md, out)
    return 0
