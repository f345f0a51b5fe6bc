"""Training objectives, each one function of tensors: the fitting loop (loop.train.fit) builds the batch and calls
one of these, and knows nothing of their insides.

    train.objective=supervised   the selection's images, DreamBooth-style (a weighted regression loss)
    train.objective=dpo          Diffusion-DPO on pairs of rated images of the same prompt
    train.invariance             with dpo: its implicit reward held equal across pictures rated alike

Both take per-item errors: the mean squared error of the UNet's prediction against its target (the noise, or the
velocity for v-prediction models), one value per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loop.config import TIERS


def per_item_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per item, over every dimension but the batch."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


def supervised_loss(err: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The denoising loss of DreamBooth-style fine-tuning: the mean of the per-item errors (weighted, e.g. by
    min-SNR-gamma)."""
    return (err if weights is None else err * weights).mean()


def diffusion_dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", 2023,
    eq. 14): winner w and loser l noised with the same noise at the same timestep;

        loss = -log sigmoid( -beta/2 * ((err_w - ref_err_w) - (err_l - ref_err_l)) )

    The model is pushed to denoise the winner better than the reference does, and the loser worse, by the same
    margin; where winners and losers do not differ (an attribute the person is indifferent to) the two terms
    cancel and the reference (the adapter switched off) is kept. Returns (mean loss, share of pairs where the
    model already prefers the winner more than the reference does)."""
    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


def invariance_loss(
    err: torch.Tensor, ref_err: torch.Tensor, twin_err: torch.Tensor, twin_ref_err: torch.Tensor, beta: float
) -> torch.Tensor:
    """A picture and its twin (one the taste model rates alike: the same picture in other colours), noised with the
    same noise at the same timestep: the square of the difference between their implicit rewards, in
    Diffusion-DPO's units,

        loss = ( beta/2 * ((err - ref_err) - (twin_err - twin_ref_err)) )^2

    dpo's implicit reward of a picture is how much better the model denoises it than the reference does; where the
    person is indifferent to what tells the twins apart, a unit whose rewards for them differ has learnt something
    they never said (that blue circles beat red ones), and will draw it more often. The difference is held at every
    noise and timestep drawn, not only on average: the unit's change must act alike on a picture and its twin.
    Held is the difference, not each reward, so the unit may still prefer both twins to other pictures.

    (An unbiased estimate of the squared *expected* difference, the product of two independent draws' gaps, was
    tried and is not used: its gradient is the product of two noisy factors, and on a toy pair set like the one
    in tests/test_invariance.py a unit trained with it came to prefer the winners to their twins more than one
    trained without the term.)"""
    gap = 0.5 * beta * ((err - ref_err) - (twin_err - twin_ref_err))
    return (gap**2).mean()


def preference_pairs(rows: list, min_gap: int) -> list[tuple[int, int]]:
    """(better, worse) index pairs into `rows` (each with "prompt" and "tier", and optionally "winner"): every two
    images of the same prompt whose tiers are at least `min_gap` apart, as D3PO builds its pairs from per-image
    scores (Yang et al. 2024); images of equal or near tiers make no pair. A row with winner=False is never the
    better one (the strategy did not select it), though it can be the worse."""
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["tier"] in TIERS:
            by_prompt.setdefault(r["prompt"], []).append(i)
    pairs = []
    for idx in by_prompt.values():
        for a in idx:
            for b in idx:
                if (
                    rows[a].get("winner", True)
                    and TIERS.index(rows[b]["tier"]) - TIERS.index(rows[a]["tier"]) >= min_gap
                ):
                    pairs.append((a, b))
    return pairs


def matched_pairs(pairs: list[tuple[int, int]], latents: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """Of each better image's pairs, only the `k` whose worse image is nearest to it (Euclidean distance between
    their latents); k = 0 keeps every pair.

    Why: with a handful of winners per prompt, winners and losers differ by chance in what the person did not
    rate (the winners of "a square" happen to be bluer), and DPO learns that difference with the taste. A matched
    design, as in an observational study, pairs each winner with the losers most like it: what the person rated
    still differs within every pair (that is why one won), while an attribute that merely happened to differ is
    held near equal within the pair and so cancels out of the loss."""
    if k <= 0:
        return pairs
    flat = latents.reshape(len(latents), -1).float()
    by_winner: dict[int, list[int]] = {}
    for a, b in pairs:
        by_winner.setdefault(a, []).append(b)
    kept = []
    for a, losers in by_winner.items():
        d = torch.cdist(flat[a : a + 1], flat[losers])[0]
        kept += [(a, losers[int(i)]) for i in torch.argsort(d)[:k]]
    return kept
