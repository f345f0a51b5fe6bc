"""A unit's noise prior: draw the base's own variety, from the initial noises the person's taste favours.

    loop train / loop run --round     (fitted while a unit trains, where train.noise_prior > 0)
    loop generate, compare, the gate  (every txt2img picture of a unit that has one)

Why (docs/convergence.md, the thirteenth study): every way of training the denoiser tilts all of it, and on the
embedded model whatever moved a unit towards a taste also narrowed what the taste ignores: the units learnt the
colours their winners happened to share, drawn about four times over by guidance. A picture is the base's
denoiser applied to an initial noise z, and its layout (size, position, how much of the frame a shape fills) is
mostly set by z's low frequencies (the same finding as InitNO, Guo et al., CVPR 2024, and "Golden Noise", Zhou et
al. 2024). So the taste, as a function of the picture, is through the base partly a function of z, and drawing
z from where the person's liked pictures come from *reweights* the base instead of changing it.

How: base pictures drawn once per workspace at their own seeds with the generation's sampler
(loop.train.pool.noise_pool; deterministic, so each picture is a function of its z), each labelled by the taste
model. A logistic regression (scikit-learn) learns p(liked | z) from z's block means on a
`grid` x `grid` grid per latent channel, each scaled to unit variance. For a log-linear p(liked | z) = s(w.f(z)),
N(0, I) tilted by exp(lam * w.f(z)) is again a Gaussian, N(lam * f^T w, I): every initial noise moves by one
fixed shift, along the liked direction, `strength` standard deviations of the noise long (the shift's norm). What
the regression does not tie to z stays as random as in the base. The grid is in latent cells' shares of the
image, so one prior serves every size the unit draws.

The file: noise_prior.safetensors beside the adapter, one tensor `direction` (channels x grid x grid, unit norm)
and the strength in its metadata. Without it a unit draws from N(0, I) as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loop.errors import LoopError
from loop.workspace import atomic_write

FILE = "noise_prior.safetensors"
# The regression's L2 strength on unit-variance block means (scikit-learn's C, smaller is stronger). Only the
# direction is used (the strength sets the length), and a few hundred pictures, a quarter of them liked, fit 64
# weights: a strong penalty keeps the direction to what many pictures share.
C = 0.01


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """The initial latents diffusers draws for these seeds (one CPU-or-device generator per image, as
    diffusers.utils.torch_utils.randn_tensor does for a list of generators), stacked."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch.cat(
        [
            torch.randn((1, *shape), generator=torch.Generator(device).manual_seed(s), device=device, dtype=dtype)
            for s in seeds
        ]
    )


def block_means(z: torch.Tensor, grid: int) -> np.ndarray:
    """Each latent channel's means over a grid x grid of blocks, times sqrt(cells per block): under N(0, I) every
    feature is N(0, 1), whatever the latent's size."""
    n, _, h, w = z.shape
    if h % grid or w % grid:
        raise ValueError(f"a {h}x{w} latent does not split into a {grid}x{grid} grid")
    cells = (h // grid) * (w // grid)
    return (F.adaptive_avg_pool2d(z.float(), grid) * cells**0.5).reshape(n, -1).numpy()


def fit(z: torch.Tensor, liked: list[bool], grid: int) -> dict:
    """The liked direction of initial noises `z` (n x channels x h x w) from their labels: {"direction":
    channels x grid x grid, unit norm; "accuracy" on the pictures it was fitted on; "pictures"; "liked"}. Raises
    ValueError where both kinds are not among the pictures."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(liked, dtype=bool)
    if y.all() or not y.any():
        raise ValueError(f"{int(y.sum())} of {len(y)} pictures liked: a direction needs both kinds")
    x = block_means(z, grid)
    model = LogisticRegression(C=C, max_iter=5000).fit(x, y)
    w = torch.tensor(model.coef_[0], dtype=torch.float32)
    direction = (w / w.norm().clamp_min(1e-12)).reshape(z.shape[1], grid, grid)
    return {"direction": direction, "accuracy": float(model.score(x, y)), "pictures": len(y), "liked": int(y.sum())}


def shift(direction: torch.Tensor, strength: float, h: int, w: int) -> torch.Tensor:
    """The channels x h x w shift of every initial noise: the direction spread evenly over each block (the gradient
    of the block means; at a size the grid does not divide, over the nearest cells), `strength` long."""
    up = F.interpolate(direction[None].float(), size=(h, w), mode="nearest")[0]
    return strength * up / up.norm().clamp_min(1e-12)


def info(prior: dict) -> dict:
    """What a fitted prior says about itself (for the manifest): all but its direction."""
    return {k: v for k, v in prior.items() if k != "direction"}


def save(folder: Path, prior: dict, strength: float) -> None:
    """The prior fit() returned, with the strength generation moves each noise by, as noise_prior.safetensors."""
    from safetensors.torch import save

    meta = {"strength": json.dumps(float(strength)), "info": json.dumps(info(prior))}
    atomic_write(Path(folder) / FILE, save({"direction": prior["direction"].contiguous()}, metadata=meta))


def load(folder: Path) -> tuple[torch.Tensor, float] | None:
    """(direction, strength) of the unit in `folder`, or None where it has no prior."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            direction, strength = f.get_tensor("direction"), float(json.loads(f.metadata()["strength"]))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
        raise LoopError(
            f"{path} is not a readable noise prior ({type(e).__name__}); delete it to draw from the usual noise"
        ) from e
    if direction.ndim != 3:
        raise LoopError(f"{path} holds a {tuple(direction.shape)} direction, not channels x grid x grid; delete it")
    return direction, strength


def latents_for(prior: tuple[torch.Tensor, float], seeds: list[int], shape: tuple[int, int, int], device, dtype):
    """The initial latents of these seeds, moved by the prior: what the unit's pipe gets as `latents`."""
    direction, strength = prior
    z = initial_noise(seeds, shape, device=device, dtype=torch.float32)
    return (z + shift(direction, strength, shape[1], shape[2]).to(z.device)).to(dtype)
