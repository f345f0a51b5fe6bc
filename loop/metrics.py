"""Cheap, dependency-free image statistics for comparing units: diversity, near duplicates, novelty, and
pairwise-preference strengths. Pure numpy and PIL; nothing is downloaded.

    features(rgb)             a 256-d unit vector per image: colour histogram + 8x8 thumbnail
    vendi_score(X)            effective number of distinct images (Friedman & Dieng 2023)
    seed_diversity(groups)    how different the images of one prompt are from seed to seed (collapse shows here)
    phash(rgb), hamming(a, b) 64-bit DCT perceptual hash and its bit distance
    near_duplicate_rate(h)    share of images with a near copy among the others
    novel_hits(feats, t, c)   UR images far (in centred feature space) from every earlier UR image
    bradley_terry(votes)      strengths from pairwise votes (MM algorithm, Hunter 2004), with a bootstrap
    prdc(real, fake, k)       precision, recall, density, coverage of fake images against real ones (Naeem 2020)
    sign_test_worse(w, l)     one-sided sign test: is the new side worse than the old in paired votes?
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

HIST_BINS = 4  # per channel: 4x4x4 = 64 colour bins
THUMB = 8  # 8x8 RGB thumbnail = 192 values
FEATURE_DIM = HIST_BINS**3 + THUMB * THUMB * 3

# Cosine distance (1 - cos) beyond which a UR image counts as new. It is measured on features CENTRED on the base
# model's mean feature (novel_hits' `centre`): raw features are non-negative and share a large common part (the
# mean colour histogram, a mid-grey thumbnail), so raw distances bunch up near 0 and every warm image looked like
# every other (over 166 UR images of a longtail run the distance to the nearest earlier UR image had median 0.018
# and maximum 0.143). Centred, the same distances have median 0.065 and maximum 1.28, and 0.15 asks a hit to have
# cosine similarity below 0.85 with EVERY earlier UR image, in the ways it differs from a typical base image.
NOVEL_HIT_THRESHOLD = 0.15
novel_hit_threshold = NOVEL_HIT_THRESHOLD  # lower-case alias

PHASH_SIZE = 32  # the image is reduced to 32x32 before the DCT
PHASH_LOW = 8  # and the top-left 8x8 low-frequency block gives the 64 bits
NEAR_DUPLICATE_BITS = 4


def _as_rgb(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:  # grayscale: repeat into three channels
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:  # floats in [0, 1] (diffusers' output_type="np") or wider ints
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return a


# -- features ----------------------------------------------------------------------------------------------
def features(rgb: np.ndarray, thumb: np.ndarray | None = None) -> np.ndarray:
    """A cheap feature vector for one image, L2-normalised so that cosine similarity is a dot product. `thumb`:
    the image's `thumbnail`, where the caller has made it already (loop compare keeps it for seed diversity).

    Two parts, concatenated:
      * colour: a 4x4x4 joint RGB histogram (bin = value // 64 per channel), L1-normalised to sum 1 (64 values);
      * layout: the image box-filtered down to 8x8 RGB, scaled to [0, 1] (192 values).
    The concatenation v is divided by ||v||_2 (a black image has an all-zero thumbnail but a histogram with one
    full bin, so ||v|| > 0 always). Float32, length FEATURE_DIM = 256.
    """
    a = _as_rgb(rgb)
    q = (a.astype(np.int64) * HIST_BINS) // 256  # 0..HIST_BINS-1 per channel
    idx = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=HIST_BINS**3).astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    v = np.concatenate([hist, thumbnail(a) if thumb is None else thumb])
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The layout part of `features`: the image box-filtered down to 8x8 RGB, scaled to [0, 1] (192 values)."""
    a = _as_rgb(rgb)
    small = Image.fromarray(a, "RGB").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64).ravel() / 255.0


def _unit_rows(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)


# -- diversity ---------------------------------------------------------------------------------------------
def vendi_score(X: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning",
    TMLR 2023) with the cosine kernel.

    Rows of X are L2-normalised (here, again, to be safe), K = X Xᵀ (so K_ii = 1), λ = eigenvalues of K / n,
    VS = exp(-Σ λ log λ) over λ > 1e-12. It is the exponential of the Shannon entropy of K/n's spectrum: the
    "effective number" of distinct items. n identical rows give 1, n orthogonal rows give n, and two rows with
    cosine c give exp(H) with λ = (1 ± c) / 2.

    When the feature dimension d is below n, the d x d matrix Xᵀ X / n is decomposed instead: it has the same
    non-zero eigenvalues. n = 0 gives 0.0, n = 1 gives 1.0. An all-zero row has no direction and adds
    nothing to the spectrum (its kernel row is 0), which lowers the score, as a missing item would.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.size == 0 or X.ndim == 0:
        return 0.0
    X = _unit_rows(X)
    n = X.shape[0]
    if n == 1:
        return 1.0
    gram = (X.T @ X) if X.shape[1] < n else (X @ X.T)
    lam = np.linalg.eigvalsh(gram / n)
    lam = lam[lam > 1e-12]
    return float(np.exp(-np.sum(lam * np.log(lam))))


def seed_diversity(groups) -> float | None:
    """How different the images of ONE prompt are from one seed to another: for each group (the thumbnails of
    one prompt's images, an n x d array, see `thumbnail`) the mean over all pairs of the RMS difference
    sqrt(mean((a - b)^2)), then the mean over the groups with at least two images. 0 = every seed gives the same
    picture; two images that differ by 0.25 in every value give 0.25. None when no group has two images.

    Why a second diversity measure: a loop that feeds on its own outputs collapses first WITHIN a prompt (every
    seed converges on one picture, "Self-Consuming Generative Models Go MAD"), while a whole-unit score such as
    the Vendi score can stay flat or even rise when the prompts' pictures drift apart from each other, as
    degraded, high-contrast images do (docs/strategies.md).
    """
    return seed_diversity_from(seed_diversity_per_group(groups))


def seed_diversity_from(per_group) -> float | None:
    """seed_diversity from seed_diversity_per_group's values: their mean over the groups that have one."""
    defined = [d for d in per_group if d is not None]
    return float(np.mean(defined)) if defined else None


def seed_diversity_per_group(groups) -> list[float | None]:
    """seed_diversity of each group on its own (None for a group of fewer than two images): an average over the
    prompts hides one prompt that collapsed while others spread out."""
    out: list[float | None] = []
    for g in groups:
        x = np.asarray(g, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            out.append(None)
            continue
        sq = (x * x).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / x.shape[1]
        out.append(float(np.sqrt(d2[np.triu_indices(len(x), 1)]).mean()))
    return out


# -- perceptual hash ---------------------------------------------------------------------------------------
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: C[k, i] = a(k) cos(pi (2i + 1) k / 2n), a(0) = sqrt(1/n), else sqrt(2/n).
    The 2-D DCT of an n x n block B is C B Cᵀ."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0, :] = math.sqrt(1.0 / n)
    return c


_DCT = _dct_matrix(PHASH_SIZE)


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the pHash construction, as in Zauner 2010 and the `imagehash` package).

    Grayscale (PIL "L": 0.299 R + 0.587 G + 0.114 B), resize to 32x32 (Lanczos), 2-D DCT-II (C B Cᵀ with the
    orthonormal matrix above), keep the top-left 8x8 low-frequency block (DC term included), and set bit i when
    coefficient i (row-major) is above the block's median. Bit 63 is coefficient (0, 0).
    """
    gray = Image.fromarray(_as_rgb(rgb), "RGB").convert("L")
    small = np.asarray(gray.resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ small @ _DCT.T)[:PHASH_LOW, :PHASH_LOW].ravel()
    bits = low > np.median(low)
    out = 0
    for b in bits:
        out = (out << 1) | int(b)
    return out


def hamming(a: int, b: int) -> int:
    """The number of differing bits of two hashes: popcount(a XOR b)."""
    return bin(int(a) ^ int(b)).count("1")


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _pairwise_hamming(hashes: list[int]) -> np.ndarray:
    h = np.array([int(x) & 0xFFFFFFFFFFFFFFFF for x in hashes], dtype=np.uint64)
    x = h[:, None] ^ h[None, :]
    return _POP8[x.view(np.uint8)].reshape(len(h), len(h), 8).sum(axis=-1, dtype=np.int64)


def near_duplicate_rate(hashes: list[int], threshold: int = NEAR_DUPLICATE_BITS) -> float:
    """The share of images with at least one *other* image whose hash is within `threshold` bits (inclusive).

    Two identical images both count, so a set of n images with one duplicated pair gives 2 / n. An empty list
    gives 0.0. O(n²) in memory and time: meant for a few hundred to a few thousand hashes.
    """
    n = len(hashes)
    if n < 2:
        return 0.0
    d = _pairwise_hamming(hashes)
    np.fill_diagonal(d, threshold + 1)
    return float(np.mean((d <= threshold).any(axis=1)))


# -- novelty -----------------------------------------------------------------------------------------------
def novel_hits(
    ur_features_in_order: list[np.ndarray], threshold: float = NOVEL_HIT_THRESHOLD, centre: np.ndarray | None = None
) -> list[bool]:
    """Which UR images are "novel hits": walking the UR images in the order they were made, image i is a hit
    when its cosine distance 1 - <f_i, f_j> to EVERY earlier UR image j < i is > threshold. `centre` (the mean
    feature of the base model's images) is subtracted first, so that the cosine compares how images differ from
    what the base model typically makes rather than what every image shares; the rows are then L2-normalised.

    The first image is never a hit: with nothing before it there is no evidence it is new rather than simply
    the first of its kind (and counting it would reward a unit merely for going first).
    """
    if not len(ur_features_in_order):
        return []
    F = np.stack([np.asarray(f, dtype=np.float64).ravel() for f in ur_features_in_order])
    if centre is not None:
        F = F - np.asarray(centre, dtype=np.float64).ravel()
    F = _unit_rows(F)
    sim = F @ F.T
    out = [False]
    for i in range(1, len(F)):
        out.append(bool(np.all(1.0 - sim[i, :i] > threshold)))
    return out


# -- pairwise preferences ----------------------------------------------------------------------------------
def _players(votes) -> list[str]:
    names: dict[str, None] = {}
    for v in votes:
        if len(v) != 3:
            raise ValueError(f"a vote is (left, right, winner), got {v!r}")
        left, right, winner = v
        if left == right:
            raise ValueError(f"a vote compares two different players, got {left!r} against itself")
        if winner not in (left, right, "tie"):
            raise ValueError(f"winner {winner!r} is neither {left!r}, {right!r} nor 'tie'")
        names.setdefault(left)
        names.setdefault(right)
    return list(names)


def _encode(votes, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vote: the two player indices and the left player's score (1 win, 0.5 tie, 0 loss)."""
    i = np.array([index[v[0]] for v in votes], dtype=np.int64)
    j = np.array([index[v[1]] for v in votes], dtype=np.int64)
    s = np.array([1.0 if v[2] == v[0] else 0.5 if v[2] == "tie" else 0.0 for v in votes])
    return i, j, s


def _bt_fit(i, j, s, n: int, iters: int, prior: float, tol: float = 1e-10) -> np.ndarray:
    """Log-strengths by the MM algorithm, centred to mean 0.

    W[a, b] = (fractional) wins of a over b; N = W + Wᵀ games played. Each player also plays a virtual
    opponent of fixed strength 1 and wins `prior` and loses `prior` of those games. Hunter's (2004) MM update

        p_a <- (w_a + prior) / ( Σ_b N[a, b] / (p_a + p_b) + 2 prior / (p_a + 1) )

    increases the (penalised) likelihood at every step; the virtual games keep an undefeated or winless player
    finite, tie disconnected groups to a common scale, and fix the overall scale (so no renormalising).
    """
    W = np.zeros((n, n))
    np.add.at(W, (i, j), s)
    np.add.at(W, (j, i), 1.0 - s)
    N = W + W.T
    wins = W.sum(axis=1) + prior
    p = np.ones(n)
    for _ in range(iters):
        denom = (N / (p[:, None] + p[None, :])).sum(axis=1) + 2.0 * prior / (p + 1.0)
        new = wins / denom
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    theta = np.log(p)
    return theta - theta.mean()


def bradley_terry(votes: list[tuple[str, str, str]], iters: int = 200, prior: float = 0.5) -> dict[str, float]:
    """Bradley–Terry strengths from pairwise votes: P(a beats b) = p_a / (p_a + p_b).

    votes: (left, right, winner) with winner = left, right or "tie"; a tie is half a win for each side.
    Fitted with Hunter's MM algorithm ("MM algorithms for generalized Bradley-Terry models", Ann. Statist.
    2004) with a weak prior: every player wins `prior` and loses `prior` games against a virtual opponent of
    strength 1 (see _bt_fit). Returns log-strengths θ_a = log p_a centred to mean 0, so θ_a - θ_b is the log-odds
    of a beating b. No votes: {}.
    """
    names = _players(votes)
    if not names:
        return {}
    i, j, s = _encode(votes, {k: x for x, k in enumerate(names)})
    theta = _bt_fit(i, j, s, len(names), iters, prior)
    return {k: float(t) for k, t in zip(names, theta)}


def bt_bootstrap(
    votes: list[tuple[str, str, str]], n_boot: int = 500, seed: int = 0, iters: int = 200, prior: float = 0.5
) -> dict[str, tuple[float, float, float]]:
    """(estimate, low, high) per player: the estimate from all votes, and the 2.5th and 97.5th percentiles of
    the estimates from `n_boot` resamples of the votes with replacement (the percentile bootstrap, Efron 1979).

    Every resample is fitted over all players, so a player who drops out of a resample gets the prior's value
    for that draw (a wider interval, as it should be). Seeded: the same votes and seed give the same intervals.
    """
    names = _players(votes)
    if not names:
        return {}
    i, j, s = _encode(votes, {k: x for x, k in enumerate(names)})
    n, m = len(names), len(votes)
    est = _bt_fit(i, j, s, n, iters, prior)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, n))
    for b in range(n_boot):
        pick = rng.integers(0, m, size=m)
        boots[b] = _bt_fit(i[pick], j[pick], s[pick], n, iters, prior)
    low, high = np.percentile(boots, [2.5, 97.5], axis=0) if n_boot else (est, est)
    return {k: (float(est[x]), float(low[x]), float(high[x])) for x, k in enumerate(names)}


# -- fidelity and coverage ---------------------------------------------------------------------------------
def prdc(real, fake, k: int = 5) -> dict | None:
    """Precision, recall, density and coverage of `fake` against `real` (Naeem et al., "Reliable Fidelity and
    Diversity Metrics for Generative Models", ICML 2020), by the authors' `prdc` package on Euclidean distances
    of the rows. Coverage is the share of real images with a fake one inside their k-nearest-neighbour ball: a
    unit that draws one mode of what the person liked covers few of the liked images, however good each is.

    k is lowered to len - 2 of the smaller set where a set is small (a round may select 3 images of a prompt;
    the package takes the (k+1)-th smallest distance, the point itself included); fewer than 3 rows on either
    side gives None (no neighbourhood to speak of).
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or len(real) < 3 or len(fake) < 3:
        return None
    import contextlib
    import io

    from prdc import compute_prdc

    k = max(1, min(int(k), len(real) - 2, len(fake) - 2))
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(out[key]) for key in ("precision", "recall", "density", "coverage")} | {"k": k}


def sign_test_worse(new_wins: int, old_wins: int) -> float:
    """p-value of a one-sided sign test that the new side loses more often than it wins (ties left out): the
    binomial probability of old_wins or more of n = new_wins + old_wins under a fair coin. Small: the new side is
    worse. No votes: 1.0 (no evidence either way)."""
    n = int(new_wins) + int(old_wins)
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(int(old_wins), n + 1)) / 2**n)


def spread(rows: list, cap: int) -> list:
    """At most `cap` rows, evenly spaced over the list (deterministic: the same rows give the same choice)."""
    if len(rows) <= cap:
        return list(rows)
    return [rows[i] for i in np.linspace(0, len(rows) - 1, cap).round().astype(int)]
