"""train.taste_pool: the base's own pictures, labelled by the workspace's taste model, join what a unit learns from."""

import json

import numpy as np
import pytest

from loop.config import load_config
from loop.round import run_round
from loop.train import train_unit

RATED = ["generate.images_per_prompt=16", "generate.batch_size=16", "generate.steps=3", "train.steps=4",
         "train.batch_size=4", "rate.preference=warm", "rate.cutoffs=[30,0,-30,-60]"]  # fmt: skip


def forget_unit_1(store):
    """Train unit 1 again from the same selection (a unit is never retrained in place; here nothing used it)."""
    store.db.execute("DELETE FROM units WHERE unit = 1")
    store.db.commit()


@pytest.mark.slow
def test_the_pool_is_labelled_by_the_taste_model_learnt_from_and_drawn_once(ws):
    cfg = load_config(ws.root, RATED + ["train.taste_pool=12", "train.objective=supervised"])
    run_round(ws, cfg, auto_rate_=True, log=lambda m: None, stop_after="select")  # 32 ratings by the warm rater
    said = []
    with ws.store() as store:
        train_unit(ws, store, cfg, parent=0, log=said.append)
    manifest = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    pool = manifest["taste_pool"]
    assert pool["pictures"] == 12 * 2 and 0 < pool["winners"] < pool["pictures"]  # supervised: the winners learnt
    assert any(line.startswith("taste pool: drawing 24 picture(s)") for line in said), said
    # the predicted winners are the warm ones: the taste model learnt the rater's taste from 32 ratings
    pictures = sorted(ws.cache("pool").rglob("*.png"))
    assert len(pictures) == 24
    line = next(m for m in said if " base picture(s) predicted " in m)
    assert line.startswith(f"taste pool: {pool['winners']} of 24 ")
    # the selection is what the manifest says it learnt from: pool pictures are counted, not listed as images
    sel = json.loads((ws.checkpoint(1) / "selection.json").read_text())["images"]
    assert {it["sha256"] for it in manifest["images"]} == {it["sha256"] for it in sel}

    # dpo: the whole pool pairs by its predicted tiers; the pictures are not drawn again
    said.clear()
    dpo = load_config(ws.root, RATED + ["train.taste_pool=12", "train.objective=dpo"])
    with ws.store() as store:
        forget_unit_1(store)
        train_unit(ws, store, dpo, parent=0, log=said.append)
    manifest = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert manifest["objective"] == "dpo" and manifest["taste_pool"]["pictures"] == 24
    assert not any("drawing" in m for m in said)
    # in two colourings: each pool picture and its copy with the colours turned half way round, both labelled
    with ws.store() as store:
        forget_unit_1(store)
        train_unit(ws, store, load_config(ws.root, RATED + ["train.taste_pool=12", "train.taste_pool_hues=2"]),
                   parent=0, log=lambda m: None)  # fmt: skip
    hued = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert hued["taste_pool"]["pictures"] == 48 and hued["taste_pool"]["hues"] == 2
    assert len(sorted(ws.cache("pool").rglob("*-hue180.png"))) == 24
    no_pool = load_config(ws.root, RATED + ["train.objective=dpo", "train.taste_pool=0"])
    with ws.store() as store:
        forget_unit_1(store)
        train_unit(ws, store, no_pool, parent=0, log=lambda m: None)
    assert json.loads((ws.checkpoint(1) / "manifest.json").read_text())["pairs"] < manifest["pairs"]

    # the pool is the base's pictures as this workspace draws them: with other guidance, drawn again
    said.clear()
    with ws.store() as store:
        forget_unit_1(store)
        train_unit(ws, store, load_config(ws.root, RATED + ["train.taste_pool=12", "generate.cfg=2"]), parent=0,
                   log=said.append)  # fmt: skip
    assert any(line.startswith("taste pool: drawing 24 picture(s)") for line in said), said


def test_the_pools_winners_are_the_pictures_the_taste_model_prefers(ws):
    from loop.taste_model import LEVEL
    from loop.train.pool import taste_pool_items

    class Fake:  # the model's answer, by warmth: the pool's winners must be the warm pictures
        ready, ratings, agreement = True, 40, 0.9

        def predict(self, X):
            return {"tier": ["UR" if x > 0 else "N" for x in X[:, 0]]}

    cfg = load_config(ws.root, RATED + ["train.taste_pool=4"])
    import loop.train.pool as pool_mod

    pool = [{"sha256": str(i), "path": f"p{i}.png", "caption": "a circle", "prior": False, "pool": True}
            for i in range(4)]  # fmt: skip
    feats = np.array([[1.0], [-1.0], [2.0], [-3.0]])
    orig = (pool_mod.fit_workspace, pool_mod.base_pool, pool_mod.features_of_images)
    pool_mod.fit_workspace = lambda *a, **k: Fake()
    pool_mod.base_pool = lambda *a, **k: pool
    pool_mod.features_of_images = lambda *a, **k: feats
    try:
        said = []
        items = taste_pool_items(ws, None, None, cfg, [{"caption": "a circle", "tier": "UR"}], log=said.append)
        assert [it["winner"] for it in items] == [True, False, True, False]
        assert [it["tier"] for it in items] == ["UR", "N", "UR", "N"]
        assert said[-1].startswith("taste pool: 2 of 4 base picture(s) predicted UR or better")
        # train.taste_pool_bar=selection: the selection's lowest tier, so an SSR selection lets SSR-predicted win
        Fake.predict = lambda self, X: {"tier": ["SSR", "SR", "UR", "N"]}
        cfg.train.taste_pool_bar = "selection"
        items = taste_pool_items(ws, None, None, cfg, [{"caption": "a circle", "tier": "SSR"}], log=said.append)
        assert [it["winner"] for it in items] == [True, False, True, False] and LEVEL["SSR"] == 3
        # train.taste_pool_bar=UR (the default): only the pictures predicted UR win, whatever the selection's bar
        cfg.train.taste_pool_bar = "UR"
        items = taste_pool_items(ws, None, None, cfg, [{"caption": "a circle", "tier": "SSR"}], log=said.append)
        assert [it["winner"] for it in items] == [False, False, True, False]
        assert said[-1].startswith("taste pool: 1 of 4 base picture(s) predicted UR or better")
        # no rated image in the selection, or no model yet: not used, and said
        assert taste_pool_items(ws, None, None, cfg, [{"caption": "a circle"}], log=said.append) == []
        assert "no rated image" in said[-1]
        Fake.ready, Fake.reason = False, "fewer than 30 ratings"
        assert taste_pool_items(ws, None, None, cfg, [{"caption": "a circle", "tier": "UR"}], log=said.append) == []
        assert said[-1] == "taste pool: no taste model yet (fewer than 30 ratings); not used"
    finally:
        pool_mod.fit_workspace, pool_mod.base_pool, pool_mod.features_of_images = orig


def test_the_pool_share_sets_how_much_of_each_batch_pool_pairs_make():
    import torch

    from loop.train.pool import pool_share_weights

    items = [{}, {}, {"pool": True}, {"pool": True}]
    pairs = [(0, 1), (0, 2), (2, 3), (3, 1)]  # one pair of two rated pictures, three with a pool picture
    w = pool_share_weights(pairs, items, 0.5)
    assert w.sum().item() == pytest.approx(1.0) and w[0].item() == pytest.approx(0.5)
    assert torch.allclose(w[1:], torch.full((3,), 0.5 / 3, dtype=torch.float64))
    draws = torch.multinomial(w, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert 0.45 < (draws == 0).float().mean().item() < 0.55  # uniform over pairs would give a quarter
    assert pool_share_weights(pairs, items, 0.0) is None  # 0: every pair alike
    assert pool_share_weights([(0, 1)], items, 0.5) is None  # no pool pair: nothing to share
    assert pool_share_weights([(2, 3)], items, 0.5) is None  # no rated pair


def test_a_wrong_pool_bar_is_one_clear_message():
    from loop.errors import LoopError

    assert load_config(None, []).train.taste_pool_bar == "UR"
    assert load_config(None, ["train.taste_pool_bar=selection"]).train.taste_pool_bar == "selection"
    with pytest.raises(LoopError, match="train.taste_pool_bar.*use selection or one of UR, SSR, SR, R"):
        load_config(None, ["train.taste_pool_bar=N"])


def test_a_hue_rotation_turns_the_colours_and_keeps_lightness_and_contrast():
    from loop.images import OPPONENT, rotate_hue
    from loop.tastes import attributes

    rng = np.random.default_rng(0)
    img = np.full((32, 32, 3), (200, 170, 120), dtype=np.uint8)  # a pale warm ground
    img[8:24, 10:22] = (60, 90, 170)  # a blue figure
    img[0, 0] = rng.integers(60, 200, 3)  # and one odd pixel
    turned = rotate_hue(img, 90).astype(np.float64)
    assert np.abs(turned.mean(axis=-1) - img.mean(axis=-1)).max() <= 1.0  # lightness kept
    figure, ground = turned[16, 16], turned[31, 31]
    assert abs(np.linalg.norm(figure - ground) - np.linalg.norm(img[16, 16] - img[31, 31].astype(float))) <= 1.5
    a, b = (OPPONENT[:2] @ img[16, 16].astype(float)), OPPONENT[:2] @ figure
    angle = np.degrees(np.arctan2(b[1], b[0]) - np.arctan2(a[1], a[0])) % 360
    assert abs(angle - 90) < 2  # the figure's colour turned by the angle asked for
    assert np.abs(rotate_hue(img, 360).astype(int) - img).max() <= 1
    before, after = attributes(img), attributes(turned.astype(np.uint8))
    assert after["size"] == before["size"] and after["cx"] == before["cx"]  # the same shape, in the same place
    assert abs(after["o1"] - before["o1"]) > 20  # in another colour


def test_the_pool_in_several_colourings_is_labelled_copy_by_copy(ws, red_blue_pool):
    # the taste model likes red: the copies get their own tiers, not their originals'
    from loop.train.pool import taste_pool_items

    cfg = load_config(ws.root, RATED + ["train.taste_pool=2", "train.taste_pool_hues=4"])
    said = []
    items = taste_pool_items(ws, None, None, cfg, [{"caption": "a square", "tier": "UR"}], log=said.append)
    assert len(items) == 8 and [it.get("hue") for it in items] == [None, None, 90, 90, 180, 180, 270, 270]
    assert len({it["sha256"] for it in items}) == 8 and all((ws.root / it["path"]).is_file() for it in items)
    assert items[0]["winner"] and not items[1]["winner"]  # red wins, blue does not
    assert not items[4]["winner"] and items[5]["winner"]  # turned half way round: red is cyan, blue is yellow
    won = sum(it["winner"] for it in items)
    assert said[-1].startswith(f"taste pool: {won} of 8 base picture(s) (in 4 colourings) predicted UR")
    # the copies are made once: a second labelling reads the same files
    stamps = {it["path"]: (ws.root / it["path"]).stat().st_mtime_ns for it in items}
    again = taste_pool_items(ws, None, None, cfg, [{"caption": "a square", "tier": "UR"}], log=said.append)
    assert {it["path"]: (ws.root / it["path"]).stat().st_mtime_ns for it in again} == stamps


def test_a_pool_in_no_colouring_is_one_clear_message():
    from loop.errors import LoopError

    assert load_config(None, []).train.taste_pool_hues == 1
    with pytest.raises(LoopError, match="train.taste_pool_hues.*must be >= 1"):
        load_config(None, ["train.taste_pool_hues=0"])
