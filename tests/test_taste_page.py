"""The taste model on the rating page, in a real browser: the orders, the faint predicted tiers and their toggle,
the Progress tab's section, and the line that says why there is no taste order yet.

The workspace's images are fields of one colour between blue and red, rated by colour through the handlers
(loop/rate/taste_demo.py), so the model has something to learn. Every wait is for what must happen, with long
timeouts: the machine is shared and a fit can take seconds under load.
"""

import json
from pathlib import Path

import pytest

from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS
from loop.rate.page import BackgroundServer, build_app, close_app
from loop.rate.taste_demo import coloured_images, rate_by_colour, wait_ready
from loop.workspace import Workspace

pytestmark = pytest.mark.browser
N, RATED_ALICE, RATED_BOB = 60, 34, 6
RATED = RATED_ALICE + RATED_BOB


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def taste_site(tmp_path_factory):
    """60 coloured images in round 1, 40 rated by colour (alice 34, bob 6); the model ready and every unrated
    image predicted."""
    ws = Workspace.init(tmp_path_factory.mktemp("taste") / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        images = coloured_images(ws, store, N, round=1)
        rate_by_colour(ws, store, images[:RATED_ALICE], rater="alice")
        rate_by_colour(ws, store, images[RATED_ALICE:RATED], rater="bob")
    _, app = build_app(ws, warm=0)
    server = BackgroundServer(app)
    service = app.state.handlers.taste
    wait_ready(service, N - RATED, timeout=300)
    yield ws, server.url, service, dict(images)
    server.stop()
    close_app(app)
    assert not service.alive  # stopped with the server


def open_page(browser, url, query, rater="alice", predicted=None):
    ctx = browser.new_context(viewport={"width": 1200, "height": 860})
    script = f"localStorage.setItem('loop.rater', {json.dumps(rater)});"
    if predicted is not None:
        script += f"localStorage.setItem('loop.predicted', {json.dumps(predicted)});"
    ctx.add_init_script(script)
    page = ctx.new_page()
    page.set_default_timeout(120_000)
    page.goto(f"{url}/?{query}")
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    return page


def ids_of(page) -> list[int]:
    return page.evaluate("LoopRate.state.ids")


def expected(service, order: str) -> list[int]:
    """The page's list as the snapshot orders it: predicted unrated images first, highest first, then the rest
    in the default order (unrated by id, then rated by id)."""
    with service.ws.store() as store:
        rows = store.db.execute(
            "SELECT i.id, t.tier FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
            "WHERE i.round = 1 ORDER BY (t.tier IS NOT NULL), i.id"
        ).fetchall()
    if not order:
        return [r[0] for r in rows]
    col = 0 if order == "likely_ur" else 1
    preds = service.snapshot().preds
    first = sorted((r[0] for r in rows if r[1] is None and r[0] in preds), key=lambda i: (-preds[i][col], i))
    return first + [r[0] for r in rows if r[0] not in set(first)]


def test_likely_ur_first_and_least_certain_first_order_the_grid(taste_site, browser):
    from playwright.sync_api import expect

    ws, url, service, warmth = taste_site
    page = open_page(browser, url, "round=1&order=likely_ur")
    root = page.locator(".lr")
    expect(root).to_have_attribute("data-order", "likely_ur")
    expect(page.locator(".lr-order")).to_have_value("likely_ur")
    ids = ids_of(page)
    assert ids == expected(service, "likely_ur")
    unrated = ids[: N - RATED]
    # it learnt the colours: the unrated images that lead are redder than those that close the predicted block (a
    # random order gives about 0 +- 0.18; 40 ratings and a random dot on every field leave the model imperfect)
    top, bottom = [warmth[i] for i in unrated[:5]], [warmth[i] for i in unrated[-5:]]
    assert sum(top) / 5 > sum(bottom) / 5 + 0.25, (top, bottom)
    assert page.evaluate("LoopRate.state.ids[LoopRate.state.focus]") == ids[0]  # the focus starts on the first
    expect(page.locator(".lr-taste")).to_be_hidden()  # nothing to explain

    page.select_option(".lr-order", "uncertain")
    expect(root).to_have_attribute("data-order", "uncertain")
    assert "order=uncertain" in page.url  # the URL keeps it, like the filters
    assert ids_of(page) == expected(service, "uncertain")
    unc = service.snapshot().preds
    shown = [unc[i][1] for i in ids_of(page)[: N - RATED]]
    assert shown == sorted(shown, reverse=True)

    page.select_option(".lr-order", "")
    expect(root).to_have_attribute("data-order", "")
    assert ids_of(page) == expected(service, "")
    assert "order=" not in page.url
    page.context.close()


def test_progress_tab_shows_what_the_taste_model_learnt_from(taste_site, browser):
    from playwright.sync_api import expect

    ws, url, service, _ = taste_site
    m = service.snapshot().model
    page = open_page(browser, url, "round=1")
    page.get_by_role("tab", name="Progress").click()
    panel = page.get_by_role("tabpanel")
    expect(panel).to_contain_text("Taste model")
    expect(panel).to_contain_text(f"Learnt from: {RATED} ratings")
    expect(panel).to_contain_text(f"alice {RATED_ALICE}")
    expect(panel).to_contain_text(f"bob {RATED_BOB}")
    for tier, k in m.tiers.items():
        expect(panel).to_contain_text(f"{tier} {k}")
    expect(panel).to_contain_text(f"{m.agreement:.0%} over {m.pairs} held-out pairs")
    expect(panel).to_contain_text("Fitted:")
    page.context.close()


def test_predicted_tiers_are_faint_guesses_and_never_ratings(taste_site, browser):
    from playwright.sync_api import expect

    ws, url, service, _ = taste_site
    preds = service.snapshot().preds
    page = open_page(browser, url, "round=1&order=likely_ur")
    guesses = page.locator(".lr-tile .lr-pred:not(:empty)")
    expect(page.locator(".lr-showpred")).not_to_be_checked()  # off until the rater turns them on
    assert guesses.count() == 0
    page.check(".lr-showpred")
    expect(guesses.first).to_be_visible()
    first = ids_of(page)[0]
    pred = page.locator(f'.lr-tile[data-id="{first}"] .lr-pred')
    expect(pred).to_have_text(f"{preds[first][2]}?")
    style = pred.evaluate("e => [getComputedStyle(e).fontStyle, getComputedStyle(e).borderTopStyle]")
    assert style == ["italic", "dashed"]
    # never a rating: no badge, no tier, not in the counters, nothing sent
    tile = page.locator(f'.lr-tile[data-id="{first}"]')
    expect(tile).to_have_attribute("data-tier", "")
    expect(tile.locator(".lr-badge")).to_have_text("")
    expect(page.locator(".lr-counters")).to_contain_text(f"{RATED} / {N} rated")
    assert page.evaluate("[...LoopRate.state.tier.values()].filter(Boolean).length") == RATED
    # a rated tile shows its rating, never a guess (the rated images come after the predicted ones)
    rated_tile = page.locator('.lr-tile:not([data-tier=""])').first
    expect(rated_tile.locator(".lr-badge")).not_to_have_text("")
    expect(rated_tile.locator(".lr-pred")).to_have_text("")

    page.reload()  # remembered, like the rater's name
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    expect(page.locator(".lr-showpred")).to_be_checked()
    expect(guesses.first).to_be_visible()
    with service.ws.store() as store:
        before = store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
    # a key rates with its own tier, whatever the guess: N on the focused image (one of the likeliest UR)
    first = page.evaluate("LoopRate.state.ids[LoopRate.state.focus]")
    tile = page.locator(f'.lr-tile[data-id="{first}"]')
    expect(tile.locator(".lr-pred")).to_have_text(f"{preds[first][2]}?")
    page.keyboard.press("5")
    page.wait_for_function("LoopRate.idle()")
    with service.ws.store() as store:
        assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == before + 1
        got = store.db.execute("SELECT tier, rater FROM current_tiers WHERE image_id = ?", (first,)).fetchone()
    assert tuple(got) == ("N", "alice")
    expect(tile.locator(".lr-badge")).to_have_text("N")
    expect(tile.locator(".lr-pred")).to_have_text("")  # rated now: the guess is gone
    expect(page.locator(".lr-counters")).to_contain_text(f"{RATED + 1} / {N} rated")

    page.uncheck(".lr-showpred")
    expect(guesses).to_have_count(0)
    page.reload()
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    expect(page.locator(".lr-showpred")).not_to_be_checked()
    assert guesses.count() == 0
    page.context.close()


def test_too_few_ratings_keep_the_default_order_and_say_why(tmp_path, browser):
    from playwright.sync_api import expect

    ws = Workspace.init(tmp_path / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        images = coloured_images(ws, store, 20, round=1)
        rate_by_colour(ws, store, images[:12])
    _, app = build_app(ws, warm=0)
    server = BackgroundServer(app)
    try:
        service = app.state.handlers.taste
        page = open_page(browser, server.url, "round=1&order=likely_ur", predicted="1")
        line = page.locator(".lr-taste")
        # the first fit may still be under way when the page opens: the line says so, then why there is no order
        expect(line).to_have_text("too few ratings to order by taste yet: 12 rated; it needs 18 more")
        assert service.snapshot().model is not None and not service.snapshot().ready
        page.reload()
        page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
        expect(line).to_have_text("too few ratings to order by taste yet: 12 rated; it needs 18 more")
        expect(page.locator(".lr")).to_have_attribute("data-order", "")
        assert ids_of(page) == expected(service, "")  # the default order: unrated first, then by id
        assert page.locator(".lr-tile .lr-pred:not(:empty)").count() == 0  # no guesses either
        page.select_option(".lr-order", "")
        page.uncheck(".lr-showpred")
        expect(line).to_be_hidden()  # nothing asked of the model: nothing to explain
        page.get_by_role("tab", name="Progress").click()
        expect(page.get_by_role("tabpanel")).to_contain_text("12 rated; it needs 18 more")
        page.context.close()
    finally:
        server.stop()
        close_app(app)


def test_the_page_names_fonts_that_draw_japanese_prompts(taste_site, browser):
    """Defect 8: the page drew a Japanese prompt as boxes. Its font stack names CJK-capable fonts (Noto CJK,
    Hiragino, Yu Gothic, ...) after the UI fonts, for the grid and the detail view alike."""
    ws, url, service, _ = taste_site
    page = open_page(browser, url, "round=1")
    for sel in (".lr", ".lr-meta"):
        family = page.evaluate(f"getComputedStyle(document.querySelector('{sel}')).fontFamily")
        assert "Noto Sans CJK JP" in family and "Hiragino Sans" in family and "Yu Gothic" in family, family
    page.context.close()
