import math

import numpy as np
import pytest
from PIL import Image

from loop.metrics import (
    FEATURE_DIM,
    NOVEL_HIT_THRESHOLD,
    _dct_matrix,
    bradley_terry,
    bt_bootstrap,
    features,
    hamming,
    near_duplicate_rate,
    novel_hit_threshold,
    novel_hits,
    phash,
    seed_diversity,
    thumbnail,
    vendi_score,
)


def blobs(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random picture: a 6x6 random colour grid upscaled bicubically."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


# -- features and Vendi ------------------------------------------------------------------------------------
def test_features_unit_length_and_shape():
    for rgb in (blobs(1), np.zeros((32, 32, 3), np.uint8), np.full((16, 24, 3), 255, np.uint8)):
        f = features(rgb)
        assert f.shape == (FEATURE_DIM,) == (256,)
        assert f.dtype == np.float32 and np.all(f >= 0)
        assert math.isclose(float(np.linalg.norm(f)), 1.0, rel_tol=1e-5)
    assert float(features(blobs(1)) @ features(blobs(1))) == pytest.approx(1.0)
    assert float(features(blobs(1)) @ features(blobs(2))) < 0.99


def test_vendi_identical_orthogonal_and_edge_cases():
    assert vendi_score(np.tile([0.3, 0.4, 0.5], (7, 1))) == pytest.approx(1.0)
    for k in (2, 3, 5):
        assert vendi_score(np.eye(k)) == pytest.approx(k)
        assert vendi_score(np.eye(50)[:k] * 3.0) == pytest.approx(k)  # rows need not be unit length; d > n
    assert vendi_score(np.eye(3)[[0, 1, 2, 0, 1, 2]]) == pytest.approx(3.0)  # n > d: the d x d Gram path
    assert vendi_score(np.zeros((0, 4))) == 0.0
    assert vendi_score(np.array([[1.0, 2.0]])) == 1.0


@pytest.mark.parametrize("c", [0.0, 0.3, 0.8, -0.5])
def test_vendi_two_vectors_hand_computed(c):
    x = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    lam = [(1 + c) / 2, (1 - c) / 2]  # eigenvalues of [[1, c], [c, 1]] / 2
    expected = math.exp(-sum(v * math.log(v) for v in lam if v > 0))
    assert vendi_score(x) == pytest.approx(expected)


def test_seed_diversity_hand_computed():
    same = np.tile([0.2, 0.4, 0.6, 0.8], (5, 1))
    assert seed_diversity([same]) == pytest.approx(0.0)  # every seed the same picture
    a, b, c = np.zeros(4), np.full(4, 0.25), np.array([1.0, 0.0, 0.0, 0.0])
    # pairs: |a-b| = 0.25 everywhere -> 0.25; |a-c| -> sqrt(1/4) = 0.5; |b-c| -> sqrt((0.75^2 + 3 * 0.25^2) / 4)
    bc = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)
    assert seed_diversity([np.stack([a, b, c])]) == pytest.approx((0.25 + 0.5 + bc) / 3)
    # the mean over prompts; a prompt with one image has no pairs and does not count
    assert seed_diversity([np.stack([a, b]), same, a[None]]) == pytest.approx(0.25 / 2)
    assert seed_diversity([a[None]]) is None and seed_diversity([]) is None


def test_thumbnail_is_the_layout_part_of_the_features():
    flat = np.zeros((32, 32, 3), np.uint8)
    flat[..., 0] = 255
    flat[16:, :, 2] = 51  # the lower half purple-ish: 51 / 255 = 0.2
    t = thumbnail(flat).reshape(8, 8, 3)
    assert np.allclose(t[..., 0], 1.0) and np.allclose(t[:4, :, 2], 0.0) and np.allclose(t[4:, :, 2], 0.2)
    rgb = blobs(3)
    t, f = thumbnail(rgb), features(rgb)
    assert t.shape == (192,) and np.allclose(f[-192:] / t, (f[-192:] / t)[0], rtol=1e-4)  # a scaled copy


# -- perceptual hash ---------------------------------------------------------------------------------------
def test_dct_matrix_is_orthonormal_dct_ii():
    c = _dct_matrix(8)
    assert np.allclose(c @ c.T, np.eye(8))
    x = np.random.default_rng(0).normal(size=8)
    n = np.arange(8)
    direct = [sum(x * np.cos(np.pi * (2 * n + 1) * k / 16)) for k in range(8)]  # unscaled DCT-II
    scale = np.array([math.sqrt(1 / 8)] + [math.sqrt(2 / 8)] * 7)
    assert np.allclose(c @ x, scale * direct)


def test_phash_distances():
    img = blobs(1)
    h = phash(img)
    assert 0 <= h < 2**64
    assert hamming(h, phash(img.copy())) == 0
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    assert hamming(h, phash(noisy)) <= 4
    assert hamming(h, phash(img[::-1, ::-1])) > 16  # turned upside down
    assert hamming(h, phash(blobs(3))) > 16  # another picture


def test_hamming_counts_bits():
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, 2**64 - 1) == 64


def test_near_duplicate_rate():
    assert near_duplicate_rate([]) == 0.0
    assert near_duplicate_rate([123]) == 0.0
    assert near_duplicate_rate([0, 0]) == 1.0  # both have a copy
    far = [0, 2**64 - 1, 0xFFFFFFFF, 0xFFFFFFFF << 32]  # pairwise >= 32 bits apart
    assert near_duplicate_rate(far) == 0.0
    assert near_duplicate_rate([0, 0b1111, 2**64 - 1, 0xFFFFFFFF]) == 0.5  # 0 and 0b1111: 4 bits, inclusive
    assert near_duplicate_rate([0, 0b11111, 2**64 - 1]) == 0.0  # 5 bits > 4
    assert near_duplicate_rate([0, 0b11111, 2**64 - 1], threshold=5) == pytest.approx(2 / 3)


# -- novelty -----------------------------------------------------------------------------------------------
def test_novel_hits_hand_made():
    assert novel_hit_threshold == NOVEL_HIT_THRESHOLD and 0 < NOVEL_HIT_THRESHOLD < 1
    e = np.eye(3)
    near_first = np.array([1.0, 0.0, 0.1])  # cos 0.995 to e0: distance 0.005
    both = np.array([1.0, 1.0, 0.0])  # distance 0.29 to e0 and e1, 0.296 to near_first
    feats = [e[0], e[1], near_first, both, e[2]]
    assert novel_hits(feats, threshold=0.25) == [False, True, False, True, True]
    assert novel_hits(feats, threshold=0.3) == [False, True, False, False, True]
    assert novel_hits([], 0.25) == []
    assert novel_hits([e[0]], 0.25) == [False]  # the first has nothing to be new against
    assert novel_hits([e[0] * 5, e[0]], 0.25) == [False, False]  # scale does not matter


def test_novel_hits_measure_from_the_centre():
    # two images that share most of their features (what every image of a model has in common): close raw, but
    # they differ from the base model's mean image in orthogonal ways, so centred they are far apart
    centre = np.array([1.0, 1.0, 0.0, 0.0])
    a = centre + np.array([0.0, 0.0, 0.2, 0.0])
    b = centre + np.array([0.0, 0.0, 0.0, 0.2])
    assert 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.05
    assert novel_hits([a, b], 0.5) == [False, False]
    assert novel_hits([a, b], 0.5, centre=centre) == [False, True]
    # and a third that differs the way the first does is not new, centred or not
    c = centre + np.array([0.0, 0.0, 0.3, 0.01])
    assert novel_hits([a, b, c], 0.5, centre=centre) == [False, True, False]


# -- Bradley-Terry -----------------------------------------------------------------------------------------
STRENGTHS = {"A": 1.5, "B": 0.5, "C": -0.5, "D": -1.5}  # log-strengths


def synthetic_votes(n: int = 400, seed: int = 1) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    names = list(STRENGTHS)
    votes = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        left, right = names[a], names[b]
        p_left = 1 / (1 + math.exp(STRENGTHS[right] - STRENGTHS[left]))
        votes.append((left, right, left if rng.random() < p_left else right))
    return votes


def test_bradley_terry_recovers_order():
    votes = synthetic_votes()
    est = bradley_terry(votes)
    assert sorted(est, key=est.get, reverse=True) == ["A", "B", "C", "D"]
    assert sum(est.values()) == pytest.approx(0.0, abs=1e-9)
    # the prior shrinks a little, but the spread is close to the true 3.0
    assert 2.0 < est["A"] - est["D"] < 3.6


def test_bt_bootstrap_intervals():
    votes = synthetic_votes()
    ci = bt_bootstrap(votes, n_boot=200, seed=0)
    assert set(ci) == set(STRENGTHS)
    full = bradley_terry(votes)
    for name, (est, low, high) in ci.items():
        assert est == pytest.approx(full[name])
        assert low < est < high
    assert ci["A"][1] > ci["D"][2]  # A's interval lies entirely above D's
    assert bt_bootstrap(votes, n_boot=200, seed=0) == ci  # seeded


def test_bradley_terry_ties_undefeated_and_errors():
    tied = bradley_terry([("a", "b", "tie")] * 10)
    assert tied["a"] == pytest.approx(0.0) and tied["b"] == pytest.approx(0.0)
    # a tie is half a win each: 1 win + 2 ties for x over y equals 2 wins of 3 (x: 2, y: 1)
    mixed = bradley_terry([("x", "y", "x"), ("x", "y", "tie"), ("y", "x", "tie")])
    plain = bradley_terry([("x", "y", "x"), ("x", "y", "x"), ("x", "y", "y")])
    assert mixed["x"] == pytest.approx(plain["x"]) and mixed["x"] > 0
    undefeated = bradley_terry([("w", "l", "w")] * 20)
    assert all(math.isfinite(v) for v in undefeated.values()) and undefeated["w"] > 1
    assert bradley_terry([]) == {} and bt_bootstrap([]) == {}
    with pytest.raises(ValueError):
        bradley_terry([("a", "b", "c")])
    with pytest.raises(ValueError):
        bradley_terry([("a", "a", "a")])


# -- precision, recall, density, coverage per prompt; image features ----------------------------------------
def test_prdc_a_collapsed_fake_set_covers_little_a_spread_one_much():
    from loop.metrics import prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 8))
    spread = prdc(real, rng.normal(size=(40, 8)), k=5)
    collapsed = prdc(real, real[:1] + 1e-3 * rng.normal(size=(40, 8)), k=5)  # every "seed" draws one picture
    assert spread["coverage"] >= 0.8 and spread["recall"] >= 0.6
    assert collapsed["coverage"] <= 0.35 and collapsed["recall"] <= 0.1  # only the neighbourhoods of its one picture
    assert collapsed["precision"] == 1.0  # each picture is a fine one: precision alone does not see a collapse
    assert prdc(real[:2], real, k=5) is None and prdc(real, real[:2], k=5) is None  # no neighbourhood
    assert prdc(real[:4], real, k=5)["k"] == 2  # k lowered for a small set


def test_per_prompt_prdc_measures_each_prompt_on_its_own():
    from loop.features import group_rows, mean_of, per_prompt_prdc

    rng = np.random.default_rng(1)
    real = {"a circle": rng.normal(size=(20, 8)), "a square": rng.normal(size=(20, 8)) + 5, "only real": np.eye(8)}
    fake_rows = np.concatenate([rng.normal(size=(20, 8)), np.repeat(real["a square"][:1], 20, axis=0)])
    fake = group_rows(["a circle"] * 20 + ["a square"] * 20, fake_rows)
    assert list(fake) == ["a circle", "a square"] and fake["a square"].shape == (20, 8)
    got = per_prompt_prdc(real, fake, k=5)
    assert set(got) == {"a circle", "a square"}  # a prompt on one side only has no figure
    assert got["a circle"]["coverage"] >= 0.8 and got["a square"]["coverage"] <= 0.2
    # across the prompts the collapse is diluted: the mean lies between the two
    assert got["a square"]["coverage"] < mean_of(got, "coverage") < got["a circle"]["coverage"]
    assert mean_of({}, "coverage") is None


def tiny_clip(folder, projection: bool):
    """A tiny random CLIP vision model and its image processor, saved as a local folder."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("projection", [False, True])
def test_image_features_from_a_local_clip_model_are_cached_by_sha256(tmp_path, monkeypatch, projection):
    import loop.features
    from loop.config import EvalConfig
    from loop.features import image_features, model_slug
    from loop.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws")
    ec = EvalConfig(features=str(tiny_clip(tmp_path / "clip", projection)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "third.png"
    Image.fromarray(images[2]).save(path)  # a file is read only when its embedding is not cached
    keys = ["a" * 64, "b" * 64, "c" * 64]

    first = image_features(ws, ec, [images[0], Image.fromarray(images[1]), path], keys)
    assert first.shape == (3, 8 if projection else 16) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(first[0], first[1])
    folder = ws.root / "cache" / "features" / model_slug(ec.features)
    assert sorted(p.name for p in folder.iterdir()) == [f"{k}.npy" for k in keys]

    # the second time, the cache answers: no model is loaded, no file is read
    def no_model(name):
        raise AssertionError("the model was loaded for cached embeddings")

    monkeypatch.setattr(loop.features, "load_vision_model", no_model)
    path.unlink()
    again = image_features(ws, ec, [np.zeros((32, 32, 3), np.uint8), None, path], keys)
    assert np.array_equal(again, first)


def test_a_vision_model_that_cannot_be_loaded_says_use_cheap(tmp_path):
    from loop.config import EvalConfig
    from loop.errors import LoopError
    from loop.features import image_features
    from loop.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws")
    image = np.zeros((32, 32, 3), np.uint8)
    for name in (str(tmp_path / "no-such-model"), "nobody/no-such-clip"):
        with pytest.raises(LoopError, match="eval.features=cheap") as err:
            image_features(ws, EvalConfig(features=name), [image], ["d" * 64])
        assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoopError, match="local folder"):
        image_features(ws, EvalConfig(features=str(tmp_path / "empty")), [image], None)
