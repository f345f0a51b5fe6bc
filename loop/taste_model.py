"""A taste model per workspace: it learns from every rating, to help the person look.

    the rating page        "likely UR first" and "least certain first" orders, a faint predicted tier on unrated
                           tiles (never a rating), and on the Progress tab what it learnt from and how well
    the promotion gate     gate.judge=model: a judge of a new unit against its parent, paired on held-out probes
    python -m loop.bench taste

What it is: an ordinal classifier on image features (`eval.features`: for the embedded model, a figure-ground
description of the picture (`taste_features`); a CLIP or DINOv2 embedding for real ones, cached by sha256). The
five tiers are ordered, so it is fitted as four binary questions, "is this image rated SSR or better?", ..., one
logistic regression each on the same features (Frank & Hall, ECML 2001); P(tier) follows from the differences.
scikit-learn, because a regularised logistic regression on a few hundred to a few thousand labelled rows fits in
well under a second and needs no tuning loop; a torch head would add training-loop code for no gain at this size.

From the four answers: `p_ur` (P(UR)) orders "likely UR first"; `score` (the expected tier, 0 = N .. 4 = UR) orders
pairs; `uncertainty` (1 - the most likely tier's probability) orders "least certain first"; `tier` is the most
likely tier.

It never replaces the person's ratings: selections come from the ratings alone. With train.taste_pool it also
labels a fixed pool of the base model's own pictures that a unit learns from beside the rated ones
(loop.train.pool): a choice among what the base already draws, never an optimisation of its score against a
unit's pictures, where a proxy reward optimised hard rises while the true one falls (Gao et al., ICML 2023).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from loop.config import TIERS

LEVEL = {t: len(TIERS) - 1 - i for i, t in enumerate(TIERS)}  # N = 0 .. UR = 4
MIN_RATINGS = 30  # fewer than this, or fewer than two tiers used: the workspace says so instead of predicting
C = 0.5  # the logistic regressions' inverse regularisation (0.1 to 1 within 2 points, on other seeds than the bench's)
CV_FOLDS = 5  # held-out agreement: ratings split into this many folds, each predicted by a model fitted on the rest


@dataclass
class TasteModel:
    """A fitted model, or why there is none (`ready` False and `reason`)."""

    ready: bool
    reason: str = ""
    ratings: int = 0  # images with a current rating it learnt from
    raters: dict = field(default_factory=dict)  # rater -> images whose current rating is theirs
    tiers: dict = field(default_factory=dict)  # tier -> images
    agreement: float | None = None  # held-out pairwise agreement within a prompt (CV_FOLDS-fold)
    pairs: int = 0  # the held-out pairs that agreement is over
    fit_s: float = 0.0
    fitted_at: float = 0.0
    levels: list = field(default_factory=list)  # the thresholds k (tier level >= k) with a classifier
    models: list = field(default_factory=list)  # one fitted classifier per level in `levels`
    constant: dict = field(default_factory=dict)  # k -> P(level >= k) where every rating is on one side

    def summary(self) -> dict:
        """What the Progress tab shows."""
        return {"ready": self.ready, "reason": self.reason, "ratings": self.ratings, "raters": self.raters,
                "tiers": self.tiers, "agreement": self.agreement, "pairs": self.pairs,
                "fit_s": round(self.fit_s, 3), "fitted_at": self.fitted_at}  # fmt: skip

    def predict(self, X: np.ndarray) -> dict:
        """Per row of features: p_ur, score (expected level, 0..4), uncertainty (0..1), tier (most likely)."""
        if not self.ready:
            raise ValueError(f"no taste model: {self.reason}")
        X = np.asarray(X, dtype=np.float64)
        ge = np.ones((len(X), len(TIERS)))  # ge[:, k] = P(level >= k); level >= 0 always
        fitted = dict(zip(self.levels, self.models))
        for k in range(1, len(TIERS)):
            ge[:, k] = fitted[k].predict_proba(X)[:, 1] if k in fitted else self.constant[k]
        ge = np.minimum.accumulate(ge, axis=1)  # the answers of four separate fits, made to agree: monotone
        p = np.clip(ge - np.append(ge[:, 1:], np.zeros((len(X), 1)), axis=1), 0.0, 1.0)  # P(level == k)
        p /= p.sum(axis=1, keepdims=True)
        level = p.argmax(axis=1)
        return {
            "p_ur": ge[:, -1],
            "score": (p * np.arange(len(TIERS))).sum(axis=1),
            "uncertainty": 1.0 - p.max(axis=1),
            "tier": [TIERS[len(TIERS) - 1 - int(v)] for v in level],
        }


def fit(X: np.ndarray, tiers: list[str], prompts: list[str] | None = None, raters: list[str] | None = None,
        agreement: bool = True) -> TasteModel:  # fmt: skip
    """Fit on rated images: X one row of features per image, tiers its current tier. `prompts` (for the held-out
    agreement, measured on pairs of one prompt) and `raters` (who gave each current rating) are reported."""
    t0 = time.perf_counter()
    counts = {t: tiers.count(t) for t in TIERS if t in tiers}
    who: dict = {}
    for r in raters or []:
        who[r] = who.get(r, 0) + 1
    if len(tiers) < MIN_RATINGS or len(counts) < 2:
        need = (f"{MIN_RATINGS - len(tiers)} more rating(s)" if len(tiers) < MIN_RATINGS
                else "ratings in at least two tiers")  # fmt: skip
        return TasteModel(False, f"too few ratings to learn from: {len(tiers)} rated; it needs {need}",
                          ratings=len(tiers), raters=who, tiers=counts)  # fmt: skip
    model = _fit(np.asarray(X, dtype=np.float64), np.array([LEVEL[t] for t in tiers]))
    model.ratings, model.raters, model.tiers = len(tiers), who, counts
    if agreement:
        model.agreement, model.pairs = cross_validated_agreement(X, tiers, prompts or [""] * len(tiers))
    model.fit_s, model.fitted_at = time.perf_counter() - t0, time.time()
    return model


def _fit(X: np.ndarray, y: np.ndarray) -> TasteModel:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    levels, models, constant = [], [], {}
    for k in range(1, len(TIERS)):
        side = (y >= k).astype(int)
        if side.min() == side.max():  # every rating on one side of this threshold
            constant[k] = float(side[0])
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))
        levels.append(k)
        models.append(clf.fit(X, side))
    return TasteModel(True, levels=levels, models=models, constant=constant)


def pairwise_agreement(scores, tiers: list[str], prompts: list[str]) -> tuple[float | None, int]:
    """The share of pairs of images of one prompt with different tiers that the scores order as the tiers do (a
    tie in score counts half), and the number of pairs."""
    scores, lv = np.asarray(scores, dtype=np.float64), np.array([LEVEL[t] for t in tiers])
    agree, n = 0.0, 0
    for p in set(prompts):
        idx = np.array([i for i, q in enumerate(prompts) if q == p])
        if len(idx) < 2:
            continue
        ds = np.sign(scores[idx][:, None] - scores[idx][None, :])
        dt = np.sign(lv[idx][:, None] - lv[idx][None, :])
        mask = dt > 0  # each unordered pair once, where the tiers differ
        agree += float(((ds == dt) & mask).sum() + 0.5 * ((ds == 0) & mask).sum())
        n += int(mask.sum())
    return (agree / n if n else None), n


def cross_validated_agreement(X, tiers: list[str], prompts: list[str]) -> tuple[float | None, int]:
    """Held-out agreement: each image scored by a model fitted without its fold (folds by a fixed shuffle)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.array([LEVEL[t] for t in tiers])
    fold = np.random.default_rng(0).permutation(len(tiers)) % CV_FOLDS
    scores = np.zeros(len(tiers))
    for f in range(CV_FOLDS):
        train, test = fold != f, fold == f
        if len(set(y[train])) < 2:
            return None, 0
        scores[test] = _fit(X[train], y[train]).predict(X[test])["score"]
    return pairwise_agreement(scores, tiers, prompts)


def taste_features(rgb, grid: bool = True) -> np.ndarray:
    """A description of the picture as a figure on a ground (the embedded model draws one shape on a plain background).
    The ground is the median colour of the image's border; each pixel's colour distance from it, summarised by its
    moments (mass, centroid, spread, the centroid's distance from the middle); the ground's colour and the picture's
    mean colour; and the figure, the pixels far from the ground: its bounding box (width, height, longer side, centre
    and the centre's distance from the middle), its pixels' centroid and area, its mean colour and how far its
    pixels stand from the ground: 30 values, after the distance map itself as 8x8 cells (94 in all; `grid` False,
    eval.taste_grid=false, leaves the map out).

    Why not the cheap features loop compare uses (a colour histogram and an 8x8 thumbnail, 256 values): a linear
    model on 200 ratings could not read "how much the figure stands out, how big, where" from them, and beside
    these values they diluted what it could (python -m loop.bench taste's measures, on other seeds than the
    bench's: with them added, centred_big needed 37% of the default order's ratings and agreed on 89% of held-out
    pairs, without them 35% and 93%; warm 32% and 98% against 32% and 96%). The 8x8 map dilutes in the same way
    with the 64 ratings of a first round: predicting the taste pool (loop.train.pool) from round 0's ratings, the
    pictures it called UR were truly UR (rater noise 10) in 74-79% (centred_big), 84-87% (small_dark) and 82-87%
    (contrast) of cases without the map, against 75-78%, 73-76% and 81-83% with it. It is kept all the same: units
    trained on the truer pool met fewer of the convergence targets (docs/convergence.md, "The fourth study"). The
    cost: where the figure is noise (the page test's colour fields with a random dot), 40 ratings order the fields'
    colours less cleanly. These name no scripted taste, but they are the quantities such tastes are written on, so
    the bench's figures hold for the embedded model only: a real model's images go through the vision embedding
    (eval.features) instead."""
    a = np.asarray(rgb, dtype=np.float32)[..., :3]
    h, w = a.shape[:2]
    ground = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    dist = np.linalg.norm(a - ground, axis=-1) / 441.7  # 0..1
    m = dist / max(float(dist.sum()), 1e-6)
    ys, xs = np.mgrid[0:h, 0:w]
    ys, xs = ys / h, xs / w
    cx, cy = float((m * xs).sum()), float((m * ys).sum())
    sx, sy = float(np.sqrt((m * (xs - cx) ** 2).sum())), float(np.sqrt((m * (ys - cy) ** 2).sum()))
    moments = [float(dist.mean()), cx, cy, sx, sy, float(np.hypot(cx - 0.5, cy - 0.5)), max(sx, sy),
               float((dist > FIGURE).mean())]  # fmt: skip
    whole = a.reshape(-1, 3).mean(axis=0) / 255.0  # the picture's mean colour
    cells = []
    if grid:
        gh, gw = h // 8 * 8, w // 8 * 8
        cells = dist[:gh, :gw].reshape(8, gh // 8, 8, gw // 8).mean(axis=(1, 3)).ravel()
    return np.concatenate([cells, ground / 255.0, whole, moments, _figure(a, dist, ground)]).astype(np.float32)


FIGURE_FEATURES = 16  # the length of _figure's description
FIGURE = 0.11  # a pixel this far from the ground's colour (of the largest distance possible) belongs to the figure


def _figure(a: np.ndarray, dist: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """The figure's bounding box, centroid, area, colour and distance from the ground (zeros where there is none)."""
    fg = dist > FIGURE
    if not fg.any():
        return np.zeros(FIGURE_FEATURES, dtype=np.float32)
    h, w = fg.shape
    xs, ys = np.flatnonzero(fg.any(axis=0)), np.flatnonzero(fg.any(axis=1))
    bw, bh = (xs[-1] + 1 - xs[0]) / w, (ys[-1] + 1 - ys[0]) / h
    bx, by = (xs[0] + xs[-1] + 1) / (2 * w), (ys[0] + ys[-1] + 1) / (2 * h)
    py, px = np.nonzero(fg)
    cx, cy = px.mean() / w, py.mean() / h
    colour = a[fg].mean(axis=0)
    return np.array([bw, bh, max(bw, bh), bx, by, np.hypot(bx - 0.5, by - 0.5), np.hypot(cx - 0.5, cy - 0.5), cx, cy,
                     fg.mean(), *(colour / 255.0), dist[fg].mean(), np.median(dist[fg]),
                     np.linalg.norm(colour - ground) / 441.7], dtype=np.float32)  # fmt: skip


# -- a workspace's model -----------------------------------------------------------------------------------
class FeatureCache:
    """Image features by sha256, kept in memory for the life of the page (a vision model's embeddings are also
    cached on disk by loop.features); an image that cannot be read gets no row and is left out."""

    def __init__(self, ws, ec):
        self.ws, self.ec, self.rows = ws, ec, {}

    def get(self, rows) -> tuple[np.ndarray, list]:
        """(features, the rows that have them), for rows with sha256 and path."""
        todo = [r for r in rows if r["sha256"] not in self.rows]
        for r in todo:  # one at a time: one unreadable file leaves out that image, not the batch
            try:
                self.rows[r["sha256"]] = features_of_images(self.ws, self.ec, [self.ws.root / r["path"]],
                                                            [r["sha256"]])[0]  # fmt: skip
            except Exception:  # a corrupt or missing file: no features, no prediction
                self.rows[r["sha256"]] = None
        kept = [r for r in rows if self.rows.get(r["sha256"]) is not None]
        dim = next((len(v) for v in self.rows.values() if v is not None), 0)
        X = np.stack([self.rows[r["sha256"]] for r in kept]) if kept else np.zeros((0, dim), dtype=np.float32)
        return X, kept


def features_of_images(ws, ec, images, keys=None) -> np.ndarray:
    """The model's features of images (paths of files, or PIL images such as the promotion gate's probes): the
    figure-ground description (taste_features) where eval.features is cheap, or eval.features' vision model (cached
    by `keys`, the sha256s)."""
    from loop.features import image_features

    if ec.features != "cheap":
        return image_features(ws, ec, images, keys)
    from loop.images import load_rgb

    rgbs = [load_rgb(im) if not hasattr(im, "convert") else np.asarray(im.convert("RGB")) for im in images]
    return np.stack([taste_features(a, ec.taste_grid) for a in rgbs])


def rated_rows(store) -> list:
    """Every image with a current rating: id, sha256, path, prompt, tier, rater."""
    return store.db.execute(
        "SELECT i.id, i.sha256, i.path, i.prompt, t.tier, t.rater FROM images i "
        "JOIN current_tiers t ON t.image_id = i.id ORDER BY i.id"
    ).fetchall()


def fit_workspace(ws, store, ec, cache: FeatureCache | None = None) -> TasteModel:
    """The workspace's taste model, fitted on all its current ratings."""
    cache = cache or FeatureCache(ws, ec)
    X, rows = cache.get(rated_rows(store))
    return fit(X, [r["tier"] for r in rows], [r["prompt"] for r in rows], [r["rater"] for r in rows])
