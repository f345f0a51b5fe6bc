"""Blind A/B votes: pairing rules, validation, the ranking, and the Compare tab in a real browser."""

from pathlib import Path

import pytest
from PIL import Image

from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS
from loop.images import png_bytes
from loop.rate.ab import ABVotes
from loop.rate.handlers import BadRequest
from loop.rate.page import BackgroundServer, build_app, close_app
from loop.workspace import Workspace, atomic_write, sha256_bytes


def _pairs(ws, store, seeds=(0, 1, 2), units=(0, 1)):
    ids = {}
    for unit in units:
        for s in seeds:
            colour = (40 + 100 * unit, 80, 200 - 60 * unit)
            data = png_bytes(Image.new("RGB", (32, 32), colour), {"prompt": "a circle", "seed": s, "unit": unit})
            sha = sha256_bytes(data)
            path = atomic_write(ws.generations(unit) / f"{sha[:16]}.png", data)
            ids[(unit, s)] = store.add_image(
                sha256=sha, path=ws.rel(path), prompt="a circle", seed=s, unit=unit, round=unit, width=32, height=32
            )
    return ids


def test_pairs_share_prompt_and_seed_across_units_and_votes_are_checked(ws):
    with ws.store() as store:
        ids = _pairs(ws, store)
        ab = ABVotes(store)
        for _ in range(10):
            p = ab.pair()
            a, b = store.image(p["left"]["id"]), store.image(p["right"]["id"])
            assert a["unit"] != b["unit"] and (a["prompt"], a["seed"]) == (b["prompt"], b["seed"])
            assert "unit" not in p["left"] and "unit" not in p["right"], "blind: the units are not sent"
            assert p["left"]["url"] == f"/loop/image/{p['left']['id']}", "nor named by the file's path"
        ab.vote({"left": ids[(1, 0)], "right": ids[(0, 0)], "winner": "left"})
        with pytest.raises(BadRequest):  # same unit on both sides
            ab.vote({"left": ids[(1, 0)], "right": ids[(1, 1)], "winner": "left"})
        with pytest.raises(BadRequest):  # different seeds
            ab.vote({"left": ids[(1, 0)], "right": ids[(0, 1)], "winner": "left"})
        with pytest.raises(BadRequest):
            ab.vote({"left": ids[(1, 0)], "right": ids[(0, 0)], "winner": "both"})
        assert ab.count() == 1


def test_the_least_voted_pair_comes_next(ws):
    with ws.store() as store:
        ids = _pairs(ws, store, seeds=(0, 1))
        ab = ABVotes(store)
        for _ in range(3):
            ab.vote({"left": ids[(0, 0)], "right": ids[(1, 0)], "winner": "tie"})
        seen = {store.image(ab.pair()["left"]["id"])["seed"] for _ in range(8)}
    assert seen == {1}


def test_ranking_orders_units_by_votes(ws):
    with ws.store() as store:
        ids = _pairs(ws, store, units=(0, 1, 2))
        ab = ABVotes(store)
        for s in (0, 1, 2):
            for _ in range(4):
                ab.vote({"left": ids[(0, s)], "right": ids[(1, s)], "winner": "right"})
                ab.vote({"left": ids[(2, s)], "right": ids[(1, s)], "winner": "left"})
                ab.vote({"left": ids[(0, s)], "right": ids[(2, s)], "winner": "right"})
            ab.vote({"left": ids[(0, s)], "right": ids[(1, s)], "winner": "tie"})
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
            page.goto(server.url + "/")
            page.get_by_role("tab", name="Compare").click()
            page.wait_for_function("document.querySelector('.ab-img[data-side=left]')?.naturalWidth > 0")
            for key in ("ArrowLeft", "ArrowRight", "ArrowDown"):
                before = page.evaluate("document.querySelector('.ab-img[data-side=left]').src")
                page.keyboard.press(key)
                page.wait_for_function(
                    "n => document.querySelector('#loop-ab .ab')?.parentElement.dataset.votes == n",
                    arg=str(["ArrowLeft", "ArrowRight", "ArrowDown"].index(key) + 1),
                )
                assert before and "unit_" not in before  # a pair was showing, its URL not naming the unit
            # a key held down (auto-repeat) is not a vote per repeat
            page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowLeft', repeat: true}))")
            page.wait_for_timeout(500)
            assert page.evaluate("document.querySelector('#loop-ab .ab').parentElement.dataset.votes") == "3"
            expect(page.locator(".ab-rank")).to_be_visible()
            expect(page.locator(".ab-rank")).to_contain_text("unit 1")
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
    assert winners == ["left", "right", "tie"]
