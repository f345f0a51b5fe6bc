"""python -m loop.bench taste: does the taste model help a person find what they like?

For each scripted taste (loop.tastes), on the embedded model:

- a round of `--images` (1,000) unit-0 images, rated by the scripted rater (its noise drawn once per picture), and
  an earlier round of `--earlier` (200) images at other seeds, already rated: what the model starts from;
- **ratings to find 90% of the round's UR images**, rating in the page's "likely UR first" order (the model refit
  every `--refit` (50) ratings on the earlier round's ratings and the ones made so far), against the page's
  default order (the order the images were made). The target is at most 40% of the default order's ratings;
- **held-out agreement after 200 ratings**: the model fitted on the first 200 images of the round in the default
  order, scored on the other images' pairs of one prompt with different tiers (the rater's noisy tiers: what a
  person would have said);
- **refit time**: one fit on every rating (the earlier round's and the whole round's), without the cross-validated
  agreement the page also computes.

The images are drawn once and shared by the tastes (only the ratings differ). docs/bench/taste.json: per taste
`<taste>_ratings_ranked`, `<taste>_ratings_default`, `<taste>_ratio` (default over ranked), `<taste>_agreement`;
and `ratio_worst`, `agreement_worst`, `refit_s`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from loop.bench.report import table, write
from loop.config import RateConfig, load_config
from loop.rate.auto import score, tier_for
from loop.taste_model import fit, pairwise_agreement, taste_features
from loop.workspace import Workspace

PROMPTS = ["a circle", "a square", "a triangle", "a ring"]
TASTE_NAMES = ["warm", "small_dark", "contrast", "centred_big"]
ROUND_SEED = 800_000  # the round's images: seed ROUND_SEED + k; the earlier round's: EARLIER_SEED + k
EARLIER_SEED = 900_000
FIND = 0.9  # the share of the round's UR images to find
TARGET_SHARE = 0.4  # ranked order: at most this share of the default order's ratings
TARGET_AGREEMENT = 0.85
NOISE = 10.0


def draw(n: int, seed0: int, where: Path, log=print) -> tuple[np.ndarray, list[str]]:
    """n unit-0 images, the prompts in turn at seeds seed0 + k, as the generator orders them: (features, prompts)
    and the RGB arrays."""
    from loop.compare import render_unit

    ws = Workspace.init(where)
    cfg = load_config(ws.root, [])
    probes = [(PROMPTS[k % len(PROMPTS)], seed0 + k // len(PROMPTS)) for k in range(n)]
    rgbs = []
    for c in range(0, n, 64):
        rgbs += [np.asarray(im.convert("RGB")) for im in render_unit(ws, cfg, 0, probes[c : c + 64])]
        log(f"  drawn {len(rgbs)}/{n}")
    return np.stack([taste_features(a, cfg.eval.taste_grid) for a in rgbs]), [p for p, _ in probes], rgbs


def rate_all(rgbs, taste: str) -> list[str]:
    rc = RateConfig(preference=taste, noise=NOISE)
    return [tier_for(score(a, rc), list(rc.cutoffs)) for a in rgbs]


def ratings_to_find(order: list[int], tiers: list[str]) -> int:
    """How many ratings, in this order, until FIND of the UR images have been rated."""
    need = int(np.ceil(FIND * sum(t == "UR" for t in tiers)))
    found = 0
    for n, i in enumerate(order, 1):
        found += tiers[i] == "UR"
        if found >= need:
            return n
    return len(order)


def ranked_order(X, tiers, X0, tiers0, refit: int) -> list[int]:
    """The order a person rates in with "likely UR first": the model (fitted on the earlier ratings, then refit
    every `refit` ratings on those and the ratings made so far) puts the likeliest UR image of the unrated first."""
    done: list[int] = []
    left = list(range(len(tiers)))
    while left:
        model = fit(np.concatenate([X0, X[done]]), tiers0 + [tiers[i] for i in done], agreement=False)
        if model.ready:
            p = model.predict(X[left])["p_ur"]
            nxt = [left[j] for j in np.argsort(-p, kind="stable")[:refit]]
        else:  # too few ratings yet: the default order
            nxt = left[:refit]
        done += nxt
        chosen = set(nxt)
        left = [i for i in left if i not in chosen]
    return done


def agreement_after(X, tiers, prompts, n: int) -> float | None:
    model = fit(X[:n], tiers[:n], agreement=False)
    if not model.ready:
        return None
    scores = model.predict(X[n:])["score"]
    return pairwise_agreement(scores, tiers[n:], prompts[n:])[0]


def bench_taste(tastes: list[str], images: int = 1000, earlier: int = 200, refit: int = 50, after: int = 200,
                out: str = "docs", log=print) -> dict:  # fmt: skip
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="loop-bench-taste-") as tmp:
        log(f"drawing {images} + {earlier} unit-0 images")
        X, prompts, rgbs = draw(images, ROUND_SEED, Path(tmp) / "round")
        X0, _, rgbs0 = draw(earlier, EARLIER_SEED, Path(tmp) / "earlier")
    figures, rows = {}, []
    refit_times = []
    for taste in tastes:
        tiers, tiers0 = rate_all(rgbs, taste), rate_all(rgbs0, taste)
        default = ratings_to_find(list(range(images)), tiers)
        ranked = ratings_to_find(ranked_order(X, tiers, X0, tiers0, refit), tiers)
        agree = agreement_after(X, tiers, prompts, after)
        t = time.perf_counter()
        fit(np.concatenate([X0, X]), tiers0 + tiers, agreement=False)
        refit_times.append(time.perf_counter() - t)
        figures.update({
            f"{taste}_ur": sum(t == "UR" for t in tiers),
            f"{taste}_ratings_ranked": ranked,
            f"{taste}_ratings_default": default,
            f"{taste}_ratio": round(default / ranked, 3),
            f"{taste}_agreement": None if agree is None else round(agree, 4),
        })  # fmt: skip
        rows.append({"taste": taste, "UR images": figures[f"{taste}_ur"], "ratings, likely UR first": ranked,
                     "ratings, default order": default, "ranked / default": f"{ranked / default:.0%}",
                     "agreement after 200": "-" if agree is None else f"{agree:.1%}"})  # fmt: skip
        log(f"{taste}: {rows[-1]}")
    figures["ratio_worst"] = min(figures[f"{t}_ratio"] for t in tastes)
    figures["agreement_worst"] = min(figures[f"{t}_agreement"] or 0.0 for t in tastes)
    figures["refit_s"] = round(max(refit_times), 3)
    figures.update({"images": images, "earlier": earlier, "refit_every": refit, "noise": NOISE,
                    "seconds": round(time.time() - t0, 1)})  # fmt: skip
    md = "\n".join([
        "## Taste model: finding the UR images (`python -m loop.bench taste`)", "",
        f"A round of {images} unit-0 images (the four prompts at seeds {ROUND_SEED} + k), rated by each scripted "
        f"taste with noise {NOISE:g}. The model starts from an earlier round of {earlier} rated images and is "
        f"refit every {refit} ratings. Ratings needed to find {FIND:.0%} of the round's UR images in the page's "
        f"\"likely UR first\" order against its default order (target: at most {TARGET_SHARE:.0%}); held-out "
        f"pairwise agreement within a prompt after {after} ratings (target {TARGET_AGREEMENT:.0%}); the refit "
        f"time on every rating ({images + earlier}): {figures['refit_s']} s.", "",
        table(rows), "",
    ])  # fmt: skip
    write("taste", figures, md, out)
    print(table(rows))
    return figures
