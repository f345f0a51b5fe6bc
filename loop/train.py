"""Training: a DreamBooth-style PEFT LoRA on the UNet, from the selected images and their prompts.

    loop train [--unit N]          trains unit N+1 from checkpoints/unit_{N+1}/selection.json
    loop run --round               (the train phase)

Each image is encoded once: latents (keyed by image hash, VAE identity and resolution) and text
embeddings (keyed by caption and text-encoder identity) live under cache/ and are reused by later rounds.
Non-square images are resized on their shorter side and centre-cropped. The adapter is saved in the
diffusers format (`pytorch_lora_weights.safetensors`, loads with `pipe.load_lora_weights(folder)`), next to
manifest.json, which traces the unit back to the exact images, and the resolved config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from loop.config import LoopConfig, to_yaml
from loop.errors import LoopError
from loop.models import load_base, pick_device
from loop.store import Store
from loop.workspace import TMP_MARK, Workspace, atomic_write, unit_name

WEIGHTS = "pytorch_lora_weights.safetensors"


def _identity(model, base: str) -> str:
    """A short fingerprint of a frozen encoder: where it came from, its config, and a slice of its weights."""
    h = hashlib.sha256(base.encode())
    h.update(
        json.dumps(
            dict(model.config) if hasattr(model.config, "keys") else model.config.to_dict(),
            sort_keys=True,
            default=str,
        ).encode()
    )
    first = next(model.parameters()).detach().float().flatten()[:4096]
    h.update(first.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def load_square(path: Path, size: int) -> torch.Tensor:
    """RGB in [-1, 1], CHW: shorter side resized to `size`, then centre-cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def encode_cached(ws: Workspace, pipe, items: list[dict], size: int, base: str, log=print):
    """Latents and text embeddings for every item, computing only what the cache lacks."""
    vae_id, te_id = _identity(pipe.vae, base), _identity(pipe.text_encoder, base)
    lat_dir, txt_dir = ws.cache("latents"), ws.cache("text")
    latents, embeds, hits, misses = [], [], 0, 0
    seen_captions: dict[Path, torch.Tensor] = {}
    for it in items:
        lat_path = lat_dir / f"{it['sha256']}-{vae_id}-{size}.safetensors"
        cap_key = hashlib.sha256(it["caption"].encode()).hexdigest()[:24]
        txt_path = txt_dir / f"{cap_key}-{te_id}.safetensors"
        if lat_path.exists():
            lat = load_file(lat_path)["latent"]
            hits += 1
        else:
            try:
                x = load_square(ws.root / it["path"], size).unsqueeze(0).to(pipe.device, pipe.vae.dtype)
            except (OSError, ValueError) as e:
                log(f"warning: {it['path']} could not be read ({e}); left out of training")
                continue
            lat = (pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor)[0].float().cpu()
            atomic_write(lat_path, _st_bytes({"latent": lat.contiguous()}))
            misses += 1
        if txt_path in seen_captions:  # many images share a prompt: read or encode each caption once
            emb = seen_captions[txt_path]
        elif txt_path.exists():
            emb = load_file(txt_path)["embedding"]
        else:
            ids = pipe.tokenizer(
                it["caption"],
                padding="max_length",
                truncation=True,
                max_length=pipe.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            emb = pipe.text_encoder(ids.to(pipe.device))[0][0].float().cpu()
            atomic_write(txt_path, _st_bytes({"embedding": emb.contiguous()}))
        seen_captions[txt_path] = emb
        latents.append(lat)
        embeds.append(emb)
    log(f"encode cache: {hits} hit(s), {misses} miss(es)")
    if not latents:
        raise LoopError("none of the selected images could be read; check the files listed above")
    return torch.stack(latents), torch.stack(embeds), {"cache_hits": hits, "cache_misses": misses}


def _st_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def train_lora(ws: Workspace, store: Store, cfg: LoopConfig, parent: int, log=print) -> dict:
    """Train unit parent+1 from its selection.json; writes weights, manifest.json and config.yaml."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    tc = cfg.train
    unit = parent + 1
    out = ws.checkpoint(unit)
    sel_path = out / "selection.json"
    if not sel_path.exists():
        raise LoopError(f"no selection for unit {unit} at {ws.rel(sel_path)}; run `loop run --round {parent}` first")
    selection = json.loads(sel_path.read_text())["images"]
    t0 = time.time()

    # 1. the base model in fp32 (accelerate handles mixed precision); everything frozen
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=pick_device(cfg.model).type == "cpu")
    pipe = load_base(cfg.model, device=accelerator.device, dtype=torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for m in (pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)

    # 2. encode each selected image once (cached across rounds)
    latents, embeds, cache_stats = encode_cached(ws, pipe, selection, size, cfg.model.base, log)

    # 3. the LoRA adapter, through PEFT, and the loop: sample cached latents, noise them, predict the noise
    unet = add_lora(pipe.unet, tc)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, ema = fit(unet, latents, embeds, noise_sched, tc, accelerator, desc=f"train {unit_name(unit)}")

    # 5. save: weights (diffusers format), then config.yaml, then manifest.json last (it marks the unit done)
    manifest = {}
    if accelerator.is_main_process:
        save_lora(unet, out)
        atomic_write(out / "config.yaml", to_yaml(cfg))
        manifest = {
            "unit": unit,
            "parent": parent,
            "base_model": cfg.model.base,
            "method": tc.method,
            "start": tc.start,
            "strategy": cfg.select.strategy,
            "images": [{k: it[k] for k in ("id", "sha256", "caption", "tier")} for it in selection],
            "config": json.loads(json.dumps(_plain(cfg))),
            "steps": tc.steps,
            "final_loss": round(ema, 6),
            "duration_s": round(time.time() - t0, 2),
            **cache_stats,
        }
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        store.add_unit(
            unit,
            parent=parent,
            path=ws.rel(out),
            base=cfg.model.base,
            method=tc.method,
            strategy=cfg.select.strategy,
            manifest={k: v for k, v in manifest.items() if k != "images"},
        )
    return manifest


def save_lora(unet, folder: Path) -> Path:
    """Write the UNet's adapter as folder/pytorch_lora_weights.safetensors (diffusers format), atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    tmp = folder / f".save{TMP_MARK}{os.getpid()}-{time.time_ns()}"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    (tmp / WEIGHTS).replace(folder / WEIGHTS)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHTS


def add_lora(unet, tc):
    """Freeze the UNet and attach a PEFT LoRA adapter to tc.target_modules."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    lora = LoraConfig(
        r=tc.rank, lora_alpha=tc.alpha, init_lora_weights="gaussian", target_modules=list(tc.target_modules)
    )
    try:
        unet.add_adapter(lora)
    except ValueError as e:
        raise LoopError(f"train.target_modules={list(tc.target_modules)} matched nothing in the UNet: {e}") from e
    return unet


def snr_weights(noise_sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weights for the epsilon loss: min(SNR, gamma) / SNR; all ones when gamma is 0.

    They shrink the low-noise (detail) timesteps relative to the high-noise ones, where colour and layout
    are decided, and steady training (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting").
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t)
    return (torch.clamp(snr, max=gamma) / snr).to(t.device)


def fit(unet, latents, embeds, noise_sched, tc, accelerator, desc: str = "train"):
    """tc.steps optimizer steps of the epsilon-prediction loss on cached latents; returns (unet, smoothed loss)."""
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tc.steps // 20)))
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    gen = torch.Generator().manual_seed(tc.seed)
    unet.train()
    bar = tqdm(range(tc.steps), desc=desc, disable=not accelerator.is_main_process)
    ema = float("nan")
    bs = min(tc.batch_size, len(latents))
    for step in bar:
        idx = torch.randint(0, len(latents), (bs,), generator=gen)
        x0 = latents[idx].to(accelerator.device)
        cond = embeds[idx].to(accelerator.device)
        noise = torch.randn(x0.shape, generator=gen).to(accelerator.device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (bs,), generator=gen).to(accelerator.device)
        with accelerator.autocast():
            pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        per_item = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * snr_weights(noise_sched, t, tc.snr_gamma)).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if step == 0 else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    if not math.isfinite(ema):
        raise LoopError(f"training diverged (loss {ema}); lower train.lr (now {tc.lr})")
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    return unet, ema


def _plain(cfg: LoopConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
