"""The rating page's defects found when it was tried as a new user would, one browser test each.

The server, browser and helpers are tests/test_page.py's (this module gets its own server). The machine may be
slow and shared: every wait is for what must happen, with long timeouts, and nothing is asserted on pace.
"""

import json
import re

import test_page
from test_page import add, browser_test, focus_id, rate_as, sql

site, browser = test_page.site, test_page.browser  # its fixtures: a server and a browser for this module

WAIT_MS = 60_000


def open_page(browser, url, query, rater="alice"):
    """A page on `/?round=...` (`query` is the rest of the URL's query), with long timeouts."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    ctx = browser.new_context(viewport={"width": 1200, "height": 860})
    if rater:
        ctx.add_init_script(f"localStorage.setItem('loop.rater', {json.dumps(rater)})")
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{url}/?round={query}")
    page.wait_for_selector(".lr[data-ready='1'] .lr-tile")
    return page


def idle(page):
    page.wait_for_function("LoopRate.idle()")


def settled(page):
    """The page's claim on its focus is confirmed, or it has nothing left to rate."""
    page.wait_for_function("() => { const S = LoopRate.state; return S.allDone || S.claimed === S.ids[S.focus]; }")


def on(page, image_id):
    page.wait_for_function("id => LoopRate.state.ids[LoopRate.state.focus] === id", arg=image_id)


@browser_test
def test_undo_under_a_tier_filter_shows_the_image_it_undid(site, browser):
    # defect 1: with Tier=UR on, Z undid a rating the list did not show, and the focus stayed elsewhere
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 3, round=60)
    page = open_page(browser, url, 60)
    page.keyboard.press("1")
    page.keyboard.press("5")
    idle(page)
    page.select_option(".lr-tier", "UR")  # the list shows ids[0] only
    page.wait_for_function("LoopRate.state.ids.length === 1")
    page.keyboard.press("z")  # undoes the newest rating: ids[1]'s N, which is not in the list
    idle(page)
    assert sql(ws, "SELECT image_id, tier FROM current_tiers WHERE image_id >= ?", ids[0]) == [(ids[0], "UR")]
    # the image undone is brought on screen with the focus on it, and the status line names it
    on(page, ids[1])
    expect(page.locator(f'.lr-tile.lr-focus[data-id="{ids[1]}"]')).to_be_visible()
    expect(page.locator(f'.lr-tile[data-id="{ids[1]}"]')).to_have_attribute("data-tier", "")
    expect(page.locator(".lr-status")).to_contain_text(f"#{ids[1]}")
    page.keyboard.press("4")  # and a key re-rates it
    idle(page)
    assert sql(ws, "SELECT tier FROM current_tiers WHERE image_id = ?", ids[1]) == [("R",)]
    page.context.close()


@browser_test
def test_a_key_under_a_tier_filter_rates_the_focused_image(site, browser):
    # defect 2: with Tier=UR on, the frame sat on an image and a key said "click it or move to it"
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 3, round=61)
    rate_as(ws, "frank", [(ids[0], "UR"), (ids[1], "UR")])
    rate_as(ws, "dave", [(ids[2], "UR")])
    page = open_page(browser, url, "61&tier=UR", rater="frank")
    assert focus_id(page) == ids[0]
    page.keyboard.press("2")  # the framed image, at once
    on(page, ids[1])  # and on through the list shown
    page.keyboard.press("3")
    on(page, ids[2])
    page.keyboard.press("4")  # dave's: a rater who filtered for UR chose to look at them again
    expect(page.locator(".lr-status")).to_contain_text("overrides UR by dave")
    idle(page)
    assert sql(ws, "SELECT image_id, tier, rater FROM current_tiers WHERE image_id >= ? ORDER BY 1", ids[0]) == [
        (ids[0], "SSR", "frank"),
        (ids[1], "SR", "frank"),
        (ids[2], "R", "frank"),
    ]
    page.context.close()


@browser_test
def test_the_unrated_only_box_shows_when_it_is_on(site, browser):
    # defect 3: the box drew the same empty square on and off
    from playwright.sync_api import expect

    ws, url = site
    add(ws, 2, round=62)
    page = open_page(browser, url, 62)
    box = page.locator(".lr-unrated")

    def shot():
        page.mouse.move(0, 0)  # no hover
        return box.screenshot(animations="disabled")

    off = shot()
    box.click()
    expect(box).to_be_checked()
    page.wait_for_function("LoopRate.state.ids.length === 2")
    assert shot() != off
    page.context.close()


@browser_test
def test_the_detail_views_history_follows_ratings_made_in_it(site, browser):
    # defect 4: after "Excellent!" the History still said "no ratings yet" until the view was reopened
    from playwright.sync_api import expect

    ws, url = site
    add(ws, 2, round=63)
    page = open_page(browser, url, 63)
    page.keyboard.press("Enter")
    history = page.locator(".lr-d-hist")
    expect(history).to_contain_text("no ratings yet")
    page.click(".lr-excellent")
    idle(page)
    expect(history).to_contain_text("UR by alice")
    expect(history).not_to_contain_text("no ratings yet")
    page.keyboard.press("z")
    idle(page)
    expect(history).to_contain_text("undo by alice")
    page.context.close()


@browser_test
def test_after_an_undo_the_image_stays_with_the_page_that_undid_it(site, browser):
    # defect 5: one page's undo made an image unrated, and the other page's focus moved onto it at its next poll
    ws, url = site
    ids = add(ws, 3, round=64)
    a = open_page(browser, url, 64, rater="alice")
    settled(a)
    b = open_page(browser, url, 64, rater="bob")
    settled(b)
    assert (focus_id(a), focus_id(b)) == (ids[0], ids[1])
    a.keyboard.press("1")  # alice rates ids[0] and holds ids[2]
    settled(a)
    b.keyboard.press("1")  # bob rates ids[1]: nothing is free for him now
    idle(a)
    idle(b)
    b.wait_for_function("LoopRate.state.allDone")
    # an undo comes seconds later (past the grace a page keeps on the image it moved away from)
    a.wait_for_timeout(4000)
    a.keyboard.press("z")
    idle(a)
    assert focus_id(a) == ids[0]
    a.wait_for_function("id => LoopRate.state.claimed === id", arg=ids[0])  # alice's page holds it again
    # bob's page learns that ids[0] is unrated again and that alice's page has it, and leaves it to her
    b.wait_for_function(
        "id => LoopRate.state.tier.get(id) === '' && LoopRate.state.claims.get(id) === 'alice'", arg=ids[0]
    )
    b.wait_for_timeout(500)  # (steering follows the poll in the same task; this only gives a wrong claim time)
    assert focus_id(b) != ids[0]
    a.keyboard.press("2")
    b.keyboard.press("3")
    idle(a)
    idle(b)
    raters = sql(ws, "SELECT image_id, COUNT(DISTINCT rater) FROM ratings WHERE image_id >= ? GROUP BY 1", ids[0])
    assert all(n == 1 for _, n in raters), raters
    assert sql(ws, "SELECT tier, rater FROM current_tiers WHERE image_id = ?", ids[0]) == [("SSR", "alice")]
    a.context.close()
    b.context.close()


@browser_test
def test_being_caught_up_reads_as_the_normal_state(site, browser):
    # defect 6: keys pressed while everything was rated got a red, alarm-style line
    from playwright.sync_api import expect

    ws, url = site
    ids = add(ws, 2, round=65)
    page = open_page(browser, url, 65)
    status = page.locator(".lr-status")
    page.keyboard.press("1")
    page.keyboard.press("2")
    page.keyboard.press("3")  # one more than there are images: rates nothing
    expect(status).to_contain_text("all rated; new images appear as they are made")
    expect(status).not_to_have_class(re.compile("lr-bad"))
    idle(page)
    assert sql(ws, "SELECT COUNT(*) FROM ratings WHERE image_id >= ?", ids[0]) == [(2,)]
    page.context.close()
    # two raters, the one image left open on the other's page: calm too
    (i,) = add(ws, 1, round=66)
    a = open_page(browser, url, 66, rater="alice")
    settled(a)
    b = open_page(browser, url, 66, rater="bob")
    b.wait_for_function("LoopRate.state.allDone")
    b.keyboard.press("2")
    status = b.locator(".lr-status")
    expect(status).to_contain_text("open on alice's page")
    expect(status).not_to_have_class(re.compile("lr-bad"))
    idle(b)
    assert sql(ws, "SELECT COUNT(*) FROM ratings WHERE image_id = ?", i) == [(0,)]
    a.context.close()
    b.context.close()


@browser_test
def test_the_all_rated_message_goes_when_new_images_come(site, browser):
    # defect 7: "everything shown is rated" stayed after new images arrived and took the focus
    from playwright.sync_api import expect

    ws, url = site
    add(ws, 2, round=67)
    page = open_page(browser, url, 67)
    status = page.locator(".lr-status")
    for k in "123":  # one key too many: the page says everything is rated
        page.keyboard.press(k)
    expect(status).to_have_text(re.compile("all rated|everything shown is rated"))
    new = add(ws, 2, round=67, seed=3)
    on(page, new[0])
    expect(status).not_to_have_text(re.compile("all rated|everything shown is rated"))
    expect(status).to_contain_text(f"#{new[0]}")
    page.context.close()


@browser_test
def test_a_row_below_the_focus_stays_in_view(site, browser):
    # defect 9: the focus sat on the last visible row, so the images after it were hidden
    ws, url = site
    add(ws, 120, round=68)
    page = open_page(browser, url, 68)
    below_in_view = """() => {
      const S = LoopRate.state, below = S.focus + S.cols;
      if (below >= S.ids.length) return true;  // the last row: nothing below
      const t = [...document.querySelectorAll('.lr-tile')].find((x) => x._id === S.ids[below]);
      const v = document.querySelector('.lr-scroll').getBoundingClientRect();
      const b = t && t.getBoundingClientRect();
      return !!t && b.top >= v.top - 1 && b.bottom <= v.bottom + 1;
    }"""
    rows = page.evaluate("Math.ceil(LoopRate.state.ids.length / LoopRate.state.cols)")
    for _ in range(rows + 1):  # down the grid with the arrows, to the last row
        page.keyboard.press("ArrowDown")
        page.wait_for_function(below_in_view, timeout=10_000)
    page.keyboard.press("Home")
    cols = page.evaluate("LoopRate.state.cols")
    for k in range(3 * cols):  # and by rating: the focus moves on row by row
        page.keyboard.press("12345"[k % 5])
        page.wait_for_function(below_in_view, timeout=10_000)
    page.context.close()


def test_an_undo_moves_the_claim_of_the_page_that_undid_to_its_image(ws):
    # defect 5, on the server: the undo and the claim are one step, so no poll sees the image unrated and free
    from loop.rate.handlers import RateHandlers

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        h = RateHandlers(ws, store)
        a, b, c = add(ws, 3, round=0)
        h.rate([(a, "UR")], "alice")
        h.claims.grace = 0  # long after alice's page moved on from `a`
        assert h.claim("tab-a", b, "alice")["ok"]
        out = h.undo("alice", tab="tab-a")
        assert out["image_id"] == a and out["tier"] == "" and out["claimed"] is True
        assert h.claims.held("tab-a") == a
        assert h.changes(0, 0, tab="tab-b")["claims"] == [[a, "alice"]]
        assert h.claim("tab-b", a, "bob") == {"ok": False, "by": "alice", "claims": [[a, "alice"]]}
        # an undo that gives the image back another rating (bob's, under alice's) leaves the claims alone
        h.rate([(c, "N")], "bob")
        h.rate([(c, "SR")], "alice")
        assert h.undo("alice", tab="tab-a") == {
            "image_id": c,
            "tier": "N",
            "rater": "bob",
            "golden": False,
            "claimed": False,
        }
        assert h.claims.held("tab-a") == a
        assert h.undo("bob")["image_id"] == c  # and without a tab, as before: no claim moves
        assert h.claims.held("tab-a") == a
