"""train.taste_pool: learn the taste from many pictures of the base model, not from the few the person rated.

    loop train / loop run --round     (the train phase; off while train.taste_pool is 0)

Why: a round rates 4 to 15 winners per prompt. Whatever they happen to share beyond the taste (the winners of
"a square" are bluer) a unit learns with it, and draws one colour from then on (docs/convergence.md). The
person's ratings also fit the workspace's taste model (loop.taste_model), which generalises across prompts and is
regularised. So the unit also learns from a pool of the base model's own pictures of the selection's prompts
(`train.taste_pool` per prompt, at seeds POOL_SEED + k that no round uses, made once per base and cached), each
labelled with the tier the taste model predicts for it: what the base draws that the person would like, in all
the variety the base draws it. With train.objective=supervised the pool's predicted winners join the selection;
with dpo the whole pool joins the pairs with its predicted tiers. With train.taste_pool_hues, each picture also
comes in other colourings (hue_copies), labelled alike.

The model is fitted on the person's ratings only and never scores a unit's own pictures here; it picks from the
base's, which a unit trained on them moves towards, not past (best-of-n selection from a fixed pool, not an
optimisation of the model's score, which rises while the true reward falls: Gao et al., ICML 2023).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from PIL import Image

from loop import noise_prior
from loop.config import LoopConfig
from loop.images import load_rgb, rotate_hue
from loop.models import set_scheduler
from loop.taste_model import LEVEL, features_of_images, fit_workspace
from loop.train.data import draw_base, drawn_by
from loop.workspace import Workspace, atomic_write, sha256_file

POOL_SEED = 3_000_000  # far from the rounds', the gate's probes (1,000,000 + k) and the benchmarks' seeds
NOISE_SEED = 3_500_000  # train.noise_prior's pictures: another range, far from all of those
BATCH = 16
TIER_PARTNERS = 4  # train.invariance=tier: partners per pool picture
INVARIANCE_HUES = 4  # train.invariance=hue's colourings where the pool's own (taste_pool_hues) are off: 90° turns


def cached_draws(
    ws: Workspace, pipe, cfg: LoopConfig, folder, prompts: list[str], n: int, first_seed: int, what: str, log=print
) -> list[tuple[str, int, Path]]:
    """`n` base pictures per prompt at seeds first_seed + k, each a PNG in `folder` drawn by the pipe as it is now
    (before any adapter) where not there yet: (prompt, seed, path), prompts sorted, seeds in order."""
    out = []
    for prompt in sorted(set(prompts)):
        key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        out += [(prompt, first_seed + k, folder / f"{key}-{first_seed + k}.png") for k in range(n)]
    todo = [row for row in out if not row[2].exists()]
    if todo:
        log(f"{what}: drawing {len(todo)} picture(s) with the base model (once; cached)")
    draw_base(pipe, cfg, todo, BATCH)
    return out


@torch.no_grad()
def base_pool(ws: Workspace, pipe, prompts: list[str], n: int, cfg: LoopConfig, log=print) -> list[dict]:
    """`n` base-model images per prompt at seeds POOL_SEED + k, made once and cached under cache/pool/ (keyed by the
    base's identity and the steps and guidance it draws with: drawn_by). Call before any adapter is attached."""
    folder = ws.cache("pool", drawn_by(pipe, cfg))
    drawn = cached_draws(ws, pipe, cfg, folder, prompts, n, POOL_SEED, "taste pool", log)
    return [{"id": None, "sha256": sha256_file(path), "path": ws.rel(path), "caption": prompt, "prior": False,
             "pool": True} for prompt, _, path in drawn]  # fmt: skip


def winner_bar(tc, selection: list[dict]) -> int | None:
    """The level a pool picture's predicted tier must reach to win (train.taste_pool_bar, or the selection's lowest
    rated tier for "selection"); None where that asks for the selection's and it has no rated image."""
    if tc.taste_pool_bar != "selection":
        return LEVEL[tc.taste_pool_bar]
    rated = [LEVEL[it["tier"]] for it in selection if it.get("tier") in LEVEL]
    return min(rated) if rated else None


def taste_pool_items(ws: Workspace, store, pipe, cfg: LoopConfig, selection: list[dict], log=print) -> list[dict]:
    """The pool of the selection's prompts, each image with the tier the taste model predicts ("tier") and whether it
    reaches train.taste_pool_bar ("winner": that tier or better, or the selection's lowest tier); [] (and a line
    saying why) where the model cannot predict."""
    tc = cfg.train
    if not any(it.get("tier") in LEVEL for it in selection):
        log("taste pool: the selection has no rated image to set the bar; not used")
        return []
    model = fit_workspace(ws, store, cfg.eval)
    if not model.ready:
        log(f"taste pool: no taste model yet ({model.reason}); not used")
        return []
    prompts = sorted({it["caption"] for it in selection if it.get("caption")})
    drawn = base_pool(ws, pipe, prompts, tc.taste_pool, cfg, log)
    turns = tc.taste_pool_hues if tc.taste_pool_hues > 1 else INVARIANCE_HUES if tc.invariance == "hue" else 1
    pool = drawn + hue_copies(ws, drawn, turns)
    pred = model.predict(features_of_images(ws, cfg.eval, [ws.root / it["path"] for it in pool],
                                            [it["sha256"] for it in pool]))  # fmt: skip
    bar = winner_bar(tc, selection)
    items = [dict(it, tier=t, winner=LEVEL[t] >= bar) for it, t in zip(pool, pred["tier"])]
    if tc.invariance == "hue":
        items = twins_of(items, len(drawn), paired=tc.taste_pool_hues > 1)
    if tc.invariance == "hue":
        twins = [it for it in items if "twin" in it]
        log(f"invariance: {sum(it['twin_same'] for it in twins)} of {len(twins)} recoloured twin(s) have their "
            f"picture's predicted tier; the unit's preference is held equal across those")  # fmt: skip
    log(
        f"taste pool: {sum(it['winner'] for it in items)} of {len(items)} base picture(s)"
        + (f" (in {tc.taste_pool_hues} colourings)" if tc.taste_pool_hues > 1 else "")
        + f" predicted {TIER_NAMES[bar]} "
        f"or better by the taste model ({model.ratings} ratings, held-out agreement "
        f"{'-' if model.agreement is None else f'{model.agreement:.0%}'})"
    )
    return items


def hue_copies(ws: Workspace, pool: list[dict], n: int) -> list[dict]:
    """Each pool picture with its colours turned by 360/n, 2 * 360/n, ... degrees (loop.images.rotate_hue), written
    once beside it (the same picture always gives the same copy, so the cache and the latents' cache hold);
    n = 1: none. Why turned copies rather than more drawn pictures: a pool drawn four times as large has the same
    colours in the same proportions, and with them the chance that the base draws big shapes in blue more often
    than in red; a copy holds the shape, its place and its contrast and changes only the colour."""
    turns = [round(360 * step / n) for step in range(1, n)]
    copies: dict[int, list[dict]] = {d: [] for d in turns}
    for it in pool:
        src, rgb = ws.root / it["path"], None  # read once, and only if a copy is still to be made
        for degrees in turns:
            path = src.with_name(f"{src.stem}-hue{degrees}.png")
            if not path.exists():
                rgb = load_rgb(src) if rgb is None else rgb
                buf = io.BytesIO()
                Image.fromarray(rotate_hue(rgb, degrees)).save(buf, format="PNG")
                atomic_write(path, buf.getvalue())
            copies[degrees].append(dict(it, sha256=sha256_file(path), path=ws.rel(path), hue=degrees))
    return [c for degrees in turns for c in copies[degrees]]  # by turn, each turn in the pool's order


def twins_of(items: list[dict], drawn: int, paired: bool) -> list[dict]:
    """train.invariance=hue: each recoloured copy (the items after the first `drawn`, turn by turn in the drawn
    pictures' order, as hue_copies returns them) marked with its picture ("twin": its path) and whether the taste
    model gives both the same tier ("twin_same": only those twins are held equal, since where the model sees the
    colour, the person may). Unless the copies were asked for as pool pictures too (`paired`: taste_pool_hues > 1),
    they make no dpo pair (tier None) and win nothing: they serve the invariance term alone."""
    out = items[:drawn]
    for k, it in enumerate(items[drawn:]):
        src = items[k % drawn]
        twin = dict(it, twin=src["path"], twin_same=it["tier"] == src["tier"])
        out.append(twin if paired else dict(twin, tier=None, winner=False))
    return out


def twin_rows(items: list[dict], how: str, seed: int) -> list[tuple[int, int]]:
    """The row pairs into `items` (after the latents were encoded, which may have dropped unreadable pictures) whose
    implicit rewards train.invariance holds equal. "hue": each picture and its recoloured twins of the same predicted
    tier. "tier": each drawn pool picture with TIER_PARTNERS others of its prompt and predicted tier, chosen at
    random (seeded by train.seed), since all of a group's pairs would be thousands."""
    if how == "hue":
        row = {it["path"]: i for i, it in enumerate(items)}
        return [(row[it["twin"]], i) for i, it in enumerate(items) if it.get("twin_same") and it["twin"] in row]
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        if it.get("pool") and "hue" not in it and it.get("tier") is not None:
            groups.setdefault((it["caption"], it["tier"]), []).append(i)
    gen, out = torch.Generator().manual_seed(seed), []
    for rows in groups.values():
        for k, i in enumerate(rows):
            others = rows[:k] + rows[k + 1 :]
            out += [(i, others[int(j)]) for j in torch.randperm(len(others), generator=gen)[:TIER_PARTNERS]]
    return out


def pool_share_weights(pairs: list[tuple[int, int]], items: list[dict], share: float) -> torch.Tensor | None:
    """Sampling weights over dpo's pairs so that pairs with a pool picture on either side make `share` of every
    batch and pairs of two rated pictures the rest (each kind uniform within itself); None (every pair alike, as
    many pool pairs as there happen to be: usually most) where share is 0 or either kind has no pair."""
    if not share:
        return None
    pooled = torch.tensor([bool(items[a].get("pool") or items[b].get("pool")) for a, b in pairs])
    n_pool, n_rated = int(pooled.sum()), int((~pooled).sum())
    if not n_pool or not n_rated:
        return None
    return torch.where(pooled, share / n_pool, (1.0 - share) / n_rated).double()


TIER_NAMES = {v: k for k, v in LEVEL.items()}


def noise_pool(ws: Workspace, pipe, prompts: list[str], n: int, cfg: LoopConfig, log=print) -> list[dict]:
    """`n` base pictures per prompt at seeds NOISE_SEED + k, drawn as generation draws them (generate.scheduler,
    whose sampler is deterministic for dpm++ and ddim, so each picture is a function of its initial noise; the
    taste pool's pictures are drawn with the model's own scheduler, which for the embedded model adds fresh noise
    at every step), made once and cached under cache/noise/. Call before any adapter is attached."""
    sched = cfg.generate.scheduler
    kept = pipe.scheduler
    set_scheduler(pipe, sched)
    try:
        drawn = cached_draws(ws, pipe, cfg, ws.cache("noise", f"{drawn_by(pipe, cfg)}-{sched}"), prompts, n,
                             NOISE_SEED, "noise prior", log)  # fmt: skip
    finally:
        pipe.scheduler = kept
    return [{"path": path, "caption": prompt, "seed": seed} for prompt, seed, path in drawn]


def fit_noise_prior(ws: Workspace, store, pipe, cfg: LoopConfig, selection: list[dict], log=print) -> dict | None:
    """train.noise_prior: the direction of initial noises the base draws the taste model's winners from
    (loop.noise_prior), on noise_pool's pictures (train.noise_prior_pool per prompt of the selection), each a
    winner where its predicted tier reaches train.taste_pool_bar as the taste pool's do; None, said in one line,
    where there is no taste model yet or the pictures are all of one kind."""
    tc = cfg.train
    model = fit_workspace(ws, store, cfg.eval)
    if not model.ready:
        log(f"noise prior: no taste model yet ({model.reason}); this unit draws from the usual noise")
        return None
    bar = winner_bar(tc, selection)
    bar = LEVEL["UR"] if bar is None else bar
    prompts = sorted({it["caption"] for it in selection if it.get("caption")})
    drawn = noise_pool(ws, pipe, prompts, tc.noise_prior_pool, cfg, log)
    pred = model.predict(features_of_images(ws, cfg.eval, [it["path"] for it in drawn],
                                            [sha256_file(it["path"]) for it in drawn]))  # fmt: skip
    liked = [LEVEL[t] >= bar for t in pred["tier"]]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    try:
        z = noise_prior.initial_noise([it["seed"] for it in drawn], shape, device=pipe.device)
        prior = noise_prior.fit(z.cpu(), liked, tc.noise_prior_grid)
    except ValueError as e:
        log(f"noise prior: not fitted ({e}); this unit draws from the usual noise")
        return None
    log(
        f"noise prior: {prior['liked']} of {prior['pictures']} base pictures predicted winners; their noises' "
        f"direction fits {prior['accuracy']:.0%} of them; every initial noise moves {tc.noise_prior:g} along it"
    )
    return prior
