"""The taste model (loop.taste_model) and the taste bench's counting, without images of the model."""

import numpy as np

from loop.bench.taste import ratings_to_find
from loop.taste_model import FIGURE_FEATURES, MIN_RATINGS, fit, pairwise_agreement, taste_features

TIERS5 = ("N", "R", "SR", "SSR", "UR")


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 12))
    level = np.clip(np.round(1.5 * X[:, 0] + 2 + 0.3 * rng.normal(size=n)), 0, 4).astype(int)
    return X, [TIERS5[v] for v in level], [f"p{i % 3}" for i in range(n)]


def test_too_few_ratings_say_so_instead_of_predicting():
    X, tiers, prompts = _data(MIN_RATINGS - 1)
    model = fit(X, tiers, prompts)
    assert not model.ready and "too few ratings" in model.reason and "1 more" in model.reason
    one_tier = fit(X[:40] if len(X) >= 40 else np.zeros((40, 12)), ["SR"] * 40)
    assert not one_tier.ready and "two tiers" in one_tier.reason


def test_the_model_learns_an_ordering_it_was_not_shown():
    X, tiers, prompts = _data(400)
    model = fit(X[:300], tiers[:300], prompts[:300], raters=["a"] * 200 + ["b"] * 100)
    assert model.ready and model.raters == {"a": 200, "b": 100} and model.agreement > 0.8
    pred = model.predict(X[300:])
    agree, pairs = pairwise_agreement(pred["score"], tiers[300:], prompts[300:])
    assert pairs > 100 and agree > 0.85
    ur = np.array([t == "UR" for t in tiers[300:]])
    assert pred["p_ur"][ur].mean() > pred["p_ur"][~ur].mean() + 0.3
    assert ((pred["uncertainty"] >= 0) & (pred["uncertainty"] <= 1)).all()
    # reversed scores disagree as much as the scores agree
    assert abs(pairwise_agreement(-pred["score"], tiers[300:], prompts[300:])[0] - (1 - agree)) < 1e-9


def test_ratings_to_find_counts_until_nine_in_ten_ur_images():
    tiers = ["N"] * 10 + ["UR"] * 10
    assert ratings_to_find(list(range(20)), tiers) == 19  # 9 of 10 UR: the 19th image
    assert ratings_to_find(list(range(19, -1, -1)), tiers) == 9


def test_taste_features_see_where_the_figure_is():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:16, :16] = 255  # a white square in the top-left corner
    f = taste_features(img)
    centred = np.zeros_like(img)
    centred[24:40, 24:40] = 255
    g = taste_features(centred)
    assert f.shape == g.shape and np.isfinite(f).all()
    moments, figure = -3 - FIGURE_FEATURES, -FIGURE_FEATURES
    assert f[moments] > g[moments] + 0.3  # the map's centroid's distance from the middle
    assert f[figure + 2] == g[figure + 2] == 0.25  # the figure's bounding box: its longer side
    assert f[figure + 5] > g[figure + 5] + 0.3  # the box's centre's distance from the middle
    assert f[figure + 9] == g[figure + 9] == 0.0625  # its area
    assert np.allclose(f[figure + 10 : figure + 13], 1.0)  # its colour: white


def test_eval_taste_grid_false_leaves_out_the_figure_map_and_nothing_else():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[8:24, 40:56] = (200, 30, 30)  # a red square, top right
    plain, with_map = taste_features(img, grid=False), taste_features(img)
    assert with_map.shape[0] == plain.shape[0] + 64
    assert np.array_equal(with_map[64:], plain)
    cells = with_map[:64].reshape(8, 8)
    assert cells[1:3, 5:7].min() > 0.3 and cells[5:, :4].max() == 0.0  # the map is where the square is
