"""Training a unit: DreamBooth-style LoRA or Custom Diffusion, through PEFT and accelerate.

    loop train [--unit N]           trains unit N+1 from checkpoints/unit_{N+1}/selection.json
    loop train --processes 2        the same with DDP (accelerate launch; gloo on CPU)
    loop run --round                (the train phase)

Methods (`train.method`):
- lora: a LoRA on the UNet's attention projections (`train.target_modules`), optionally on the text encoder
  (`train.text_encoder_lora`).
- custom_diffusion: as in "Multi-Concept Customization of Text-to-Image Diffusion" (Kumari et al., 2023), only
  the cross-attention key and value projections (attn2.to_k, attn2.to_v) learn, plus optionally one new
  modifier token (`train.modifier_token`, initialised from `train.initializer_token`) whose embedding row is
  the only part of the text encoder that learns. We use the paper's low-rank variant (a PEFT LoRA on to_k and
  to_v) rather than full K/V: it is saved in the ordinary diffusers LoRA format, so it loads with
  `load_lora_weights` everywhere, and it avoids diffusers' Custom Diffusion attention processors, which
  silently fail to load their weights when peft is installed (diffusers issues #7261 and #9320). The token's
  embedding is saved as learned_embeds.safetensors, the textual-inversion format `load_textual_inversion` reads.

Both: min-SNR-gamma weighting, noise offset, optional prior preservation (class images made once by the base
model and cached). `train.start`: from_base (default: a new adapter on the accumulated set, which keeps drift
in check) or from_parent (continue unit N's adapter).

Cache: latents keyed by image hash, VAE identity and resolution; text embeddings keyed by caption and
text-encoder identity (when the text encoder is frozen). A round encodes only images it hasn't seen.
Non-square images are resized on their shorter side and centre-cropped (documented crop policy).

Resume: an accelerate checkpoint (adapter, optimizer, scheduler, RNG) every `train.checkpoint_every` steps in
checkpoints/unit_NNN/.training/; after a kill, training the same selection with the same settings resumes
from the last one. Weights are written before manifest.json, which marks the unit done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from loop.config import LoopConfig, to_yaml
from loop.errors import LoopError
from loop.models import load_base, peft_named_copy, pick_device
from loop.objectives import diffusion_dpo_loss, per_item_error, preference_pairs, supervised_loss
from loop.store import Store
from loop.workspace import TMP_MARK, UMASK, Workspace, atomic_write, sha256_file, unit_name

WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"
CD_TARGETS = ["attn2.to_k", "attn2.to_v"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_latents(ws: Workspace, pipe, items: list[dict], size: int, base: str, log=print):
    """Latents for every readable item, computing only what the cache lacks; returns (latents, kept, stats)."""
    vae_id = _identity(pipe.vae, base)
    lat_dir = ws.cache("latents")
    latents, kept, hits, misses = [], [], 0, 0
    for it in items:
        lat_path = lat_dir / f"{it['sha256']}-{vae_id}-{size}.safetensors"
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
        latents.append(lat)
        kept.append(it)
    return latents, kept, {"cache_hits": hits, "cache_misses": misses}


@torch.no_grad()
def encode_texts(ws: Workspace, pipe, captions: list[str], base: str) -> torch.Tensor:
    """Frozen-text-encoder embeddings, one per caption, each distinct caption read or encoded once."""
    te_id = _identity(pipe.text_encoder, base)
    txt_dir = ws.cache("text")
    seen: dict[str, torch.Tensor] = {}
    out = []
    for cap in captions:
        if cap not in seen:
            path = txt_dir / f"{hashlib.sha256(cap.encode()).hexdigest()[:24]}-{te_id}.safetensors"
            if path.exists():
                seen[cap] = load_file(path)["embedding"]
            else:
                seen[cap] = pipe.text_encoder(_token_ids(pipe.tokenizer, [cap]).to(pipe.device))[0][0].float().cpu()
                atomic_write(path, _st_bytes({"embedding": seen[cap].contiguous()}))
        out.append(seen[cap])
    return torch.stack(out)


def _st_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


@dataclass
class TrainData:
    """What one step samples from: cached latents, and either cached text embeddings or token ids (when the
    text encoder learns). Items with prior=True are class images for prior preservation."""

    latents: torch.Tensor
    embeds: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    prior: torch.Tensor | None = None  # bool per item
    weights: torch.Tensor | None = None  # sampling weight per item (selection.json's "weight"); None: uniform
    empty: torch.Tensor | None = None  # the empty caption's embedding (or ids): what a dropped caption becomes
    empty_embed: torch.Tensor | None = None  # the empty caption through the frozen text encoder (base targets)
    pairs: torch.Tensor | None = None  # train.objective=dpo: (better, worse) rows into latents, one pair a row


# -- class images (prior preservation) ---------------------------------------------------------------------
@torch.no_grad()
def class_images(ws: Workspace, pipe, prompts: list[str], n: int, cfg: LoopConfig, log=print) -> list[dict]:
    """`n` base-model images per prompt, made once and cached under cache/class/ (keyed by base identity)."""
    folder = ws.cache("class", _identity(pipe.unet, cfg.model.base))
    items, todo = [], []
    for prompt in sorted(set(prompts)):
        key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        for seed in range(n):
            path = folder / f"{key}-{seed}.png"
            (items if path.exists() else todo).append((prompt, seed, path))
    if todo:
        log(f"prior preservation: making {len(todo)} class image(s) with the base model (once; cached)")
    for prompt, seed, path in todo:
        image = pipe(
            prompt,
            num_inference_steps=cfg.generate.steps,
            guidance_scale=cfg.generate.cfg,
            generator=torch.Generator(pipe.device).manual_seed(seed),
        ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write(path, buf.getvalue())
    out = []
    for prompt, _seed, path in sorted(items + todo, key=lambda x: (x[0], x[1])):
        sha = sha256_file(path)
        out.append({"id": None, "sha256": sha, "path": ws.rel(path), "caption": prompt, "prior": True})
    return out


# -- adapters ----------------------------------------------------------------------------------------------
def add_lora(unet, tc, targets: list[str] | None = None):
    """Freeze the UNet and attach a PEFT LoRA adapter to `targets` (default tc.target_modules)."""
    from peft import LoraConfig

    targets = list(targets or tc.target_modules)
    unet.requires_grad_(False)
    lora = LoraConfig(r=tc.rank, lora_alpha=tc.alpha, init_lora_weights="gaussian", target_modules=targets)
    try:
        unet.add_adapter(lora)
    except ValueError as e:
        raise LoopError(f"train.target_modules={targets} matched nothing in the UNet: {e}") from e
    return unet


def add_text_lora(text_encoder, tc):
    from peft import LoraConfig

    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(
        LoraConfig(r=tc.rank, lora_alpha=tc.alpha, init_lora_weights="gaussian", target_modules=TE_TARGETS)
    )
    return text_encoder


def add_modifier_token(tokenizer, text_encoder, token: str, initializer: str) -> int:
    """Add `token` to the tokenizer; its embedding row starts as the initializer word's (mean over its pieces).
    Returns the new row's index."""
    if token in tokenizer.get_vocab():
        raise LoopError(f"train.modifier_token={token!r} is already a word of the tokenizer; pick a new one")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise LoopError(f"train.initializer_token={initializer!r} gives no tokens; give an ordinary word")
    tokenizer.add_tokens([token])
    new_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[new_id] = table[init_ids].mean(dim=0)
    return new_id


def load_parent_adapter(pipe, folder: Path, tc) -> None:
    """from_parent: copy unit N's adapter weights into the freshly attached adapter(s) of the same shape."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    if not (folder / WEIGHTS).exists():
        raise LoopError(f"train.start=from_parent needs the parent's weights at {folder / WEIGHTS}")
    with peft_named_copy(folder / WEIGHTS) as where:  # a unit saved with both namings (see DIFFUSERS_LORA_NAMES)
        sd, _ = StableDiffusionPipeline.lora_state_dict(str(where.parent), weight_name=where.name)
    unet_sd = convert_unet_state_dict_to_peft({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    try:
        out = set_peft_model_state_dict(pipe.unet, unet_sd, adapter_name="default")
    except RuntimeError as e:  # shapes differ: another rank
        raise LoopError(
            f"the parent adapter at {folder} does not match this one ({str(e).splitlines()[1].strip()[:120]}): "
            "train.method, rank and target_modules must be the parent's for from_parent"
        ) from e
    missing = [k for k in getattr(out, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(out, "unexpected_keys", []))
    if missing or unexpected:
        raise LoopError(
            f"the parent adapter at {folder} does not match this one ({len(missing)} missing, {len(unexpected)} "
            "unexpected weights): train.method, rank and target_modules must be the parent's for from_parent"
        )
    te_sd = {k[13:]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    if te_sd and getattr(pipe.text_encoder, "peft_config", None):
        set_peft_model_state_dict(pipe.text_encoder, convert_unet_state_dict_to_peft(te_sd), adapter_name="default")


def _trainable(*modules) -> dict[str, torch.nn.Parameter]:
    """The parameters that learn, by "<module index>.<name>" (the key of a checkpoint's trainable.pt)."""
    return {
        f"{i}.{n}": p
        for i, m in enumerate(modules)
        if m is not None
        for n, p in m.named_parameters()
        if p.requires_grad
    }


# -- the loop ----------------------------------------------------------------------------------------------
def timestep_weights(num: int, tc) -> torch.Tensor | None:
    """Sampling weights over the `num` training timesteps for train.timestep_bias; None for uniform."""
    if tc.timestep_bias == "none" or tc.timestep_bias_multiplier == 1.0:
        return None
    w = torch.ones(num, dtype=torch.float64)
    k = max(1, int(num * tc.timestep_bias_portion))
    if tc.timestep_bias == "later":
        w[num - k :] *= tc.timestep_bias_multiplier
    else:
        w[:k] *= tc.timestep_bias_multiplier
    return w


def snr_weights(noise_sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma loss weights; all ones when gamma is 0.

    min(SNR, gamma) / SNR for an epsilon loss, min(SNR, gamma) / (SNR + 1) for a v loss (the same weighting
    in x0 terms). They shrink the low-noise (detail) timesteps relative to the high-noise ones, where colour
    and layout are decided, and steady training (Hang et al., "Efficient Diffusion Training via Min-SNR
    Weighting"). On a zero-terminal-SNR schedule the last timestep's SNR is 0; the epsilon form is clamped there.
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t)
    if noise_sched.config.prediction_type == "v_prediction":
        return (torch.clamp(snr, max=gamma) / (snr + 1)).to(t.device)
    return (torch.clamp(snr, max=gamma) / snr.clamp(min=1e-8)).clamp(max=1.0).to(t.device)


def loss_target(noise_sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models (SD 2.x,
    the embedded model)."""
    kind = noise_sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_sched.get_velocity(x0, noise, t)
    raise LoopError(f"model.base predicts {kind!r}; loop trains epsilon and v_prediction models only")


@torch.no_grad()
def base_prediction(unet, accelerator, xt, t, empty_embed, dev, micro: int) -> torch.Tensor:
    """The frozen base model's unconditional prediction (adapters off): the target that keeps a unit's
    unconditional branch where the base had it (train.uncond_preservation). Run in micro-batches of `micro`
    items; the adapters are switched off once for all of them."""
    model = accelerator.unwrap_model(unet)
    model.disable_adapters()
    try:
        out = []
        for i in range(0, len(xt), micro):
            x, tt = xt[i : i + micro].to(dev), t[i : i + micro].to(dev)
            with accelerator.autocast():
                cond = empty_embed.to(dev).unsqueeze(0).expand(len(x), -1, -1)
                out.append(unet(x, tt, encoder_hidden_states=cond).sample.float())
        return torch.cat(out)
    finally:
        model.enable_adapters()


class BaseTargets:
    """train.uncond_preservation's items, drawn and predicted ahead, CHUNK steps at a time.

    Each step a Bernoulli(share) mask over the batch picks the positions that get the empty caption and the
    frozen base model's own prediction as target. Their latent (drawn uniformly from the position's pool:
    instance or prior images), noise and timestep are drawn ahead for CHUNK steps, and the base predictions
    for all of them are made with the adapters off once per chunk, in micro-batches of the training batch
    size. Done per step, the same work cost a forward of a couple of items every step, which on a small model
    costs almost as much as a full batch's (the per-call overhead dominates); in chunks it is about one
    forward per CHUNK/batch steps' worth of items. The base is frozen, so the targets are exactly what a per-step
    forward would give. Each chunk has its own generator, seeded by (seed, process, chunk), so a run resumed
    from a checkpoint draws the same items as a straight one.
    """

    CHUNK = 32

    def __init__(self, unet, accelerator, data, noise_sched, tc, t_weights, pools: list[torch.Tensor], dev):
        self.unet, self.acc, self.data, self.sched, self.tc = unet, accelerator, data, noise_sched, tc
        self.t_weights, self.pools, self.dev = t_weights, pools, dev  # pools[i]: latent rows for position i
        self.chunk, self.steps = -1, []

    def _fill(self, c: int) -> None:
        tc = self.tc
        g = torch.Generator().manual_seed(1_000_003 * (tc.seed + 1) + 7919 * self.acc.process_index + c)
        first, last = c * self.CHUNK, min((c + 1) * self.CHUNK, tc.steps)
        masks = [torch.rand(len(self.pools), generator=g) < tc.uncond_preservation for _ in range(first, last)]
        rows = [int(pool[torch.randint(0, len(pool), (1,), generator=g)]) for m in masks
                for pool, kept in zip(self.pools, m.tolist()) if kept]  # fmt: skip
        x0 = self.data.latents[torch.tensor(rows, dtype=torch.long)] if rows else self.data.latents[:0]
        noise = torch.randn(x0.shape, generator=g)
        if tc.noise_offset:
            noise = noise + tc.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        num = self.sched.config.num_train_timesteps
        if self.t_weights is None:
            t = torch.randint(0, num, (len(rows),), generator=g)
        else:
            t = torch.multinomial(self.t_weights, len(rows), replacement=True, generator=g)
        xt = self.sched.add_noise(x0, noise, t)
        pred = (
            base_prediction(self.unet, self.acc, xt, t, self.data.empty_embed, self.dev, micro=tc.batch_size)
            if rows
            else xt
        )
        self.steps, at = [], 0
        for m in masks:
            k = int(m.sum())
            self.steps.append((m, xt[at : at + k], t[at : at + k], pred[at : at + k]))
            at += k
        self.chunk = c

    def at(self, step: int):
        """(mask over the batch, x_t, t, target) for the kept positions of this step."""
        c = step // self.CHUNK
        if c != self.chunk:
            self._fill(c)
        return self.steps[step - c * self.CHUNK]


def dpo_batch_loss(unet, data, noise_sched, tc, accelerator, gen, t_weights, dev, te_learns: bool):
    """One step of train.objective=dpo: batch_size/2 pairs, each winner and loser noised with the same noise at the
    same timestep, through the unit and through the reference (the same UNet with its adapter switched off), and
    the Diffusion-DPO loss on their errors (loop.objectives). train.uncond_preservation's share of the batch gets
    the empty caption and the reference's own prediction as target, as in supervised training, so guidance keeps
    amplifying what the unit learned; dpo_sft_weight adds the supervised loss on the winners."""
    if te_learns:
        raise LoopError("train.objective=dpo trains the UNet only; set train.text_encoder_lora=false "
                        "(and, for custom_diffusion, train.modifier_token=)")  # fmt: skip
    n = max(1, tc.batch_size // 2)
    pick = data.pairs[torch.randint(0, len(data.pairs), (n,), generator=gen)]
    rows = torch.cat([pick[:, 0], pick[:, 1]])
    noise = torch.randn((n, *data.latents.shape[1:]), generator=gen)
    noise = torch.cat([noise, noise])
    num = noise_sched.config.num_train_timesteps
    if t_weights is None:
        t = torch.randint(0, num, (n,), generator=gen)
    else:
        t = torch.multinomial(t_weights, n, replacement=True, generator=gen)
    t = torch.cat([t, t])
    cond = data.embeds[rows]
    # uncond preservation: some of the pairs' images again, fresh noise and timestep, the empty caption
    k = int(round(tc.uncond_preservation * 2 * n))
    if k:
        extra = rows[torch.randint(0, len(rows), (k,), generator=gen)]
        rows = torch.cat([rows, extra])
        noise = torch.cat([noise, torch.randn((k, *data.latents.shape[1:]), generator=gen)])
        t = torch.cat([t, torch.randint(0, num, (k,), generator=gen)])
        cond = torch.cat([cond, data.empty_embed.unsqueeze(0).expand(k, *data.empty_embed.shape)])
    x0 = data.latents[rows]
    xt = noise_sched.add_noise(x0, noise, t).to(dev)
    target = loss_target(noise_sched, x0, noise, t).to(dev)
    t, cond = t.to(dev), cond.to(dev)
    model = accelerator.unwrap_model(unet)
    with torch.no_grad(), accelerator.autocast():
        model.disable_adapters()
        try:
            ref = unet(xt, t, encoder_hidden_states=cond).sample.float()
        finally:
            model.enable_adapters()
    with accelerator.autocast():
        pred = unet(xt, t, encoder_hidden_states=cond).sample
    err, ref_err = per_item_error(pred[: 2 * n], target[: 2 * n]), per_item_error(ref[: 2 * n], target[: 2 * n])
    loss, _ = diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], tc.dpo_beta)
    if k:
        loss = loss + per_item_error(pred[2 * n :], ref[2 * n :]).mean()
    if tc.dpo_sft_weight:
        loss = loss + tc.dpo_sft_weight * supervised_loss(err[:n])
    return loss


class Checkpoints:
    """accelerate checkpoints in `folder`, tied to a fingerprint of the selection and the settings."""

    def __init__(self, folder: Path | None, fingerprint: str, accelerator, modules: list, log=print):
        self.folder, self.fingerprint, self.acc, self.modules, self.log = (
            folder,
            fingerprint,
            accelerator,
            modules,
            log,
        )
        if folder is None:
            return
        from accelerate.utils import broadcast_object_list

        # every process writes its part of a checkpoint (its RNG states, its generator) into one temporary folder,
        # named with the main process's pid (recovery spares a live writer's temporary files). Each process's own
        # pid gave the others' parts folders that were never renamed into place, so a resumed multi-process
        # training lost their random states
        self.writer = broadcast_object_list([os.getpid()])[0]

        # only the trainable tensors go into a checkpoint, not the whole frozen model (as diffusers' scripts do)
        def save_hook(models, weights, output_dir):
            while weights:
                weights.pop()
            saved = {k: p.detach().cpu().clone() for k, p in _trainable(*self.modules).items()}
            torch.save(saved, Path(output_dir) / "trainable.pt")

        def load_hook(models, input_dir):
            while models:
                models.pop()
            saved = torch.load(Path(input_dir) / "trainable.pt", weights_only=True)
            params = _trainable(*self.modules)
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def latest(self) -> tuple[Path, dict] | None:
        if self.folder is None or not self.folder.exists():
            return None
        found, other = [], []
        for d in self.folder.glob("step_*"):
            info = d / "loop.json"
            if info.exists():
                meta = json.loads(info.read_text())
                (found if meta.get("fingerprint") == self.fingerprint else other).append((meta["step"], d, meta))
        if not found:
            if other and self.acc.is_main_process:
                step, d, _ = max(other, key=lambda x: x[0])
                self.log(f"the checkpoint at step {step} ({d.parent.name}/{d.name}) was made with other train "
                         "settings or another selection: training starts over from step 0 (the old checkpoint is "
                         "replaced at the first new one)")  # fmt: skip
            return None
        step, d, meta = max(found, key=lambda x: x[0])
        return d, meta

    def save(self, step: int, gen: torch.Generator, ema: float, avg=None) -> None:
        """Write step_NNNNNN via a temporary folder renamed into place (all processes call this)."""
        final = self.folder / f"step_{step:06d}"
        tmp = self.folder / f".step_{step:06d}{TMP_MARK}{self.writer}-0"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        torch.save(gen.get_state(), tmp / f"gen_{self.acc.process_index}.pt")
        if avg is not None and self.acc.is_main_process:  # train.ema's average (the same in every process)
            torch.save(avg.state_dict(), tmp / "ema_weights.pt")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            atomic_write(tmp / "loop.json", json.dumps({"fingerprint": self.fingerprint, "step": step, "ema": ema}))
            if final.exists():  # one of other settings (see latest): a rename cannot replace a folder with files
                shutil.rmtree(final)
            tmp.replace(final)
            for old in self.folder.glob("step_*"):  # keep the newest only
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def load(self, where: Path, gen: torch.Generator, avg=None) -> None:
        self.acc.load_state(str(where))
        gen_path = where / f"gen_{self.acc.process_index}.pt"
        if gen_path.exists():
            gen.set_state(torch.load(gen_path, weights_only=True))
        if avg is not None and (where / "ema_weights.pt").exists():
            avg.load_state_dict(torch.load(where / "ema_weights.pt", weights_only=True))

    def clear(self) -> None:
        if self.folder is not None and self.acc.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)


def lr_factor(tc, step: int) -> float:
    """The learning rate at `step`, as a share of train.lr: a linear warm-up over steps/20, then constant or a
    cosine decay that reaches 0 at the last step."""
    warm = max(1, tc.steps // 20)
    if step < warm:
        return (step + 1) / warm
    if tc.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm + 1) / max(1, tc.steps - warm))))
    return 1.0


def fit(
    unet,
    data: TrainData,
    noise_sched,
    tc,
    accelerator,
    desc: str = "train",
    text_encoder=None,
    keep_rows: tuple[torch.Tensor, int] | None = None,
    checkpoints: Checkpoints | None = None,
    stop_after: int | None = None,
    log=print,
):
    """tc.steps optimizer steps of the diffusion loss (epsilon or v, as the base predicts); returns (unet,
    text_encoder, smoothed loss).

    `text_encoder` is given when it learns (a LoRA or a modifier token): captions are then encoded every step
    from `data.ids`. `keep_rows` = (original embedding table, new row): every other row is restored after each
    step, so only the new token's embedding learns (AdamW's weight decay would otherwise move them too).
    """
    te_learns = text_encoder is not None
    modules = [unet] + ([text_encoder] if te_learns else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    # fused AdamW (one kernel over all parameters; CPU since torch 2.4): on the embedded model's LoRA its step takes
    # 0.7 ms instead of the default foreach's 4.0 ms, about 8% of a training step. Other devices keep the default.
    fused = accelerator.device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, tc))
    if te_learns:
        unet, text_encoder, opt, sched = accelerator.prepare(unet, text_encoder, opt, sched)
    else:
        unet, opt, sched = accelerator.prepare(unet, opt, sched)
    gen = torch.Generator().manual_seed(tc.seed + accelerator.process_index)  # each process its own batches
    # train.ema: an exponential moving average of the trainable weights, copied in when training ends
    avg = None
    if tc.ema:
        from diffusers.training_utils import EMAModel

        avg = EMAModel(params)
    start, ema = 0, float("nan")
    if checkpoints is not None:
        found = checkpoints.latest()
        if found:
            where, meta = found
            checkpoints.load(where, gen, avg)
            start, ema = meta["step"], meta["ema"]
            if accelerator.is_main_process:  # once, not once per process
                checkpoints.log(f"resuming training from step {start} of {tc.steps} ({where.name})")
    unet.train()
    # train.compile: only the training step's forward (and so its backward) runs compiled; the base-target
    # forwards (BaseTargets, other batch sizes, adapters off) stay eager rather than compile a second graph
    step_unet = torch.compile(unet) if tc.compile else unet
    dev = accelerator.device
    inst = torch.arange(len(data.latents)) if data.prior is None else torch.nonzero(~data.prior).flatten()
    prior = None if data.prior is None else torch.nonzero(data.prior).flatten()
    bs = min(tc.batch_size, len(inst))
    bar = tqdm(
        range(start, tc.steps), desc=desc, disable=not accelerator.is_main_process, initial=start, total=tc.steps
    )
    t_weights = timestep_weights(noise_sched.config.num_train_timesteps, tc)
    bank = None
    if data.empty is not None and tc.uncond_preservation and data.pairs is None:
        pools = [inst] * bs + ([prior] * bs if prior is not None and len(prior) else [])
        bank = BaseTargets(unet, accelerator, data, noise_sched, tc, t_weights, pools, dev)
    w = None if data.weights is None else data.weights[inst].double()
    if w is not None and bool((w == w[0]).all()):
        w = None  # uniform: the plain sampler (same batches as before weights existed)
    for step in bar:
        if data.pairs is not None:  # train.objective=dpo: pairs of the same prompt, better against worse
            loss = dpo_batch_loss(unet, data, noise_sched, tc, accelerator, gen, t_weights, dev, te_learns)
        else:
            if w is None:
                idx = inst[torch.randint(0, len(inst), (bs,), generator=gen)]
            else:
                idx = inst[torch.multinomial(w, bs, replacement=True, generator=gen)]
            if prior is not None and len(prior):
                idx = torch.cat([idx, prior[torch.randint(0, len(prior), (bs,), generator=gen)]])
            x0 = data.latents[idx].to(dev)
            noise = torch.randn(x0.shape, generator=gen)
            if tc.noise_offset:
                noise = noise + tc.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
            noise = noise.to(dev)
            if t_weights is None:
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(dev)
            else:
                t = torch.multinomial(t_weights, len(idx), replacement=True, generator=gen).to(dev)
            cap = (data.ids if te_learns else data.embeds)[idx]
            drop = keep = None
            if data.empty is not None and tc.caption_dropout:
                drop = torch.rand(len(idx), generator=gen) < tc.caption_dropout
            if bank is not None:
                keep, xk, tk, yk = bank.at(step)
                drop = keep if drop is None else drop | keep
            if drop is not None:
                cap = torch.where(drop.view(-1, *[1] * (cap.dim() - 1)), data.empty.to(cap.dtype), cap)
            xt = noise_sched.add_noise(x0, noise, t)
            target = loss_target(noise_sched, x0, noise, t)
            if keep is not None and bool(keep.any()):  # the base's own prediction for these (see BaseTargets)
                kd = keep.to(dev)
                xt, t, target = xt.clone(), t.clone(), target.clone()
                xt[kd], t[kd], target[kd] = xk.to(dev), tk.to(dev), yk.to(dev)
            with accelerator.autocast():
                cond = text_encoder(cap.to(dev))[0] if te_learns else cap.to(dev)
                try:
                    pred = step_unet(xt, t, encoder_hidden_states=cond).sample
                except Exception as e:  # compiling happens at the first call; a failure there falls back to eager
                    if step_unet is unet:
                        raise
                    log(f"train.compile: compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "training eagerly instead")  # fmt: skip
                    step_unet = unet
                    pred = unet(xt, t, encoder_hidden_states=cond).sample
            per_item = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            per_item = per_item * snr_weights(noise_sched, t, tc.snr_gamma)
            if prior is not None and len(prior):
                loss = per_item[:bs].mean() + tc.prior_weight * per_item[bs:].mean()
            else:
                loss = per_item.mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if keep_rows is not None:
            original, row = keep_rows
            table = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight
            with torch.no_grad():
                mask = torch.ones(len(original), dtype=torch.bool)
                mask[row] = False
                table[mask] = original[mask].to(table.device)
        if avg is not None:  # after the rows above are restored, so the average holds them as they are
            avg.step(params)
        ema = loss.item() if step == 0 or not math.isfinite(ema) else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        done = step + 1
        if checkpoints is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
            checkpoints.save(done, gen, ema, avg)
        if stop_after is not None and done >= stop_after:  # tests: end "mid-training" at a known step
            break
    if not math.isfinite(ema):
        raise LoopError(f"training diverged (loss {ema}); lower train.lr (now {tc.lr})")
    accelerator.wait_for_everyone()
    if avg is not None:
        avg.copy_to(params)
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    if te_learns:
        text_encoder = accelerator.unwrap_model(text_encoder)
        text_encoder.eval()
    return unet, text_encoder, ema


# -- a whole unit ------------------------------------------------------------------------------------------
def check_can_train(ws: Workspace, store: Store, parent: int) -> dict:
    """The selection.json of unit parent+1, or LoopError saying why it cannot be trained now (also checked before
    `loop train --processes N` launches its workers, so a mistake is said once, not once per process)."""
    unit = parent + 1
    out = ws.checkpoint(unit)
    if store.unit(parent) is None:
        from loop.round import raise_missing_unit  # round imports this module

        raise_missing_unit(store, parent)
    if store.unit(unit) is not None:
        # retraining would replace the weights that unit's images (and any later unit) were made with
        raise LoopError(
            f"unit {unit} already exists ({ws.rel(out)}, trained from unit {parent}); retraining it would replace the "
            f"weights its images came from. `--unit N` names the parent: to train unit {store.current_unit() + 1}, "
            f"run `loop run --round` (or `loop train` once that round has a selection)"
        )
    sel_path = out / "selection.json"
    if not sel_path.exists():
        raise LoopError(f"no selection for unit {unit} at {ws.rel(sel_path)}; run `loop run --round {parent}` first")
    sel_doc = json.loads(sel_path.read_text())
    if not sel_doc.get("images"):
        raise LoopError(f"the selection for unit {unit} is empty; rate some images higher, then select again")
    return sel_doc


def preference_items(store: Store, cfg: LoopConfig, parent: int, selection: list[dict]) -> list[dict]:
    """train.objective=dpo's images: the rated txt2img images units made in rounds up to `parent` (only round
    `parent` with select.accumulate=false) that make a pair (loop.objectives): the better image one the strategy
    selected (winner=True: golden's UR images, converge's min_tier and up), the worse any image of the same
    prompt rated train.dpo_min_gap tiers or more below it. None make a pair: an empty list."""
    chosen = {it.get("id") for it in selection}
    rows = [
        {**dict(r), "winner": r["id"] in chosen} for r in store.images()
        if r["tier"] is not None and r["unit"] is not None and r["parent_id"] is None and r["round"] is not None
        and r["round"] <= parent and (cfg.select.accumulate or r["round"] == parent)
    ]  # fmt: skip
    used = sorted({i for pair in preference_pairs(rows, cfg.train.dpo_min_gap) for i in pair})
    keys = ("id", "sha256", "path", "tier", "unit", "round", "source", "winner")
    return [{**{k: rows[i][k] for k in keys}, "caption": rows[i]["prompt"], "prior": False} for i in used]


def no_pairs_message(tc) -> str:
    return (
        f"train.objective=dpo needs a selected image and an image of the same prompt rated at least "
        f"{tc.dpo_min_gap} tiers below it (train.dpo_min_gap), and there are none"
    )


def train_unit(ws: Workspace, store: Store, cfg: LoopConfig, parent: int, log=print, stop_after=None) -> dict:
    """Train unit parent+1 from its selection.json; writes the adapter, manifest.json and config.yaml."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    tc = cfg.train
    unit = parent + 1
    out = ws.checkpoint(unit)
    sel_doc = check_can_train(ws, store, parent)
    selection = sel_doc["images"]
    # the unit records the strategy its selection was made with: select.* given now (after the select phase was
    # done) cannot change what this unit learns from, only the next round's selection
    strategy = sel_doc.get("strategy") or cfg.select.strategy
    if strategy != cfg.select.strategy:
        log(f"the selection for unit {unit} was made with select.strategy={strategy} (selection.json); "
            f"select.strategy={cfg.select.strategy} applies from the next round")  # fmt: skip
        cfg = dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, strategy=strategy))
    t0 = time.time()

    # 1. the base model in fp32 (accelerate handles mixed precision); everything frozen
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=pick_device(cfg.model).type == "cpu")
    pipe = load_base(cfg.model, device=accelerator.device, dtype=torch.float32)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False)
    cd = tc.method == "custom_diffusion"
    token = tc.modifier_token if cd else ""
    te_lora = tc.method == "lora" and tc.text_encoder_lora
    fallback = ""  # why a unit asked to train with dpo trains supervised (said in the log and the manifest)
    if tc.objective == "dpo" and (cd or te_lora):
        fallback = ("train.objective=dpo trains the UNet's adapter only; this unit's text encoder learns too "
                    f"({'custom_diffusion' if cd else 'text_encoder_lora'})")  # fmt: skip
        log(f"{fallback}, so it trains supervised")
        tc = dataclasses.replace(tc, objective="supervised")
        cfg = dataclasses.replace(cfg, train=tc)

    # 2. class images (made by the base model, before any adapter is attached), then the latents (cached)
    items = [dict(it, prior=False) for it in selection]
    if tc.objective == "dpo":  # the selection's images against worse-rated images of the same prompts
        paired = preference_items(store, cfg, parent, selection)
        items = paired or items
        if not paired:  # a small round, hand-picked or imported images: nothing to prefer them to
            fallback = no_pairs_message(tc)
            log(
                f"{fallback}, so this unit trains supervised on its selection (rate more images of each prompt, "
                "or lower train.dpo_min_gap, for a unit that learns from every tier)"
            )
            tc = dataclasses.replace(tc, objective="supervised")
            cfg = dataclasses.replace(cfg, train=tc)
    if tc.prior_preservation and tc.objective != "dpo":
        items += class_images(ws, pipe, [it["caption"] for it in selection], tc.class_images, cfg, log)
    asked = {it["sha256"] for it in items if not it["prior"]}  # dpo: a selected image with no worse one is not
    lat, items, cache_stats = encode_latents(ws, pipe, items, size, cfg.model.base, log)
    log(f"encode cache: {cache_stats['cache_hits']} hit(s), {cache_stats['cache_misses']} miss(es)")
    if not any(not it["prior"] for it in items):
        raise LoopError("none of the selected images could be read; check the files listed above")
    captions = [f"{token} {it['caption']}".strip() if token and not it["prior"] else it["caption"] for it in items]
    data = TrainData(
        latents=torch.stack(lat),
        prior=torch.tensor([it["prior"] for it in items]),
        weights=torch.tensor([float(it.get("weight", 1.0)) for it in items]),
    )

    data.empty_embed = encode_texts(ws, pipe, [""], cfg.model.base)[0]  # before any adapter: the base's view
    if tc.objective == "dpo":  # over the images that could be read
        rows = [{"prompt": it["caption"], "tier": it["tier"], "winner": it["winner"]} for it in items]
        pairs = preference_pairs(rows, tc.dpo_min_gap)
        if not pairs:  # the images that made them could not be read (listed above)
            raise LoopError(
                f"{no_pairs_message(tc)} among the images that could be read; check the files listed "
                "above, or train with train.objective=supervised"
            )
        data.pairs = torch.tensor(pairs, dtype=torch.long)
        log(f"dpo: {len(pairs)} pair(s) of images of the same prompt, {tc.dpo_min_gap}+ tiers apart")
        lone = sum(it["sha256"] not in asked for it in selection)
        if lone:  # imports, seed images and variations have no worse-rated image of their prompt to be preferred to
            log(
                f"dpo: {lone} selected image(s) have no image of their prompt rated {tc.dpo_min_gap}+ tiers below "
                f"them (imports, variations) and are not learnt from; train.objective=supervised learns every one"
            )

    # 3. adapters: what learns depends on the method; their random init is seeded, so a unit is reproducible
    with torch.random.fork_rng():
        torch.manual_seed(tc.seed)
        unet, text_encoder, keep_rows, new_row = _attach(pipe, tc, cd, token, te_lora)
    if text_encoder is not None:
        data.ids = _token_ids(pipe.tokenizer, captions)
        data.empty = _token_ids(pipe.tokenizer, [""])[0]
    else:
        data.embeds = encode_texts(ws, pipe, captions, cfg.model.base)
        data.empty = data.empty_embed
    if tc.start == "from_parent" and parent > 0:
        load_parent_adapter(pipe, ws.checkpoint(parent), tc)
        if token and (ws.checkpoint(parent) / EMBEDS).exists():
            saved = load_file(ws.checkpoint(parent) / EMBEDS)
            if token in saved:
                with torch.no_grad():
                    pipe.text_encoder.get_input_embeddings().weight[new_row] = saved[token][0]
                keep_rows = (pipe.text_encoder.get_input_embeddings().weight.detach().clone().cpu(), new_row)

    # 4. the loop, with resumable checkpoints tied to this exact selection and these settings
    fingerprint = hashlib.sha256(
        json.dumps(
            {"images": [it["sha256"] for it in items], "train": _plain(cfg)["train"], "base": cfg.model.base},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    ckpt = Checkpoints(out / ".training", fingerprint, accelerator, [unet, text_encoder], log)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder, ema = fit(
        unet,
        data,
        noise_sched,
        tc,
        accelerator,
        desc=f"train {unit_name(unit)}",
        text_encoder=text_encoder,
        keep_rows=keep_rows,
        checkpoints=ckpt,
        stop_after=stop_after,
        log=log,
    )
    if stop_after is not None and stop_after < tc.steps:
        return {"stopped_at": stop_after}

    # 5. save: weights (diffusers format), then config.yaml, then manifest.json last (it marks the unit done)
    manifest = {}
    trained = {it["sha256"] for it in items if not it["prior"]}
    if accelerator.is_main_process:
        save_lora(unet, out, text_encoder if te_lora else None)
        if token:
            emb = text_encoder.get_input_embeddings().weight[new_row : new_row + 1].detach().float().cpu()
            atomic_write(out / EMBEDS, _st_bytes({token: emb.contiguous()}))
        else:
            (out / EMBEDS).unlink(missing_ok=True)
        atomic_write(out / "config.yaml", to_yaml(cfg))
        manifest = {
            "unit": unit,
            "parent": parent,
            "base_model": cfg.model.base,
            "method": tc.method,
            "start": tc.start,
            "strategy": strategy,
            "modifier_token": token or None,
            "text_encoder_lora": te_lora,
            # the images it learnt from: the selection less any that could not be read (named in left_out); with
            # objective=dpo the selected images that won a pair, and in "losers" the images they were preferred to
            "images": [
                {k: it.get(k) for k in ("id", "sha256", "caption", "tier")}
                for it in items
                if not it["prior"] and it.get("winner", True)
            ],
            "losers": [
                {k: it.get(k) for k in ("id", "sha256", "caption", "tier")}
                for it in items
                if not it.get("winner", True)
            ],
            "left_out": [
                {k: it.get(k) for k in ("id", "sha256")}
                for it in selection
                if it["sha256"] in asked and it["sha256"] not in trained
            ],
            "unpaired": sum(it["sha256"] not in asked for it in selection) if tc.objective == "dpo" else 0,
            "class_images": sum(it["prior"] for it in items),
            "objective": tc.objective,
            "objective_note": fallback or None,  # why it is not the train.objective asked for
            "pairs": 0 if data.pairs is None else len(data.pairs),
            "config": json.loads(json.dumps(_plain(cfg))),
            "steps": tc.steps,
            "processes": accelerator.num_processes,
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
            strategy=strategy,
            manifest={k: v for k, v in manifest.items() if k != "images"},
        )
        ckpt.clear()
    accelerator.wait_for_everyone()
    return manifest


def _attach(pipe, tc, cd: bool, token: str, te_lora: bool):
    """The method's adapters: returns (unet, learning text encoder or None, rows to keep, new token row)."""
    keep_rows, text_encoder, new_row = None, None, None
    if token:
        new_row = add_modifier_token(pipe.tokenizer, pipe.text_encoder, token, tc.initializer_token)
        table = pipe.text_encoder.get_input_embeddings().weight
        table.requires_grad_(True)
        keep_rows = (table.detach().clone().cpu(), new_row)
        text_encoder = pipe.text_encoder
    if te_lora:
        text_encoder = add_text_lora(pipe.text_encoder, tc)
    unet = add_lora(pipe.unet, tc, CD_TARGETS if cd else None)
    return unet, text_encoder, keep_rows, new_row


train_lora = train_unit  # the name the round and older callers use


def save_lora(unet, folder: Path, text_encoder=None) -> Path:
    """Write the adapter(s) as folder/pytorch_lora_weights.safetensors (diffusers' file, `unet.` and
    `text_encoder.` prefixes, rank and alpha in its metadata), atomically.

    The weights keep PEFT's names (lora_A/lora_B) for every module. diffusers' training scripts pass them through
    convert_state_dict_to_diffusers first, which renames only attention projections, so a LoRA on other modules
    too would get a file with two namings that diffusers' loader half skips (see loop.models.DIFFUSERS_LORA_NAMES).
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".save{TMP_MARK}{os.getpid()}-{time.time_ns()}"
    layers = get_peft_model_state_dict(unet)
    extra = {}
    if text_encoder is not None:
        extra = dict(
            text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
            text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(),
        )
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), **extra
    )
    os.chmod(tmp / WEIGHTS, 0o666 & ~UMASK)  # diffusers writes it 0600; every other file here is plain mode
    (tmp / WEIGHTS).replace(folder / WEIGHTS)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHTS


def _plain(cfg: LoopConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
