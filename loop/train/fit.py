"""The fitting loop: sampling timesteps and batches, the loss for each objective (loop.objectives), the learning
rate, resumable accelerate checkpoints, and `fit` itself, one loop for every method.

    loop train                  (train.steps optimizer steps)
    python -m loop.bench train  (steps per second)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loop.errors import LoopError
from loop.families import embedding_tables, encode_ids, encoder_modules, unet_inputs
from loop.objectives import diffusion_dpo_loss, invariance_loss, per_item_error, supervised_loss
from loop.train.adapters import REFERENCE, _trainable
from loop.train.data import TrainData
from loop.workspace import TMP_MARK, atomic_write


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
def base_prediction(unet, accelerator, xt, t, empty_embed, dev, micro: int, empty_pooled=None, times=None):
    """The frozen base model's unconditional prediction (adapters off): the target that keeps a unit's
    unconditional branch where the base had it (train.uncond_preservation). Run in micro-batches of `micro`
    items; the adapters are switched off once for all of them. SDXL: the empty caption's pooled embedding and
    each item's size/crop ids (`times`) go with it."""
    model = accelerator.unwrap_model(unet)
    model.disable_adapters()
    try:
        out = []
        for i in range(0, len(xt), micro):
            x, tt = xt[i : i + micro].to(dev), t[i : i + micro].to(dev)
            with accelerator.autocast():
                cond = empty_embed.to(dev).unsqueeze(0).expand(len(x), -1, -1)
                pooled = None if empty_pooled is None else empty_pooled.to(dev).unsqueeze(0).expand(len(x), -1)
                sizes = None if times is None else times[i : i + micro]
                out.append(unet(x, tt, **unet_inputs(cond, pooled, sizes)).sample.float())
        return torch.cat(out)
    finally:
        model.enable_adapters()


def guided_targets(unet, accelerator, data, scale: float, xt, t, target, dev, sizes, dropped):
    """train.guidance: the targets and weights that make a conditional prediction's error the guided one's. With
    u the base's unconditional prediction (adapters off, the empty caption), the guided prediction
    u + s * (c - u) misses `target` by s * (t' - c), t' = u + (target - u) / s; so the error is s^2 * |t' - c|^2.
    Rows in `dropped` (their caption replaced by the empty one) keep their own target and weight 1."""
    rows = torch.ones(len(xt), dtype=torch.bool, device=dev) if dropped is None else ~dropped
    weights = torch.where(rows, scale**2, 1.0).to(dev)
    if not bool(rows.any()):
        return target, weights
    u = base_prediction(unet, accelerator, xt[rows], t[rows], data.empty_embed, dev, len(xt),
                        data.empty_pooled, None if sizes is None else sizes[rows])  # fmt: skip
    target = target.clone().float()
    target[rows] = u + (target[rows] - u) / scale
    return target, weights


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
        self.chunk, self.steps, self.sizes = -1, [], []

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
        times = None if self.data.time_ids is None else self.data.time_ids[torch.tensor(rows, dtype=torch.long)]
        pred = (
            base_prediction(self.unet, self.acc, xt, t, self.data.empty_embed, self.dev, micro=tc.batch_size,
                            empty_pooled=self.data.empty_pooled, times=times)
            if rows
            else xt
        )  # fmt: skip
        self.steps, self.sizes, at = [], [], 0
        for m in masks:
            k = int(m.sum())
            self.steps.append((m, xt[at : at + k], t[at : at + k], pred[at : at + k]))
            self.sizes.append(None if times is None else times[at : at + k])
            at += k
        self.chunk = c

    def at(self, step: int):
        """(mask over the batch, x_t, t, target) for the kept positions of this step."""
        c = step // self.CHUNK
        if c != self.chunk:
            self._fill(c)
        return self.steps[step - c * self.CHUNK]

    def size_ids(self, step: int):
        """SDXL: the size/crop ids of this step's kept positions (their images'); None for SD."""
        self.at(step)
        return self.sizes[step - self.chunk * self.CHUNK]


@contextmanager
def reference_forward(model):
    """dpo's reference for the forwards inside: the parent's frozen adapter where train.dpo_reference=parent
    attached one (loop.train.adapters.add_reference_adapter), else the base (the adapters switched off). peft's
    set_adapter also moves requires_grad to the active adapter, so switching back leaves "default" the one that
    learns and the parent's frozen."""
    if REFERENCE in getattr(model, "peft_config", {}):
        model.set_adapter(REFERENCE)
        try:
            yield
        finally:
            model.set_adapter("default")
    else:
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()


def dpo_batch_loss(unet, data, noise_sched, tc, accelerator, gen, t_weights, dev, te_learns: bool):
    """One step of train.objective=dpo: batch_size/2 pairs, each winner and loser noised with the same noise at the
    same timestep, through the unit and through the reference (reference_forward: the base, or the parent), and
    the Diffusion-DPO loss on their errors (loop.objectives). train.uncond_preservation's share of the batch gets
    the empty caption and the reference's own prediction as target, as in supervised training, so guidance keeps
    amplifying what the unit learned; dpo_sft_weight adds the supervised loss on the winners."""
    if te_learns:
        raise LoopError("train.objective=dpo trains the UNet only; set train.text_encoder_lora=false "
                        "(and, for custom_diffusion, train.modifier_token=)")  # fmt: skip
    n = max(1, tc.batch_size // 2)
    weights = getattr(data, "pair_weights", None)
    if weights is None:
        pick = data.pairs[torch.randint(0, len(data.pairs), (n,), generator=gen)]
    else:  # train.taste_pool_share: the pool's pairs and the rated ones, each their share of every batch
        pick = data.pairs[torch.multinomial(weights, n, replacement=True, generator=gen)]
    rows = torch.cat([pick[:, 0], pick[:, 1]])
    noise = torch.randn((n, *data.latents.shape[1:]), generator=gen)
    noise = torch.cat([noise, noise])
    num = noise_sched.config.num_train_timesteps
    if t_weights is None:
        t = torch.randint(0, num, (n,), generator=gen)
    else:
        t = torch.multinomial(t_weights, n, replacement=True, generator=gen)
    t = torch.cat([t, t])
    # train.invariance: as many pairs of pictures whose rewards are held equal, each two with one noise and timestep
    m = n if tc.invariance != "none" and data.twins is not None else 0
    if m:
        twins = data.twins[torch.randint(0, len(data.twins), (m,), generator=gen)]
        tw_noise = torch.randn((m, *data.latents.shape[1:]), generator=gen)
        tw_t = torch.randint(0, num, (m,), generator=gen) if t_weights is None else \
            torch.multinomial(t_weights, m, replacement=True, generator=gen)  # fmt: skip
        rows = torch.cat([rows, twins[:, 0], twins[:, 1]])
        noise, t = torch.cat([noise, tw_noise, tw_noise]), torch.cat([t, tw_t, tw_t])
    cond = data.embeds[rows]
    pooled = None if data.pooled is None else data.pooled[rows]  # (SDXL)
    # uncond preservation: some of the pairs' images again, fresh noise and timestep, the empty caption
    k = int(round(tc.uncond_preservation * 2 * n))
    if k:
        extra = rows[torch.randint(0, 2 * n, (k,), generator=gen)]  # of the pairs' rows
        rows = torch.cat([rows, extra])
        noise = torch.cat([noise, torch.randn((k, *data.latents.shape[1:]), generator=gen)])
        t = torch.cat([t, torch.randint(0, num, (k,), generator=gen)])
        cond = torch.cat([cond, data.empty_embed.unsqueeze(0).expand(k, *data.empty_embed.shape)])
        if pooled is not None:
            pooled = torch.cat([pooled, data.empty_pooled.unsqueeze(0).expand(k, -1)])
    x0 = data.latents[rows]
    xt = noise_sched.add_noise(x0, noise, t).to(dev)
    target = loss_target(noise_sched, x0, noise, t).to(dev)
    t, cond = t.to(dev), cond.to(dev)
    inputs = unet_inputs(cond, None if pooled is None else pooled.to(dev),
                         None if data.time_ids is None else data.time_ids[rows].to(dev))  # fmt: skip
    with torch.no_grad(), accelerator.autocast(), reference_forward(accelerator.unwrap_model(unet)):
        ref = unet(xt, t, **inputs).sample.float()
    with accelerator.autocast():
        pred = unet(xt, t, **inputs).sample
    p = 2 * (n + m)  # the pairs' rows, then the twins', then uncond preservation's
    if tc.guidance:  # train.guidance: the guided prediction's errors, the unit's and the reference's
        sizes = None if data.time_ids is None else data.time_ids[rows[:p]].to(dev)
        tg, gw = guided_targets(unet, accelerator, data, tc.guidance, xt[:p], t[:p], target[:p], dev, sizes, None)
        err, ref_err = gw * per_item_error(pred[:p], tg), gw * per_item_error(ref[:p], tg)
    else:
        err, ref_err = per_item_error(pred[:p], target[:p]), per_item_error(ref[:p], target[:p])
    loss, _ = diffusion_dpo_loss(err[:n], err[n : 2 * n], ref_err[:n], ref_err[n : 2 * n], tc.dpo_beta)
    if m:
        a, b = slice(2 * n, 2 * n + m), slice(2 * n + m, p)
        loss = loss + tc.invariance_weight * invariance_loss(err[a], ref_err[a], err[b], ref_err[b], tc.dpo_beta)
    if k:
        loss = loss + per_item_error(pred[p:], ref[p:]).mean()
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


def make_optimizer(params: list, tc, device: torch.device):
    """train.optimizer over `params`: torch's AdamW, or bitsandbytes' 8-bit AdamW (CUDA only; LoopError otherwise)."""
    if tc.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise LoopError(
                f"train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes) and training runs on {device.type}; "
                "use train.optimizer=adamw"
            )
        try:
            import bitsandbytes as bnb
        except Exception as e:  # not installed, or installed without its CUDA library
            why = (str(e).splitlines() or [""])[0][:120]
            raise LoopError(
                f"train.optimizer=adamw8bit needs bitsandbytes ({type(e).__name__}: {why}); "
                "run `pip install bitsandbytes`, or use train.optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=tc.lr, weight_decay=1e-2)
    # fused AdamW (one kernel over all parameters; CPU since torch 2.4): on the embedded model's LoRA its step takes
    # 0.7 ms instead of the default foreach's 4.0 ms, about 8% of a training step. Other devices keep the default.
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=1e-2, fused=device.type in ("cpu", "cuda"))


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
    from `data.ids` (SD: one text encoder; SDXL: loop.families.PromptEncoder, both). `keep_rows` = (original
    embedding table, new row), or a list of them, one per text encoder: every other row is restored after each
    step, so only the new token's embedding learns (AdamW's weight decay would otherwise move them too).
    SDXL's pooled embeddings and size/crop ids come from `data.pooled` / `data.time_ids` (loop.families).
    """
    te_learns = text_encoder is not None
    modules = [unet] + ([text_encoder] if te_learns else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, tc, accelerator.device)
    if tc.gradient_checkpointing:  # recompute activations in the backward pass: less memory, the same loss
        unet.enable_gradient_checkpointing()
        if te_learns:
            for enc in encoder_modules(text_encoder):  # SDXL: both
                enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
            pooled = None if te_learns or data.pooled is None else data.pooled[idx]  # (SDXL)
            sizes = None if data.time_ids is None else data.time_ids[idx]
            drop = keep = None
            if data.empty is not None and tc.caption_dropout:
                drop = torch.rand(len(idx), generator=gen) < tc.caption_dropout
            if bank is not None:
                keep, xk, tk, yk = bank.at(step)
                drop = keep if drop is None else drop | keep
            if drop is not None:
                cap = torch.where(drop.view(-1, *[1] * (cap.dim() - 1)), data.empty.to(cap.dtype), cap)
                if pooled is not None:
                    pooled = torch.where(drop.view(-1, 1), data.empty_pooled, pooled)
            xt = noise_sched.add_noise(x0, noise, t)
            target = loss_target(noise_sched, x0, noise, t)
            if keep is not None and bool(keep.any()):  # the base's own prediction for these (see BaseTargets)
                kd = keep.to(dev)
                xt, t, target = xt.clone(), t.clone(), target.clone()
                xt[kd], t[kd], target[kd] = xk.to(dev), tk.to(dev), yk.to(dev)
                if sizes is not None:  # the kept positions' images are the bank's, with their own sizes
                    sizes = sizes.clone()
                    sizes[keep] = bank.size_ids(step)
            gw = None
            if tc.guidance:  # train.guidance: the guided prediction's error, on the rows with a caption
                target, gw = guided_targets(unet, accelerator, data, tc.guidance, xt, t, target, dev, sizes,
                                            None if drop is None else drop.to(dev))  # fmt: skip
            with accelerator.autocast():
                if te_learns:
                    cond, pooled = encode_ids(text_encoder, cap.to(dev))
                else:
                    cond = cap.to(dev)
                inputs = unet_inputs(cond, None if pooled is None else pooled.to(dev),
                                     None if sizes is None else sizes.to(dev))  # fmt: skip
                try:
                    pred = step_unet(xt, t, **inputs).sample
                except Exception as e:  # compiling happens at the first call; a failure there falls back to eager
                    if step_unet is unet:
                        raise
                    log(f"train.compile: compiling failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "training eagerly instead")  # fmt: skip
                    step_unet = unet
                    pred = unet(xt, t, **inputs).sample
            per_item = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            per_item = per_item * snr_weights(noise_sched, t, tc.snr_gamma)
            if gw is not None:
                per_item = per_item * gw
            if prior is not None and len(prior):
                loss = per_item[:bs].mean() + tc.prior_weight * per_item[bs:].mean()
            else:
                loss = per_item.mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if keep_rows is not None:  # one (original table, new row) per text encoder
            rows = [keep_rows] if isinstance(keep_rows, tuple) else keep_rows
            for table, (original, row) in zip(embedding_tables(accelerator.unwrap_model(text_encoder)), rows):
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
