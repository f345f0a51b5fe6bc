"""The rating page in a real browser: Playwright drives Debian's chromium against a server on 127.0.0.1.

Every test adds its own round of small drawn images and opens the page on it (`/?round=N`), so one server
and one browser serve the whole module. The forbidden-path requests go over a raw socket, so `..` and
percent-encodings reach the server exactly as written.
"""

import http.client
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS, add_images
from loop.rate.handlers import golden_path
from loop.rate.page import BackgroundServer, build_app, close_app
from loop.workspace import Workspace

TIER_OF_KEY = {
    "1": "UR",
    "2": "SSR",
    "3": "SR",
    "4": "R",
    "5": "N",
    "a": "UR",
    "s": "SSR",
    "d": "SR",
    "f": "R",
    "g": "N",
}
browser_test = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("page") / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
    _, app = build_app(ws)
    server = BackgroundServer(app)
    yield ws, server.url
    server.stop()
    close_app(app)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def add(ws, n, round, seed=0):
    with ws.store() as store:
        return add_images(ws, store, n, round=round, seed=seed)


def sql(ws, query, *args):
    with ws.store() as store:
        return [tuple(r) for r in store.db.execute(query, args).fetchall()]


def open_page(browser, url, round, rater="alice", **ctx_kw):
    ctx = browser.new_context(viewport={"width": 1200, "height": 860}, **ctx_kw)
    if rater:
        ctx.add_init_script(f"localStorage.setItem('loop.rater', {json.dumps(rater)})")
    page = ctx.new_page()
    page.goto(f"{url}/?round={round}")
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile", timeout=30_000)
    return page


def idle(page):
    page.wait_for_function("LoopRate.idle()", timeout=10_000)


@browser_test
def test_rate_50_images_by_keyboard(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 55, round=1)
    page = open_page(browser, url, 1, rater=None)
    page.keyboard.press("1")  # no name yet: nothing is rated, the page asks for one
    expect(page.locator(".lr-status")).to_contain_text("name")
    page.fill(".lr-rater", "alice")
    page.press(".lr-rater", "Enter")
    keys = list("12345asdfg") * 5
    for k in keys:
        page.keyboard.press(k)
    idle(page)
    rows = sql(ws, "SELECT image_id, tier, rater FROM ratings WHERE image_id >= ? ORDER BY id", ids[0])
    assert rows == [(i, TIER_OF_KEY[k], "alice") for i, k in zip(ids, keys)]
    # the last rated tiles show their tiers, and the focus moved on to the 51st image
    expect(page.locator(f'.lr-tile[data-id="{ids[49]}"]')).to_have_attribute("data-tier", "N")
    expect(page.locator(f'.lr-tile[data-id="{ids[45]}"] .lr-badge')).to_have_text("UR")
    expect(page.locator(".lr-tile.lr-focus")).to_have_attribute("data-id", str(ids[50]))
    expect(page.locator(".lr-counters")).to_contain_text("50 / 55 rated", timeout=8000)
    page.reload()  # the name is remembered
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    assert page.input_value(".lr-rater") == "alice"
    # unrated first: the five left unrated now lead the grid
    assert page.evaluate("LoopRate.state.ids.slice(0, 5)") == ids[50:]
    page.context.close()


@browser_test
def test_detail_view_opens_closes_and_excellent_collects_into_golden(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 4, round=2)
    row = sql(ws, "SELECT prompt, seed, path, sha256 FROM images WHERE id = ?", ids[1])[0]
    page = open_page(browser, url, 2)
    detail = page.locator(".lr-detail")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    expect(detail).to_be_visible()
    expect(page.locator(".lr-meta")).to_contain_text(row[0])
    expect(page.locator(".lr-meta")).to_contain_text("Negative prompt")
    for label in ("Seed", "Steps", "CFG", "Sampler", "Size", "Unit", "Parent", "Units"):
        expect(page.locator(".lr-meta dt", has_text=label).first).to_be_visible()
    expect(page.locator(".lr-d-img img")).to_have_attribute("src", f"loop/files/{row[2]}")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    page.keyboard.press("Enter")
    expect(detail).to_be_visible()
    page.click(".lr-excellent")
    idle(page)
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[1]) == [("UR", "alice")]
    gold = golden_path(ws, row[3], row[2])
    assert gold.exists() and os.path.samefile(gold, ws.root / row[2])
    expect(page.locator(".lr-d-golden")).to_contain_text("golden/")
    expect(page.locator(".lr-d-tier")).to_have_text("UR")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    expect(page.locator(f'.lr-tile[data-id="{ids[1]}"]')).to_have_attribute("data-tier", "UR")
    page.context.close()


@browser_test
def test_undo_takes_back_the_last_rating(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 3, round=3)
    page = open_page(browser, url, 3)
    page.keyboard.press("2")
    page.keyboard.press("3")
    page.keyboard.press("z")
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM current_tiers WHERE image_id >= ?", ids[0]) == [(ids[0], "SSR")]
    expect(page.locator(f'.lr-tile[data-id="{ids[1]}"]')).to_have_attribute("data-tier", "")
    expect(page.locator(".lr-tile.lr-focus")).to_have_attribute("data-id", str(ids[1]))  # back on it, to re-rate
    page.keyboard.press("Backspace")
    idle(page)
    expect(page.locator(f'.lr-tile[data-id="{ids[0]}"]')).to_have_attribute("data-tier", "")
    assert sql(ws, "SELECT COUNT(*) FROM current_tiers WHERE image_id >= ?", ids[0]) == [(0,)]
    # every event is kept: two ratings and two undos
    assert sql(ws, "SELECT COUNT(*), COUNT(undoes) FROM ratings WHERE image_id >= ?", ids[0]) == [(4, 2)]
    page.context.close()


@browser_test
def test_a_key_right_after_undo_re_rates_the_undone_image_before_the_server_answers(site, browser):
    ws, url = site
    ids = add(ws, 3, round=40)
    page = open_page(browser, url, 40, rater="frank")
    press_at_once(page, "12z3")  # all four before any answer (a slow link): "3" is for the image just undone
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM current_tiers WHERE image_id >= ?", ids[0]) == [
        (ids[0], "UR"),
        (ids[1], "SR"),
    ]
    assert focus_id(page) == ids[2]  # and on to the next unrated one, not pulled back by the undo's answer
    page.context.close()


@browser_test
def test_two_raters_at_once_lose_nothing_and_see_each_other(site, browser):
    ws, url = site
    ids = add(ws, 40, round=4)
    a = open_page(browser, url, 4, rater="alice")
    b = open_page(browser, url, 4, rater="bob")
    for k in range(30):  # interleaved: both pages post while the other does
        # each key once its page holds the image it shows, as a rater looks before rating (keys faster than a
        # claim's round trip can land two pages on one image before either hears of the other)
        settled(a)
        a.keyboard.press("12345"[k % 5])
        settled(b)
        b.keyboard.press("asdfg"[(k + 2) % 5])
    idle(a)
    idle(b)
    counts = dict(sql(ws, "SELECT rater, COUNT(*) FROM ratings WHERE image_id >= ? GROUP BY rater", ids[0]))
    # Nothing lost: each page's stored ratings are exactly the ones it made. How many of the keys rate something
    # depends on the machine's pace (a key is refused when the page's focus is left on an image the other page
    # holds, nothing else being free at that moment), so that is not counted.
    made = {name: page.evaluate("LoopRate.state.timings.length") for name, page in (("alice", a), ("bob", b))}
    assert counts == {name: n for name, n in made.items() if n} and sum(made.values()) > 0, (counts, made)
    both = sql(
        ws,
        "SELECT image_id FROM ratings WHERE image_id >= ? GROUP BY image_id HAVING COUNT(DISTINCT rater) > 1",
        ids[0],
    )
    assert both == [], both  # and no image rated by both
    want = {
        i: [t, r] for i, t, r in sql(ws, "SELECT image_id, tier, rater FROM current_tiers WHERE image_id >= ?", ids[0])
    }
    check = "want => Object.entries(want).every(([id, [t, r]]) => "
    check += "LoopRate.state.tier.get(+id) === t && LoopRate.state.by.get(+id) === r)"
    for page in (a, b):  # within a couple of polls each page shows the newest decision, whoever made it
        page.wait_for_function(check, arg={str(k): v for k, v in want.items()}, timeout=8000)
    a.context.close()
    b.context.close()


@browser_test
def test_new_images_appear_without_reload(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    add(ws, 3, round=5)
    page = open_page(browser, url, 5)
    expect(page.locator(".lr-tile")).to_have_count(3)
    add(ws, 4, round=5, seed=11)
    expect(page.locator(".lr-tile")).to_have_count(7, timeout=8000)
    page.context.close()


@browser_test
def test_auth_guards_the_page_and_a_logged_in_browser_rates(tmp_path, browser):
    from playwright.sync_api import expect

    ws = Workspace.init(tmp_path / "ws")
    ids = add(ws, 2, round=0)
    _, app = build_app(ws, auth=[("ann", "pw")])
    server = BackgroundServer(app)
    try:
        assert raw_get(server.url, "/")[0] == 401
        assert raw_get(server.url, "/loop/api/meta")[0] == 401
        # the name typed on this browser earlier was zed: behind a login the ratings are ann's, and the page says so
        page = open_page(browser, server.url, 0, rater="zed", http_credentials={"username": "ann", "password": "pw"})
        expect(page.locator(".lr-rater")).to_have_value("ann")
        assert page.locator(".lr-rater").get_attribute("readonly") is not None
        page.keyboard.press("1")
        idle(page)
        assert sql(ws, "SELECT image_id, tier, rater FROM ratings") == [(ids[0], "UR", "ann")]
        page.context.close()
    finally:
        server.stop()
        close_app(app)


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (no client-side normalisation of '..' or %-escapes)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def forbidden_paths(ws: Workspace) -> list[str]:
    db, yaml = ws.db_path.as_posix(), (ws.root / "configs" / "loop.yaml").as_posix()
    return [
        "/loop/files/../loop.db",
        "/loop/files/../../loop.db",
        "/loop/files/%2e%2e/loop.db",
        "/loop/files/%2E%2E%2Floop.db",
        "/loop/files/..%2floop.db",
        "/loop/files/generations/..%2f..%2floop.db",
        "/loop/files/generations%2f..%2fconfigs%2floop.yaml",
        "/loop/files/%252e%252e/loop.db",
        "/loop/files/loop.db",
        "/loop/files/configs/loop.yaml",
        "/loop/files//etc/passwd",
        "/loop/files/%2fetc%2fpasswd",
        f"/loop/files/{db}",
        "/loop/files/generations2/x.png",
        "/loop/files/golden/out.png",
        "/loop/files/cache/configs/loop.yaml",
        "/loop/thumb/..%2f..%2floop.db",
        "/loop/static/..%2fhandlers.py",
        "/loop.db",
        "/../loop.db",
        "/configs/loop.yaml",
        f"/gradio_api/file={db}",
        f"/gradio_api/file={yaml}",
        "/gradio_api/file=loop.db",
        "/gradio_api/file=../loop.db",
        f"/file={db}",
        f"/gradio_api/file=%2F{db.lstrip('/')}",
    ]


def test_only_generations_golden_and_cache_are_served(site):
    ws, url = site
    (ws.root / "generations2").mkdir(exist_ok=True)
    (ws.root / "generations2" / "x.png").write_bytes(b"outside")
    out = ws.root / "golden" / "out.png"
    if not out.is_symlink():
        out.symlink_to(ws.db_path)  # a link in a served folder that points out of it
    link = ws.root / "cache" / "configs"
    if not link.is_symlink():
        link.symlink_to(ws.root / "configs", target_is_directory=True)
    (i,) = add(ws, 1, round=9)
    rel = sql(ws, "SELECT path FROM images WHERE id = ?", i)[0][0]
    assert raw_get(url, f"/loop/files/{rel}")[0] == 200  # the harness reaches a served file
    for path in forbidden_paths(ws):
        status, body = raw_get(url, path)
        assert status in (403, 404), f"{path} -> {status}"
        assert b"SQLite format" not in body and b"model:" not in body and b"outside" not in body, path


@browser_test
def test_progress_tab_shows_counters_and_keys_work_after_switching_back(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 3, round=6)
    page = open_page(browser, url, 6)
    page.get_by_role("tab", name="Progress").click()
    progress = page.get_by_role("tabpanel")
    expect(progress).to_contain_text("Every round")
    expect(progress).to_contain_text("Pace")
    page.keyboard.press("1")  # the grid is hidden: its keys are off
    page.get_by_role("tab", name="Rate").click()
    expect(page.locator(".lr-tile").first).to_be_visible()
    page.keyboard.press("4")
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ?", ids[0]) == [(ids[0], "R")]
    page.context.close()


def focus_id(page) -> int:
    return page.evaluate("LoopRate.state.ids[LoopRate.state.focus]")


def rate_as(ws, rater, items):
    """Ratings made by another rater (another browser), straight into the store."""
    with ws.store() as store:
        store.rate_many(items, rater)


def press_at_once(page, keys):
    """Keys dispatched in one task, so the first is sent alone and the others queue into one batch."""
    page.evaluate("ks => ks.forEach(k => document.dispatchEvent(new KeyboardEvent('keydown', {key: k})))", list(keys))


@browser_test
def test_keys_after_the_last_unrated_image_never_overwrite_finished_ratings(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 4, round=20)
    rate_as(ws, "dave", [(ids[0], "SSR")])  # dave's, listed after the three unrated ones
    page = open_page(browser, url, 20, rater="frank")
    status = page.locator(".lr-status")
    assert focus_id(page) == ids[1]
    for k in "5552":  # three unrated, then one key too many: it changes nothing, not even frank's own rating
        page.keyboard.press(k)
    idle(page)
    assert focus_id(page) == ids[3]
    expect(status).to_contain_text(f"all rated; new images appear as they are made · #{ids[3]} is N by you")
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("SSR", "dave")]
    frank = sql(ws, "SELECT image_id, tier FROM ratings WHERE rater = 'frank' AND image_id >= ? ORDER BY id", ids[0])
    assert frank == [(ids[1], "N"), (ids[2], "N"), (ids[3], "N")]
    # new images arrive while everything is rated: the first of them takes the focus, and keys rate them
    new = add(ws, 2, round=20, seed=7)
    page.wait_for_function("id => LoopRate.state.ids[LoopRate.state.focus] === id", arg=new[0], timeout=8000)
    page.keyboard.press("3")
    assert focus_id(page) == new[1]
    page.keyboard.press("3")
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM current_tiers WHERE image_id >= ?", new[0]) == [
        (new[0], "SR"),
        (new[1], "SR"),
    ]
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("SSR", "dave")]
    # overriding someone else's rating stays possible, deliberately, and the status line says whose it was
    page.click(f'.lr-tile[data-id="{ids[0]}"]')
    expect(status).to_contain_text("SSR by dave")
    page.keyboard.press("4")
    expect(status).to_contain_text("overrides SSR by dave")
    idle(page)
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("R", "frank")]
    page.context.close()


@browser_test
def test_a_key_on_a_list_rated_by_others_rates_nothing_until_the_rater_picks_an_image(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 3, round=21)
    rate_as(ws, "dave", [(i, "SR") for i in ids])
    page = open_page(browser, url, 21, rater="frank")
    expect(page.locator(".lr-status")).to_contain_text("all rated")
    page.keyboard.press("5")
    expect(page.locator(".lr-status")).to_contain_text("by dave")
    idle(page)
    assert sql(ws, "SELECT COUNT(*) FROM ratings WHERE rater = 'frank' AND image_id >= ?", ids[0]) == [(0,)]
    page.keyboard.press("ArrowRight")  # chosen: now a key re-rates it
    page.keyboard.press("5")
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE rater = 'frank' AND image_id >= ?", ids[0]) == [
        (ids[1], "N")
    ]
    page.context.close()


@browser_test
def test_a_second_rater_leaves_the_stretch_another_is_rating(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 40, round=22)
    bob = open_page(browser, url, 22, rater="bob")
    assert focus_id(bob) == ids[0]
    rate_as(ws, "alice", [(i, "R") for i in ids[:5]])  # alice rates the top of the same list
    # bob's next poll shows it: he moves half way down the unrated images after hers (ids[5:] -> ids[22])
    bob.wait_for_function("id => LoopRate.state.ids[LoopRate.state.focus] === id", arg=ids[22], timeout=8000)
    expect(bob.locator(".lr-status")).to_contain_text("alice")
    bob.keyboard.press("1")
    assert focus_id(bob) == ids[23]
    # a rater who opens the page while alice is rating does not start on her next image either
    carol = open_page(browser, url, 22, rater="carol")
    carol.wait_for_function("LoopRate.state.focus > 0", timeout=8000)
    expect(carol.locator(".lr-status")).to_contain_text("alice")
    idle(bob)
    bob.context.close()
    carol.context.close()


@browser_test
def test_a_refused_rating_in_a_batch_drops_only_itself(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 10, round=23)
    page = open_page(browser, url, 23)
    bodies = []

    def refuse(bad, message, code):
        def handler(route):
            items = [r["image_id"] for r in route.request.post_data_json["ratings"]]
            bodies.append(items)
            if bad in items:
                route.fulfill(status=code, content_type="application/json", body=json.dumps({"error": message}))
            else:
                route.continue_()

        return handler

    # the server names the refused image: the others of the batch are sent again at once
    page.route("**/loop/api/rate", refuse(ids[2], f"no image with id {ids[2]}", 404))
    press_at_once(page, "12345")
    idle(page)
    assert [ids[1], ids[2], ids[3], ids[4]] in bodies  # it was one batch
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ? ORDER BY id", ids[0]) == [
        (ids[0], "UR"),
        (ids[1], "SSR"),
        (ids[3], "R"),
        (ids[4], "N"),
    ]
    expect(page.locator(".lr-status")).to_contain_text(f"not saved: #{ids[2]} SR")
    expect(page.locator(f'.lr-tile[data-id="{ids[2]}"]')).to_have_attribute("data-tier", "")
    # a refusal that names no image: the batch goes again one rating at a time, and only the refused one is lost
    page.unroute("**/loop/api/rate")
    bodies.clear()
    page.route("**/loop/api/rate", refuse(ids[7], "refused for the test", 400))
    assert focus_id(page) == ids[5]
    press_at_once(page, "asdfg")
    idle(page)
    assert [ids[6], ids[7], ids[8], ids[9]] in bodies
    rows = sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ? ORDER BY id", ids[5])
    assert rows == [(ids[5], "UR"), (ids[6], "SSR"), (ids[8], "R"), (ids[9], "N")]
    expect(page.locator(".lr-status")).to_contain_text(f"#{ids[7]} SR")
    page.context.close()


def inside(box, width, height) -> bool:
    return (
        box is not None
        and box["x"] >= 0
        and box["y"] >= 0
        and box["x"] + box["width"] <= width + 0.5
        and (box["y"] + box["height"] <= height + 0.5)
    )


@browser_test
def test_detail_view_fits_a_narrow_screen_with_a_very_long_prompt(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 2, round=26)
    long = "a very long prompt, " * 220  # 4,400 characters
    sql(
        ws,
        "UPDATE images SET prompt = ?, params = json_set(params, '$.strength', json('null')) WHERE id = ?",
        long,
        ids[0],
    )
    page = open_page(browser, url, 26)
    for width, height in ((400, 800), (1200, 860)):
        page.set_viewport_size({"width": width, "height": height})
        page.keyboard.press("Enter")
        expect(page.locator(".lr-meta")).to_contain_text("a very long prompt")
        img = page.locator(".lr-d-img img")
        expect(img).to_have_attribute("src", re.compile("loop/files/"))
        page.wait_for_function("document.querySelector('.lr-d-img img').complete")
        box = img.bounding_box()
        assert inside(box, width, height) and box["height"] > 100, (width, box)
        for button in (".lr-d-next", ".lr-d-prev", ".lr-d-close", ".lr-excellent"):
            assert inside(page.locator(button).bounding_box(), width, height), (width, button)
        expect(page.locator(".lr-meta dt", has_text="strength")).to_have_count(0)  # a null field is left out
        page.keyboard.press("Escape")
    page.context.close()


@browser_test
def test_a_missing_file_shows_a_placeholder(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 2, round=25)
    (ws.root / sql(ws, "SELECT path FROM images WHERE id = ?", ids[1])[0][0]).unlink()
    page = open_page(browser, url, 25)
    tile = page.locator(f'.lr-tile[data-id="{ids[1]}"]')
    expect(tile).to_have_class(re.compile("lr-missing"))
    expect(tile.locator(".lr-missing-label")).to_be_visible()
    expect(page.locator(f'.lr-tile[data-id="{ids[0]}"] .lr-missing-label')).to_be_hidden()
    page.keyboard.press("ArrowRight")  # onto it: the status line says there is nothing to look at
    expect(page.locator(".lr-status")).to_contain_text(f"#{ids[1]}: its file is missing or unreadable")
    page.context.close()


@browser_test
def test_compare_without_pairs_shows_only_the_reason(tmp_path, browser):
    from playwright.sync_api import expect

    ws = Workspace.init(tmp_path / "ws")
    add(ws, 2, round=0)
    _, app = build_app(ws, warm=0)
    server = BackgroundServer(app)
    try:
        page = open_page(browser, server.url, 0)
        page.get_by_role("tab", name="A/B").click()
        expect(page.locator(".ab-msg")).to_be_visible()
        expect(page.locator(".ab-msg")).to_contain_text("no pairs")
        expect(page.locator(".ab-pair")).to_be_hidden()
        expect(page.locator("button[data-w='tie']")).to_be_hidden()
        page.context.close()
    finally:
        server.stop()
        close_app(app)


@browser_test
def test_a_batch_with_an_image_gone_from_the_store_saves_the_others(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 6, round=24)
    page = open_page(browser, url, 24)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    with ws.store() as store:  # gone from the store while the page still shows it
        store.db.execute("DELETE FROM images WHERE id = ?", (ids[2],))
    press_at_once(page, "12345")
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ? ORDER BY id", ids[0]) == [
        (ids[0], "UR"),
        (ids[1], "SSR"),
        (ids[3], "R"),
        (ids[4], "N"),
    ]
    expect(page.locator(".lr-status")).to_contain_text(f"not saved: #{ids[2]}")
    assert errors == []
    page.context.close()


def settled(page):
    """The page's claim on its focus is confirmed (a rater looks at an image before rating it), or it has nothing
    left to rate."""
    page.wait_for_function(
        "() => { const S = LoopRate.state; return S.allDone || S.claimed === S.ids[S.focus]; }", timeout=10_000
    )


def all_rated(ws, ids) -> bool:
    return len(sql(ws, "SELECT image_id FROM current_tiers WHERE image_id >= ?", ids[0])) == len(ids)


def assert_each_rated_once(ws, ids):
    counts = sql(ws, "SELECT image_id, COUNT(*) FROM ratings WHERE image_id >= ? GROUP BY image_id", ids[0])
    assert sorted(i for i, _ in counts) == ids  # every image rated
    assert all(n == 1 for _, n in counts), counts  # and none twice


def alice_and_bob(browser, url, round):
    """alice's page, then bob's, on the same round, each settled on an image of its own."""
    a = open_page(browser, url, round, rater="alice")
    settled(a)
    b = open_page(browser, url, round, rater="bob")
    settled(b)
    return a, b


@browser_test
def test_two_raters_at_a_human_pace_never_rate_the_same_image(site, browser):
    ws, url = site
    ids = add(ws, 12, round=30)
    a, b = alice_and_bob(browser, url, 30)
    assert focus_id(a) == ids[0] and focus_id(b) == ids[1]  # bob's page skips the image alice has open
    # and shows where alice is
    b.wait_for_selector(f".lr-tile.lr-claimed[data-id='{ids[0]}']", timeout=8000)
    for k in range(30):  # alternately, each once its page has settled on an image: as two people would
        page = (a, b)[k % 2]
        settled(page)
        if not page.evaluate("LoopRate.state.allDone"):
            page.keyboard.press("12345"[k % 5])
        idle(page)
        if all_rated(ws, ids):
            break
    assert_each_rated_once(ws, ids)
    raters = dict(sql(ws, "SELECT rater, COUNT(*) FROM ratings WHERE image_id >= ? GROUP BY rater", ids[0]))
    assert raters == {"alice": 6, "bob": 6}
    a.context.close()
    b.context.close()


@browser_test
def test_three_raters_in_a_random_order_rate_every_image_once(site, browser):
    # as above, but three pages, a random one at each turn, sometimes pausing past a poll or not waiting for the
    # server: whatever the interleaving, no image gets a second rater and none is left out
    import random

    ws, url = site
    ids = add(ws, 20, round=37)
    rnd = random.Random(5)
    pages = [open_page(browser, url, 37, rater=name) for name in ("alice", "bob", "carol")]
    errors = []
    for page in pages:
        page.on("pageerror", lambda e: errors.append(str(e)))
    for _ in range(80):
        page = rnd.choice(pages)
        settled(page)
        if rnd.random() < 0.3:
            page.wait_for_timeout(rnd.choice([100, 600, 2100]))
            settled(page)
        if not page.evaluate("LoopRate.state.allDone"):
            page.keyboard.press(rnd.choice("12345"))
        if rnd.random() < 0.5:
            idle(page)
        if all_rated(ws, ids):
            break
    for page in pages:
        idle(page)
    assert_each_rated_once(ws, ids)
    assert errors == []
    for page in pages:
        page.context.close()


@browser_test
def test_a_closed_page_gives_its_image_back(site, browser):
    ws, url = site
    ids = add(ws, 4, round=31)
    a, b = alice_and_bob(browser, url, 31)
    b.wait_for_selector(f".lr-tile.lr-claimed[data-id='{ids[0]}']", timeout=8000)
    a.context.close()
    # the page says so as it closes (else the claim lapses within seconds); bob's next poll shows it free
    b.wait_for_selector(f".lr-tile[data-id='{ids[0]}']:not(.lr-claimed)", timeout=15_000)
    for _ in ids[1:]:
        settled(b)
        b.keyboard.press("4")
    settled(b)
    assert focus_id(b) == ids[0]  # the image alice had open is bob's to rate now
    b.keyboard.press("4")
    idle(b)
    assert sql(ws, "SELECT COUNT(*) FROM current_tiers WHERE image_id >= ?", ids[0]) == [(4,)]
    b.context.close()


@browser_test
def test_a_page_whose_filters_show_nothing_gives_its_image_back(site, browser):
    ws, url = site
    ids = add(ws, 3, round=32)
    a = open_page(browser, url, 32, rater="alice")
    settled(a)
    b = open_page(browser, url, 32, rater="bob")
    b.wait_for_selector(f".lr-tile.lr-claimed[data-id='{ids[0]}']", timeout=8000)
    a.fill(".lr-q", "no prompt says this")
    a.wait_for_function("LoopRate.state.ids.length === 0", timeout=8000)
    b.wait_for_selector(f".lr-tile[data-id='{ids[0]}']:not(.lr-claimed)", timeout=8000)
    a.context.close()
    b.context.close()


@browser_test
def test_a_page_is_never_sent_to_an_image_just_rated_elsewhere(site, browser):
    # alice rates #1 and moves on; bob's page, not yet told (its poll is 2 s away), wraps round to #1 next
    ws, url = site
    ids = add(ws, 3, round=33)
    a, b = alice_and_bob(browser, url, 33)
    a.keyboard.press("3")
    settled(a)
    assert focus_id(a) == ids[2]
    b.keyboard.press("4")  # bob's page goes to #1: the server says alice rated it just now, so on it goes
    settled(b)
    # One key more rates nothing of alice's. (Had bob's page heard of her rating and her claim before his
    # key, its focus stayed on his own #2, where a key too many corrects his own rating: so count raters.)
    b.keyboard.press("5")
    for page in (a, b):
        idle(page)
    raters = sql(
        ws, "SELECT image_id, COUNT(DISTINCT rater) FROM ratings WHERE image_id >= ? GROUP BY image_id", ids[0]
    )
    assert all(n == 1 for _, n in raters), raters
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("SR", "alice")]
    a.context.close()
    b.context.close()


@browser_test
def test_a_key_never_rates_the_image_another_page_holds_unless_picked(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 1, round=34)
    a, b = alice_and_bob(browser, url, 34)  # the one image is alice's: bob's page opens with nothing free
    assert b.evaluate("LoopRate.state.allDone")
    assert focus_id(b) == ids[0]
    b.keyboard.press("2")  # does not rate alice's image
    expect(b.locator(".lr-status")).to_contain_text("open on alice's page")
    idle(b)
    assert sql(ws, "SELECT COUNT(*) FROM ratings WHERE image_id >= ?", ids[0]) == [(0,)]
    # a rater may still pick it deliberately
    b.click(f".lr-tile[data-id='{ids[0]}']")
    b.keyboard.press("4")
    idle(b)
    assert sql(ws, "SELECT rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("bob",)]
    a.context.close()
    b.context.close()


@browser_test
def test_the_focus_stays_on_the_image_a_rater_holds_while_another_rates_nearby(site, browser):
    ws, url = site
    ids = add(ws, 40, round=35)
    a, b = alice_and_bob(browser, url, 35)
    assert focus_id(b) != ids[0]
    b.keyboard.press("4")
    idle(b)
    a.wait_for_timeout(2600)  # a poll brings bob's rating next to alice's image
    assert focus_id(a) == ids[0]  # she is looking at it: it stays hers
    a.context.close()
    b.context.close()


@browser_test
def test_a_picked_image_another_page_held_is_claimed_once_it_is_let_go(site, browser):
    ws, url = site
    ids = add(ws, 4, round=36)
    a, b = alice_and_bob(browser, url, 36)
    b.keyboard.press("Home")  # bob picks alice's #1: his page cannot claim it while she has it open
    b.wait_for_function(f"LoopRate.state.claimRefused === {ids[0]}", timeout=8000)
    a.context.close()  # alice leaves
    b.wait_for_function(f"LoopRate.state.claimed === {ids[0]}", timeout=15_000)  # his page holds it now
    c = open_page(browser, url, 36, rater="carol")
    settled(c)
    assert focus_id(c) not in (ids[0], focus_id(b))
    c.wait_for_selector(f".lr-tile.lr-claimed[data-id='{ids[0]}']", timeout=8000)
    b.context.close()
    c.context.close()


@browser_test
def test_the_focus_frame_sits_on_its_tile_far_down_the_grid_and_stays_in_view_on_resize(site, browser):
    ws, url = site
    add(ws, 120, round=38)
    page = open_page(browser, url, 38, rater="frank")
    page.keyboard.press("End")  # the last tile, rows down: the frame must be drawn where that tile is

    def where():
        """The focused tile's drawn box, its slot (the canvas plus its translate), and the visible grid."""
        return page.evaluate(
            """() => {
              const f = document.querySelector('.lr-tile.lr-focus'), c = document.querySelector('.lr-canvas');
              const [tx, ty] = f.style.translate.split(' ').map(parseFloat), side = f.offsetWidth;
              const b = f.getBoundingClientRect(), cb = c.getBoundingClientRect();
              const v = document.querySelector('.lr-scroll').getBoundingClientRect();
              return {cx: b.x + b.width / 2, cy: b.y + b.height / 2, top: b.top, bottom: b.bottom,
                      sx: cb.x + tx + side / 2, sy: cb.y + ty + side / 2, vtop: v.top, vbottom: v.bottom,
                      cols: LoopRate.state.cols};
            }"""
        )

    w = where()
    # scaled about its own centre: drawn centred on its slot, not pushed away in proportion to its offset
    assert abs(w["cx"] - w["sx"]) < 1.5 and abs(w["cy"] - w["sy"]) < 1.5, w
    assert w["vtop"] - 8 <= w["top"] and w["bottom"] <= w["vbottom"] + 8, w  # and on screen
    # a narrower window re-flows the grid: the focused tile is still in view
    page.keyboard.press("Home")
    for _ in range(6):
        page.keyboard.press("PageDown")
    before = focus_id(page)
    page.set_viewport_size({"width": 520, "height": 860})
    page.wait_for_function("c => LoopRate.state.cols !== c", arg=w["cols"])
    page.wait_for_timeout(100)
    w = where()
    assert focus_id(page) == before
    assert w["vtop"] - 8 <= w["top"] and w["bottom"] <= w["vbottom"] + 8, w
    page.context.close()


@browser_test
def test_enter_after_clicking_a_button_opens_the_detail_view_instead_of_pressing_it_again(site, browser):
    ws, url = site
    ids = add(ws, 3, round=39)
    page = open_page(browser, url, 39, rater="frank")
    page.keyboard.press("Enter")
    page.wait_for_selector(".lr-detail:not([hidden])")
    page.click(".lr-d-tiers button >> nth=1")  # SSR with the mouse, in the detail view
    idle(page)
    page.keyboard.press("Enter")  # Enter is the detail view's key: it does not press the SSR button again
    idle(page)
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    page.wait_for_selector(".lr-detail:not([hidden])")
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ?", ids[0]) == [(ids[0], "SSR")]
    page.context.close()


def stored_queues(page) -> list:
    return page.evaluate(
        "Object.keys(localStorage).filter(k => k.startsWith('loop.queue.')).map(k => JSON.parse(localStorage[k]))"
    )


@browser_test
def test_ratings_not_yet_saved_survive_a_reload_and_are_stored_once(site, browser):
    """The server stores a batch but its answer is lost, then cannot be reached; the rater reloads. The new page
    sends what the old one held, and the keys keep the batch the server had already stored from a second copy."""
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 6, round=41)
    page = open_page(browser, url, 41)
    sent = []

    def answer_lost_then_away(route):
        sent.append([r["image_id"] for r in route.request.post_data_json["ratings"]])
        if len(sent) == 1:
            route.fetch()  # reaches the server, which stores it; the page never hears back
        route.abort()

    page.route("**/loop/api/rate", answer_lost_then_away)
    settled(page)
    page.keyboard.press("1")
    page.wait_for_function("LoopRate.state.failures > 0")
    page.keyboard.press("2")
    page.keyboard.press("3")
    assert sql(ws, "SELECT image_id, tier FROM ratings WHERE image_id >= ?", ids[0]) == [(ids[0], "UR")]
    page.wait_for_function("JSON.parse(localStorage[`loop.queue.${LoopRate.state.tab}`]).items.length === 3")
    page.on("dialog", lambda d: d.accept())  # "leave the page? changes may not be saved"
    page.reload()
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    # the new page shows them at once, pending, and sends them as soon as the server answers again
    expect(page.locator(f'.lr-tile[data-id="{ids[2]}"]')).to_have_attribute("data-tier", "SR")
    page.unroute("**/loop/api/rate")
    idle(page)
    rows = sql(ws, "SELECT image_id, tier, rater FROM ratings WHERE image_id >= ? ORDER BY id", ids[0])
    assert rows == [(ids[0], "UR", "alice"), (ids[1], "SSR", "alice"), (ids[2], "SR", "alice")]
    assert stored_queues(page) == []
    assert focus_id(page) in ids[3:]  # on to an image nobody rated (the old page's claim may still hold ids[3])
    page.context.close()


@browser_test
def test_a_page_adopts_only_gone_pages_unsent_ratings_of_its_own_workspace(site, browser):
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 4, round=42)
    page = open_page(browser, url, 42)
    token = page.evaluate("LoopRate.state.meta.w")
    assert token
    now = page.evaluate("Date.now()")

    def record(w, beat, closed, image_id, tier, key):
        item = {"kind": "rate", "id": image_id, "tier": tier, "rater": "carol", "key": key}
        return {"w": w, "beat": beat, "closed": closed, "items": [item]}

    records = {
        "crashed": record(token, now - 60_000, False, ids[0], "UR", "crashedpage0001"),  # no heartbeat: adopted
        "live": record(token, now + 3_600_000, False, ids[1], "N", "livepage000001"),  # a page still open: not
        "elsewhere": record("another-workspace", now - 60_000, True, ids[2], "N", "otherws0000001"),  # not ours
    }
    put = "rs => Object.entries(rs).forEach(([k, r]) => localStorage['loop.queue.' + k] = JSON.stringify(r))"
    page.evaluate(put, records)
    page.wait_for_function("!localStorage['loop.queue.crashed']", timeout=10_000)  # the next poll adopts it
    expect(page.locator(".lr-status")).to_contain_text("sending 1 rating a page closed before they were saved")
    idle(page)
    rows = sql(ws, "SELECT image_id, tier, rater FROM ratings WHERE image_id >= ?", ids[0])
    assert rows == [(ids[0], "UR", "carol")]
    left = page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('loop.queue.')).sort()")
    assert left == ["loop.queue.elsewhere", "loop.queue.live"]
    page.context.close()
