"""Blind A/B votes: pairing rules, validation, the ranking, and the Compare tab in a real browser."""

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS
from loop.images import png_bytes
from loop.rate.ab import ABVotes
from loop.rate.handlers import BadRequest, NotFound
from loop.rate.page import BackgroundServer, build_app, close_app
from loop.workspace import Workspace, atomic_write, sha256_bytes


def _pairs(ws, store, seeds=(0, 1, 2), units=(0, 1), **settings):
    ids = {}
    for unit in units:
        for s in seeds:
            colour = (40 + 100 * unit, 80, 200 - 60 * unit)
            data = png_bytes(Image.new("RGB", (32, 32), colour), {"prompt": "a circle", "seed": s, "unit": unit})
            sha = sha256_bytes(data)
            path = atomic_write(ws.generations(unit) / f"{sha[:16]}.png", data)
            ids[(unit, s)] = store.add_image(
                sha256=sha, path=ws.rel(path), prompt="a circle", seed=s, unit=unit, round=unit, width=32, height=32,
                **{k: v(unit) if callable(v) else v for k, v in settings.items()},
            )  # fmt: skip
    return ids


def _ab(ws, store):
    from loop.rate.handlers import safe_file

    return ABVotes(store, path_of=lambda i: safe_file(ws, store.image(i)["path"]))


def _put_vote(store, left, right, winner):
    """A vote as the page leaves it (the pair's token spent), written straight into the table."""
    a, b = store.image(left), store.image(right)
    store.db.execute(
        "INSERT INTO ab_votes (left_id, right_id, left_unit, right_unit, winner, rater, created_at) "
        "VALUES (?, ?, ?, ?, ?, 'test', 0)",
        (left, right, a["unit"], b["unit"], winner),
    )


def test_a_pair_names_no_unit_or_image_and_is_voted_on_once(ws):
    with ws.store() as store:
        _pairs(ws, store)
        ab = _ab(ws, store)
        for _ in range(10):
            p = ab.pair()
            assert set(p) == {"pair", "left", "right"} and set(p["left"]) == {"url"}, "blind: no ids, no units"
            assert p["left"]["url"] == f"/loop/ab/image/{p['pair']}/left"
            left, right = ab.served[p["pair"]]
            a, b = store.image(left), store.image(right)
            assert a["unit"] != b["unit"] and (a["prompt"], a["seed"]) == (b["prompt"], b["seed"])
            # the bytes served are the pixels without the PNG's text (which names the unit)
            with Image.open(io.BytesIO(ab.image(p["pair"], "left"))) as im:
                assert not {"parameters", "loop"} & set(im.info)
                with Image.open(ws.root / a["path"]) as orig:
                    assert "Loop unit" in orig.info["parameters"]
                    assert list(im.convert("RGB").getdata()) == list(orig.convert("RGB").getdata())
        p = ab.pair()
        ab.vote({"pair": p["pair"], "winner": "left"})
        with pytest.raises(NotFound, match="voted on already"):  # a token is spent by its vote
            ab.vote({"pair": p["pair"], "winner": "left"})
        with pytest.raises(NotFound):
            ab.image(p["pair"], "left")
        with pytest.raises(NotFound):  # a pair this server never served
            ab.vote({"pair": "made-up", "winner": "left"})
        with pytest.raises(BadRequest):
            ab.vote({"pair": ab.pair()["pair"], "winner": "both"})
        assert ab.vote({"pair": ab.pair()["pair"], "winner": "skip"})["id"] is None  # skipped: no vote
        assert ab.count() == 1


def test_pairs_match_every_setting_and_can_be_narrowed_to_two_units(ws):
    with ws.store() as store:
        ids = _pairs(ws, store, seeds=(0,), units=(0, 1, 2), cfg=lambda u: 7.0 if u == 2 else 4.0)
        ab = _ab(ws, store)
        pairs = {ab.served[ab.pair()["pair"]] for _ in range(20)}
        assert {frozenset(p) for p in pairs} == {frozenset((ids[(0, 0)], ids[(1, 0)]))}  # unit 2's cfg differs
        assert ab.units() == [0, 1]
        with pytest.raises(NotFound, match="unit 0 and unit 2"):
            ab.pair(2, 0)
        with pytest.raises(BadRequest):
            ab.pair(1, None)


def test_the_least_voted_pair_comes_next(ws):
    with ws.store() as store:
        ids = _pairs(ws, store, seeds=(0, 1))
        ab = _ab(ws, store)
        for _ in range(3):
            _put_vote(store, ids[(0, 0)], ids[(1, 0)], "tie")
        seen = {store.image(ab.served[ab.pair()["pair"]][0])["seed"] for _ in range(8)}
    assert seen == {1}


def test_ranking_orders_units_by_votes(ws):
    with ws.store() as store:
        ids = _pairs(ws, store, units=(0, 1, 2))
        ab = _ab(ws, store)
        for s in (0, 1, 2):
            for _ in range(4):
                _put_vote(store, ids[(0, s)], ids[(1, s)], "right")
                _put_vote(store, ids[(2, s)], ids[(1, s)], "left")
                _put_vote(store, ids[(0, s)], ids[(2, s)], "right")
            _put_vote(store, ids[(0, s)], ids[(1, s)], "tie")
        r = ab.ranking(n_boot=100)
    assert [u["unit"] for u in r["units"]] == ["unit 2", "unit 1", "unit 0"]
    top = r["units"][0]
    assert top["low"] <= top["strength"] <= top["high"] and top["wins"] == 24 and top["losses"] == 0
    assert r["units"][2]["ties"] == 3 and r["votes"] == 39


@pytest.mark.browser
def test_compare_tab_votes_by_keyboard_and_renders_the_grid(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    ws = Workspace.init(tmp_path / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        _pairs(ws, store)
    ws.root.joinpath("configs", "loop.yaml").write_text("generate:\n  steps: 2\n")
    from loop.config import load_config

    _, app = build_app(ws, load_config(ws.root), warm=0)
    server = BackgroundServer(app)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            # every step waits for what must happen, not for how fast: on a loaded machine a vote's round trip or
            # the ranking's bootstrap fit took longer than expect's 5 s default (a failure that asserted a pace)
            page.set_default_timeout(120_000)
            expect.set_options(timeout=60_000)
            page.goto(server.url + "/")
            page.get_by_role("tab", name="A/B").click()
            page.wait_for_function("document.querySelector('.ab-img[data-side=left]')?.naturalWidth > 0")
            seen = []
            for key in ("ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"):
                seen.append(page.evaluate("[...document.querySelectorAll('#loop-ab img')].map(i => i.src)"))
                page.keyboard.press(key)
                page.wait_for_function(
                    "s => document.querySelector('.ab-img[data-side=left]').src !== s", arg=seen[-1][0]
                )
            # nothing the page holds names a unit or an image: only the pair's one-time token
            assert all(re.fullmatch(r".*/loop/ab/image/[\w-]+/(left|right)", u) for u in sum(seen, []))
            assert page.evaluate("document.querySelector('#loop-ab .ab').parentElement.dataset.votes") == "3"
            assert "unit" not in page.inner_text("#loop-ab .ab-pair").lower()
            # a key held down (auto-repeat) is not a vote per repeat
            page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowLeft', repeat: true}))")
            page.wait_for_timeout(500)
            assert page.evaluate("document.querySelector('#loop-ab .ab').parentElement.dataset.votes") == "3"
            # the results are folded away while voting: open on request, folded again by the next vote
            expect(page.locator(".ab-rank")).to_be_hidden()
            page.locator(".ab-results summary").click()
            expect(page.locator(".ab-rank")).to_be_visible()
            expect(page.locator(".ab-rank")).to_contain_text("unit 1")
            page.keyboard.press("ArrowDown")
            expect(page.locator(".ab-rank")).to_be_hidden()
            page.wait_for_function("document.querySelector('#loop-ab .ab').parentElement.dataset.votes == '4'")
            page.keyboard.press("z")  # takes the tie back; its pair comes back to vote on again
            page.wait_for_function("document.querySelector('#loop-ab .ab').parentElement.dataset.votes == '3'")
            expect(page.locator(".ab-status")).to_contain_text("undone")
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("document.querySelector('#loop-ab .ab').parentElement.dataset.votes == '4'")
            # narrowed to two units (here the only two)
            page.select_option(".ab-units", "1,0")
            expect(page.locator(".ab-units")).to_have_value("1,0")
            page.get_by_role("tab", name="Compare").click()
            page.get_by_role("button", name="Render the probe grid").click()
            page.wait_for_selector("#loop-compare-view img[alt='probe grid']", timeout=120_000)
            page.wait_for_function(
                "document.querySelector(\"#loop-compare-view img[alt='probe grid']\").naturalWidth > 0"
            )
            browser.close()
    finally:
        server.stop()
        close_app(app)
    with ws.store() as store:
        winners = [r[0] for r in store.db.execute("SELECT winner FROM ab_votes ORDER BY id")]
        undone = [r[0] for r in store.db.execute("SELECT vote_id FROM ab_undone")]
    assert winners == ["left", "right", "tie", "tie", "left"]  # the skip stored nothing
    assert undone == [4]  # the second tie, taken back with Z (its row stays)


def test_a_pair_whose_file_is_gone_answers_404_not_a_crash(ws):
    with ws.store() as store:
        _pairs(ws, store, seeds=(0,))
        ab = _ab(ws, store)
        p = ab.pair()
        for i in ab.served[p["pair"]]:
            (ws.root / store.image(i)["path"]).unlink()
        with pytest.raises(NotFound):
            ab.image(p["pair"], "right")
        (ws.root / store.image(ab.served[p["pair"]][0])["path"]).write_bytes(b"not a png")  # there, but damaged
        with pytest.raises(NotFound, match="cannot be read"):
            ab.image(p["pair"], "left")
        assert ab.vote({"pair": p["pair"], "winner": "skip"})["id"] is None  # and the page can move on


def test_undo_takes_back_the_raters_newest_vote_and_serves_its_pair_again(ws):
    with ws.store() as store:
        _pairs(ws, store, seeds=(0, 1))
        ab = _ab(ws, store)
        first = ab.pair()
        ab.vote({"pair": first["pair"], "winner": "left", "rater": "alice"})
        second = ab.pair()
        shown = set(ab.served[second["pair"]])
        ab.vote({"pair": second["pair"], "winner": "right", "rater": "alice"})
        ab.vote({"pair": ab.pair()["pair"], "winner": "tie", "rater": "bob"})
        out = ab.undo("alice")  # alice's newest: the second vote, not bob's
        assert out["votes"] == 2 and set(ab.served[out["pair"]]) == shown  # the same two images, a new token
        assert [w for _, _, w in ab.votes()][-1] == "tie"
        ab.vote({"pair": out["pair"], "winner": "tie", "rater": "alice"})  # voted on anew
        assert ab.count() == 3
        assert ab.undo("carol") == {"undone": None, "votes": 3}
        rows = store.db.execute("SELECT COUNT(*) FROM ab_votes").fetchone()[0]
        assert rows == 4  # nothing deleted: the undone vote's row stays, marked in ab_undone
        assert ab.ranking(n_boot=10)["votes"] == 3
