"""Issue 6: the selection rules of each strategy, lineage, exploration marking."""

import json

import pytest

from loop.config import load_config
from loop.errors import LoopError
from loop.images import read_meta
from loop.select import choose, lineage, select

QUIET = dict(log=lambda m: None)


def _img(store, name, unit, round, tier=None, parent=None, prompt="a circle"):
    i = store.add_image(sha256=f"{name:0>64}", path=f"generations/{name}.png", prompt=prompt, unit=unit,
                        round=round, parent_id=parent, seed=0)  # fmt: skip
    if tier:
        store.rate(i, tier, rater="t")
    return i


def _sc(*over):
    return load_config(None, list(over)).select


def test_golden_never_takes_below_ur_and_includes_imports(ws):
    with ws.store() as store:
        ids = {t: _img(store, f"a{t}", 0, 0, t) for t in ("UR", "SSR", "SR", "R", "N")}
        imported = _img(store, "imp", None, None, "UR")
        later = _img(store, "b", 1, 1, "UR")
        demoted = _img(store, "c", 1, 1, "UR")
        store.rate(demoted, "SSR", rater="t")  # the newest decision wins
        items = choose(ws, store, _sc("select.strategy=golden"), 1)
    assert {i["id"] for i in items} == {ids["UR"], imported, later}
    assert {i["tier"] for i in items} == {"UR"}


def test_converge_accumulates_and_replace_keeps_only_the_round(ws):
    with ws.store() as store:
        r0 = [_img(store, "a", 0, 0, "UR"), _img(store, "b", 0, 0, "SSR"), _img(store, "c", 0, 0, "SR")]
        r1 = [_img(store, "d", 1, 1, "SSR"), _img(store, "e", 1, 1, "R")]
        top = choose(ws, store, _sc("select.strategy=converge"), 1)
        acc = choose(ws, store, _sc("select.strategy=converge", "select.top_share=0"), 1)
        rep = choose(ws, store, _sc("select.strategy=converge", "select.accumulate=false", "select.top_share=0"), 1)
        sr = choose(ws, store, _sc("select.strategy=converge", "select.min_tier=SR", "select.top_share=0"), 1)
    # by default (select.top_share=0.25) each round's best tiers down to a quarter of it: round 0's UR, round 1's SSR
    assert {i["id"] for i in top} == {r0[0], r1[0]}
    assert {i["id"] for i in acc} == {r0[0], r0[1], r1[0]}
    assert {i["id"] for i in rep} == {r1[0]}
    assert {i["id"] for i in sr} == {*r0, r1[0]}


def test_outside_images_keep_their_share_of_the_weight(ws):
    with ws.store() as store:
        base = _img(store, "base", 0, 0, "UR")
        mine = [_img(store, f"u{k}", 1, 1, "UR") for k in range(9)]
        items = choose(ws, store, _sc("select.strategy=golden", "select.outside_share=0.3"), 1)
    w = {i["id"]: i["weight"] for i in items}
    share = w[base] / sum(w.values())
    assert share == pytest.approx(0.3, abs=1e-3)
    assert all(w[m] == 1.0 for m in mine)


def test_tier_weights_draw_better_tiers_more_often(ws):
    with ws.store() as store:
        ur, ssr = _img(store, "ur", 1, 1, "UR"), _img(store, "ssr", 1, 1, "SSR")
        even = choose(ws, store, _sc("select.strategy=converge", "select.top_share=0"), 1)
        weighted = choose(
            ws, store, _sc("select.strategy=converge", "select.top_share=0", "select.tier_weights=[3,1,1,1,1]"), 1
        )
    assert {i["id"]: i["weight"] for i in even} == {ur: 1.0, ssr: 1.0}
    assert {i["id"]: i["weight"] for i in weighted} == {ur: 3.0, ssr: 1.0}
    with pytest.raises(LoopError, match="select.tier_weights"):
        _sc("select.tier_weights=[3,1]")
    with pytest.raises(LoopError, match="select.tier_weights"):
        _sc("select.tier_weights=[1,1,0,1,1]")


def test_top_share_keeps_each_rounds_best_tiers(ws):
    with ws.store() as store:
        # round 0: 1 UR of 10, so UR alone is under 30% and SSR comes too (4 of 10); never below SSR
        r0 = {t: [_img(store, f"r0{t}{k}", 0, 0, t) for k in range(n)] for t, n in (("UR", 1), ("SSR", 3), ("SR", 6))}
        # round 1: a unit that pleases: 4 UR of 10 is already 30%, so its SSR images stay out
        r1 = {t: [_img(store, f"r1{t}{k}", 1, 1, t) for k in range(n)] for t, n in (("UR", 4), ("SSR", 6))}
        imported = _img(store, "imp", None, None, "SSR")  # no round: not filtered
        top = choose(ws, store, _sc("select.strategy=converge", "select.top_share=0.3"), 1)
        plain = choose(ws, store, _sc("select.strategy=converge", "select.top_share=0"), 1)
        grow = choose(ws, store, _sc("select.strategy=grow", "select.top_share=0.3", "select.ancestor_cap=1"), 1)
        nothing_below_ssr = choose(ws, store, _sc("select.strategy=converge", "select.top_share=1"), 1)
    assert {i["id"] for i in top} == {*r0["UR"], *r0["SSR"], *r1["UR"], imported}
    assert {i["id"] for i in plain} == {*r0["UR"], *r0["SSR"], *r1["UR"], *r1["SSR"], imported}
    assert {i["tier"] for i in nothing_below_ssr} == {"UR", "SSR"}
    assert {i["id"] for i in grow} == {i["id"] for i in plain}, "grow keeps every accepted image"
    with pytest.raises(LoopError, match="select.top_share"):
        _sc("select.top_share=1.5")


def test_balance_rounds_gives_every_round_the_same_total_weight(ws):
    with ws.store() as store:
        r1 = [_img(store, "r1", 1, 1, "UR")]
        r2 = [_img(store, f"r2{k}", 2, 2, "UR") for k in range(4)]  # a unit that pleased: four times as many
        plain = choose(ws, store, _sc("select.strategy=converge", "select.outside_share=0"), 2)
        over = ["select.strategy=converge", "select.outside_share=0", "select.balance_rounds=true"]
        balanced = choose(ws, store, _sc(*over), 2)
    assert {i["weight"] for i in plain} == {1.0}
    total = {}
    for i in balanced:
        total[i["round"]] = total.get(i["round"], 0) + i["weight"]
    assert total[1] == pytest.approx(total[2]) and total[1] == pytest.approx(2.5)  # the mean total is kept
    assert len({i["weight"] for i in balanced if i["id"] in r2}) == 1 and r1


def test_lineage_gives_ancestor_and_depth(ws):
    with ws.store() as store:
        a = _img(store, "a", None, None, "UR")
        b = _img(store, "b", 1, 1, parent=a)
        c = _img(store, "c", 2, 2, parent=b)
        d = _img(store, "d", 1, 1)
        lin = lineage(store)
    assert lin[a] == (a, 0) and lin[b] == (a, 1) and lin[c] == (a, 2) and lin[d] == (d, 0)


def test_grow_caps_the_share_of_one_ancestor(ws):
    with ws.store() as store:
        a = _img(store, "a", None, None, "UR")
        b = _img(store, "b", None, None, "UR")
        kids_a = [_img(store, f"a{k}", 1, 1, "UR", parent=a) for k in range(8)]
        kid_b = _img(store, "b1", 1, 1, "SSR", parent=b)
        items = choose(ws, store, _sc("select.strategy=grow", "select.ancestor_cap=0.5"), 1)
        uncapped = choose(ws, store, _sc("select.strategy=grow", "select.ancestor_cap=1.0"), 1)
    by_root = {}
    for i in items:
        by_root.setdefault(i["ancestor"], []).append(i)
    assert len(by_root[a]) <= 0.5 * len(items) + 1e-9
    assert {i["id"] for i in by_root[b]} == {b, kid_b}, "the smaller lineage is kept whole"
    assert len(uncapped) == 11 and len(items) < len(uncapped)
    assert all(i["depth"] == 1 for i in items if i["id"] in kids_a)


def test_empty_selection_is_one_clear_message(ws):
    with ws.store() as store:
        _img(store, "a", 0, 0, "R")
        with pytest.raises(LoopError, match="empty selection"):
            select(ws, store, _sc("select.strategy=golden"), 0)


def _draw(ws, name, background, shape, box):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(im).rectangle(box, fill=shape)
    (ws.root / "generations").mkdir(exist_ok=True)
    im.save(ws.root / "generations" / f"{name}.png")


def test_longtail_counts_novel_hits_double_measured_from_the_base_mean(ws):
    """Novelty is measured from the base model's mean image. All these images are warm and alike in raw features
    (cosine distance 0.03); what sets one apart is where it differs from what the base model makes: a bar on the
    right is new after a bar on the left, the same bar again is not, and a hit weighs twice in training."""
    warm, orange = (200, 60, 40), (230, 120, 40)
    with ws.store() as store:
        for k in range(4):  # unit 0, the base model: a square in the middle; their mean is the centre
            _draw(ws, f"base{k}", warm, orange, (12 - k, 12 - k, 20 + k, 20 + k))
            _img(store, f"base{k}", 0, 0, "N")
        _draw(ws, "first", warm, orange, (0, 0, 12, 31))
        first = _img(store, "first", 1, 1, "UR")
        _draw(ws, "again", (205, 60, 40), (230, 125, 40), (0, 0, 12, 31))
        again = _img(store, "again", 1, 1, "UR")
        _draw(ws, "other", warm, orange, (19, 0, 31, 31))
        other = _img(store, "other", 1, 1, "UR")
        items = {i["id"]: i for i in choose(ws, store, _sc("select.strategy=longtail"), 1)}
    assert {i for i, x in items.items() if x["novel_hit"]} == {other}
    assert not items[first]["novel_hit"] and not items[again]["novel_hit"]
    assert items[other]["weight"] == pytest.approx(2 * items[again]["weight"])


def test_exploration_images_are_marked_and_resumable(ws, cfg):
    from loop.generate import generate
    from loop.strategies import explore, is_exploration

    cfg = load_config(ws.root, ["generate.images_per_prompt=4", "generate.steps=3", "select.strategy=longtail",
                                "select.explore_share=0.5"])  # fmt: skip
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate(ws, store, cfg, unit=0, round=0, **QUIET)
        said = []
        made = explore(ws, store, cfg, 0, log=said.append)
        again = explore(ws, store, cfg, 0, log=said.append)
        rows = store.db.execute("SELECT * FROM images ORDER BY id").fetchall()
    assert made == 8 and again == 0, "explore_share 0.5 of 8 pass images; a rerun makes nothing new"
    # each kind with its count, and only the kinds made (the rerun made none)
    assert said == ["longtail: 8 exploration image(s) (mutate 2, recombine 2, seed 2, cfg 1, base 1)",
                    "longtail: 0 exploration image(s)"]  # fmt: skip
    ex = [r for r in rows if is_exploration(r)]
    assert len(ex) == 8 and len(rows) == 16
    kinds = {json.loads(r["params"])["explore"] for r in ex}
    assert kinds == {"mutate", "recombine", "seed", "cfg", "base"}
    assert all(read_meta(ws.root / r["path"])["exploration"] is True for r in ex)
    plain = {r["prompt"] for r in rows if not is_exploration(r)}
    assert any(r["prompt"] not in plain for r in ex), "some exploration prompts are new"


def test_grow_makes_variations_of_the_set_once(ws, cfg, tmp_path):
    from PIL import Image

    from loop.interop import import_images
    from loop.strategies import grow_variations

    seed_dir = tmp_path / "seeds"
    seed_dir.mkdir()
    Image.new("RGB", (32, 32), (200, 40, 30)).save(seed_dir / "mine.png")
    (seed_dir / "mine.txt").write_text("a circle")
    cfg = load_config(ws.root, ["generate.steps=3", "select.strategy=grow", "select.variations=2"])
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        import_images(ws, store, seed_dir, "UR", "seed", **QUIET)
        made = grow_variations(ws, store, cfg, 0, **QUIET)
        again = grow_variations(ws, store, cfg, 0, **QUIET)
        seed = store.db.execute("SELECT * FROM images WHERE source = 'seed'").fetchone()
        kids = store.children(seed["id"])
    assert (made, again) == (2, 0)
    assert len(kids) == 2 and all(k["prompt"] == "a circle" for k in kids)


def test_grow_variations_max_caps_a_round_newest_images_first(ws, tmp_path):
    from PIL import Image

    from loop.interop import import_images
    from loop.strategies import grow_variations

    seed_dir = tmp_path / "seeds"
    seed_dir.mkdir()
    for k, colour in enumerate([(200, 40, 30), (30, 200, 40), (30, 40, 200)]):
        Image.new("RGB", (32, 32), colour).save(seed_dir / f"s{k}.png")
        (seed_dir / f"s{k}.txt").write_text("a circle")
    over = ["generate.steps=2", "select.strategy=grow", "select.variations=2", "select.variations_max=3"]
    cfg = load_config(ws.root, over)
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        import_images(ws, store, seed_dir, "UR", "seed", **QUIET)
        made = grow_variations(ws, store, cfg, 0, **QUIET)
        seeds = [r["id"] for r in store.db.execute("SELECT id FROM images WHERE source = 'seed' ORDER BY id")]
        kids = {i: len(store.children(i)) for i in seeds}
        # a rerun (the cap reached) makes none; without the cap, the rest of the 2 each
        again = grow_variations(ws, store, cfg, 0, **QUIET)
        rest = grow_variations(ws, store, load_config(ws.root, over[:-1]), 0, **QUIET)
    assert made == 3 and kids == {seeds[2]: 2, seeds[1]: 1, seeds[0]: 0}
    assert again == 0 and rest == 3
    with pytest.raises(LoopError, match="select.variations_max"):
        load_config(ws.root, ["select.variations_max=-1"])
