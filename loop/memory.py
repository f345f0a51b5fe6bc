"""How much memory a training or a generation will need at its peak, said before the long job starts.

    loop train / loop run --round     print the training estimate for the device, and what lowers it when it
                                      exceeds the device's memory

An estimate from parameter counts, dtypes, batch size and resolution, not a measurement: weights, gradients and
optimizer states are counted exactly; activations are `batch x latent pixels x sum(block_out_channels) x
layers_per_block x ACT` values, with ACT measured on the embedded model's UNet (the bytes torch saves for the
backward pass: 48 per pixel and channel, 10 with gradient checkpointing). Attention is taken as PyTorch's fused
attention (no seq x seq maps), as diffusers uses on torch 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ACT = 48  # values saved for backward per latent pixel, per unit of sum(block_out_channels), per layer per block
ACT_CHECKPOINTED = 10  # the same with gradient checkpointing (only the blocks' inputs are kept)
ACT_INFERENCE = 4  # live values at once in an inference forward (nothing kept for a backward pass)
VAE_DECODE = 6 * 128  # live values per output pixel in the VAE decoder's widest block (128 channels at full size)
VAE_TILE = 512  # diffusers' VAE tile size in pixels (vae.tile_sample_min_size for SD; SDXL's too)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # optimizer state per trainable parameter (two moments)
GIB = 1 << 30


@dataclass
class Estimate:
    """A peak in bytes, by part, and what lowers it."""

    parts: dict[str, int]
    lowers: list[str] = field(default_factory=list)  # options that would lower it, best first

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self, what: str, device: str, available: int | None) -> str:
        """One line: the estimate, the device's memory, and (when it does not fit) what to set."""
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        out = f"{what}: estimated peak memory {self.total / GIB:.2f} GiB ({parts})"
        if available is None:
            return out
        out += f"; {device} has {available / GIB:.1f} GiB available"
        if self.total > available:
            out += (
                "; it will not fit: set " + ", then ".join(self.lowers)
                if self.lowers
                else "; it will not fit: use a smaller model.base or a larger device"
            )
        return out


def train_peak(
    frozen: int,
    trainable: int,
    *,
    batch: int,
    latent_side: int,
    width: int,
    layers_per_block: int = 1,
    frozen_bytes: int = 4,
    act_bytes: int = 4,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    on_cuda: bool = False,
    mixed_precision: str = "no",
) -> Estimate:
    """Peak memory of a training step: `frozen` and `trainable` parameter counts (all models held on the device),
    `batch` items a step (prior preservation doubles it), latents latent_side x latent_side, `width` the UNet's
    sum(block_out_channels)."""
    per_value = ACT_CHECKPOINTED if gradient_checkpointing else ACT
    parts = {
        "weights": frozen * frozen_bytes + trainable * 4,
        "gradients": trainable * 4,
        "optimizer": trainable * OPTIMIZER_BYTES[optimizer],
        "activations": batch * latent_side**2 * width * layers_per_block * per_value * act_bytes,
    }
    lowers = []
    if not gradient_checkpointing:
        lowers.append("train.gradient_checkpointing=true")
    if on_cuda and mixed_precision == "no":
        lowers.append("train.mixed_precision=bf16")
    if on_cuda and optimizer == "adamw":
        lowers.append("train.optimizer=adamw8bit")
    if batch > 1:
        lowers.append(f"train.batch_size={max(1, batch // 2)}")
    return Estimate(parts, lowers)


def generate_peak(
    params: int,
    *,
    batch: int,
    side: int,
    latent_side: int,
    width: int,
    weight_bytes: int = 4,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
) -> Estimate:
    """Peak memory of generating `batch` images of side x side px with classifier-free guidance (two UNet rows an
    image): the weights, the UNet's live values, and the VAE decode (one image at a time with slicing, one tile
    with tiling)."""
    pixels = min(side, VAE_TILE) ** 2 if vae_tiling else side**2
    parts = {
        "weights": params * weight_bytes,
        "unet": 2 * batch * latent_side**2 * width * ACT_INFERENCE * weight_bytes,
        "vae decode": (1 if vae_slicing else batch) * pixels * VAE_DECODE * weight_bytes,
    }
    lowers = []
    if batch > 1 and not vae_slicing:
        lowers.append("generate.vae_slicing=true")
    if side > VAE_TILE and not vae_tiling:
        lowers.append("generate.vae_tiling=true")
    if batch > 1:
        lowers.append(f"generate.batch_size={max(1, batch // 2)}")
    return Estimate(parts, lowers)


def available(device) -> int | None:
    """Bytes `device` has for this job: CUDA's free memory now, the machine's RAM on CPU; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not on this system
            return None
    return None


def count(*modules) -> tuple[int, int]:
    """(frozen, trainable) parameter counts over `modules` (None skipped)."""
    frozen = trainable = 0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return frozen, trainable
