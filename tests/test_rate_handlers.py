"""The rating page's handlers without a browser: listing, filters, rating, undo, golden/, thumbnails, files, auth."""

import os
from pathlib import Path

import pytest
from PIL import Image

from loop.bench.rate import add_images
from loop.cli import entry
from loop.errors import LoopError
from loop.rate.handlers import BadRequest, Forbidden, NotFound, RateHandlers, golden_path, safe_file, thumb_path
from loop.rate.page import BasicAuth, build_app, close_app, parse_auth
from loop.workspace import Workspace


@pytest.fixture
def h(ws):
    store = ws.store()
    store.ensure_base_unit("embedded")
    yield RateHandlers(ws, store)
    store.close()


def _add(h, n, round=0, **kw):
    return add_images(h.ws, h.store, n, round=round, **kw)


def test_list_puts_unrated_first_and_filters(h):
    a = _add(h, 6, round=0)
    b = _add(h, 3, round=1, seed=7)
    h.rate([(a[0], "UR"), (a[2], "N")], "alice")
    out = h.images(round=0)
    assert out["ids"] == [a[1], a[3], a[4], a[5], a[0], a[2]]
    assert out["tiers"][-2:] == ["UR", "N"] and out["raters"][-1] == "alice"
    assert out["unrated"] == 4
    assert h.images(round=1)["ids"] == b
    assert h.images(unit=1)["ids"] == b
    assert len(h.images()["ids"]) == 9
    assert h.images(round=0, tier="UR")["ids"] == [a[0]]
    assert h.images(round=0, unrated=True)["ids"] == [a[1], a[3], a[4], a[5]]
    word = h.store.image(a[3])["prompt"].split()[-1]
    assert a[3] in h.images(round=0, q=word.upper())["ids"]  # case-insensitive
    assert h.images(q="100%")["ids"] == []  # % is a literal, not a wildcard
    with pytest.raises(BadRequest, match="got 'X'"):
        h.images(tier="X")


def test_rate_appends_events_in_order_and_the_newest_wins(h):
    (i,) = _add(h, 1)
    out = h.rate([(i, "R"), (i, "SR")], "alice")
    assert len(out["events"]) == 2 and out["images"][i]["tier"] == "SR"
    h.rate([(i, "N")], "bob")
    assert h.store.tier_of(i) == "N"
    rows = h.db.execute("SELECT tier, rater FROM ratings ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("R", "alice"), ("SR", "alice"), ("N", "bob")]


def test_bad_input_gives_one_line_errors(h):
    (i,) = _add(h, 1)
    with pytest.raises(BadRequest, match="tier must be one of UR, SSR, SR, R, N, got 'SSS'"):
        h.rate([(i, "SSS")], "alice")
    with pytest.raises(BadRequest, match="rater"):
        h.rate([(i, "R")], "  ")
    with pytest.raises(NotFound, match="no image with id 999"):
        h.rate([(999, "R")], "alice")
    with pytest.raises(NotFound):
        h.detail(999)
    assert h.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0  # nothing half-written


def test_a_stale_id_in_a_batch_does_not_cost_the_other_ratings(h):
    a, b = _add(h, 2)
    out = h.rate([(a, "SR"), (999, "UR"), (b, "N")], "alice")
    assert out["missing"] == [999] and set(out["images"]) == {a, b}
    assert h.store.tier_of(a) == "SR" and h.store.tier_of(b) == "N"


def test_ur_is_collected_into_golden_by_hard_link_and_follows_the_tier(h):
    (i,) = _add(h, 1)
    row = h.store.image(i)
    src, gold = h.ws.root / row["path"], golden_path(h.ws, row["sha256"], row["path"])
    assert h.rate([(i, "UR")], "alice")["images"][i]["golden"]
    assert gold.exists() and src.exists()  # the original stays in generations/
    assert os.path.samefile(src, gold)  # a hard link, not a copy
    h.rate([(i, "SR")], "bob")
    assert not gold.exists() and src.exists()  # golden/ mirrors the current UR set
    assert h.undo("bob") == {"image_id": i, "tier": "UR", "rater": "alice", "golden": True}
    assert gold.exists()
    assert h.detail(i)["golden"]
    assert not [p for p in (h.ws.root / "golden").iterdir() if p.name.startswith(".")]  # no temporary left


def test_undo_cancels_only_this_raters_newest_rating(h):
    a, b = _add(h, 2)
    h.rate([(a, "R")], "alice")
    h.rate([(b, "SSR")], "bob")
    assert h.undo("alice")["image_id"] == a
    assert h.store.tier_of(a) is None and h.store.tier_of(b) == "SSR"
    assert h.undo("alice") == {"image_id": None}
    assert h.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 3  # kept: 2 ratings and the undo


def test_changes_bring_other_raters_and_new_images(h):
    a = _add(h, 3)
    first = h.images(round=0)
    h.rate([(a[1], "SSR")], "bob")
    new = _add(h, 2, seed=9)
    ch = h.changes(first["last_event"], first["last_image"], round=0)
    assert ch["changed"] == [[a[1], "SSR", "bob"]]
    assert [r[0] for r in ch["new"]] == new
    assert ch["counters"]["rated"] == 1 and ch["counters"]["total"] == 5
    again = h.changes(ch["last_event"], ch["last_image"], round=0)
    assert again["changed"] == [] and again["new"] == []
    assert h.changes(first["last_event"], first["last_image"], round=1)["changed"] == []  # another round


def test_counters_per_tier_per_rater_and_pace(h):
    a = _add(h, 6)
    h.rate([(a[0], "UR"), (a[1], "N"), (a[2], "N")], "alice")
    h.rate([(a[3], "R")], "bob")
    c = h.counters(round=0)
    assert c["total"] == 6 and c["rated"] == 4
    assert c["tiers"] == {"UR": 1, "SSR": 0, "SR": 0, "R": 1, "N": 2}
    assert c["raters"] == {"alice": 3, "bob": 1}
    assert c["pace"] == pytest.approx(4 * 60 / 10, rel=0.01)  # 4 ratings in (at least) ten seconds
    assert set(c["pace_by_rater"]) == {"alice", "bob"}
    assert h.counters(round=1)["total"] == 0
    h.undo("bob")  # a rating taken back is no work done
    c = h.counters(round=0)
    assert c["pace"] == pytest.approx(3 * 60 / 10, rel=0.01) and set(c["pace_by_rater"]) == {"alice"}


def test_detail_has_metadata_lineage_and_history(h):
    h.store.add_unit(1, parent=0, path="checkpoints/unit_001", base="embedded", method="lora", strategy="golden",
                     manifest={})  # fmt: skip
    (grand,) = _add(h, 1, round=0)
    (parent,) = _add(h, 1, round=0, seed=3, parent_id=grand)
    (child,) = _add(h, 1, round=1, seed=5, parent_id=parent)
    h.rate([(child, "SR")], "alice")
    h.rate([(child, "UR")], "bob")
    h.undo("bob")
    d = h.detail(child)
    row = h.store.image(child)
    assert d["prompt"] == row["prompt"] and d["negative_prompt"] == "blurry"
    assert (d["seed"], d["steps"], d["cfg"], d["sampler"], d["width"], d["height"]) == (5, 20, 4.0, "dpm++", 32, 32)
    assert d["unit"] == 1 and d["round"] == 1
    assert d["parent"]["id"] == parent and [p["id"] for p in d["lineage"]] == [parent, grand]
    assert [u["unit"] for u in d["units"]] == [1, 0]
    assert (d["tier"], d["rater"]) == ("SR", "alice")
    assert [(e["tier"], e["rater"], e["undo"], e["undone"]) for e in d["history"]] == [
        (None, "bob", True, False),
        ("UR", "bob", False, True),
        ("SR", "alice", False, False),
    ]


def test_thumbnails_are_cached_webp_files_keyed_by_sha256(h):
    (i,) = _add(h, 1, size=300)
    sha = h.store.image(i)["sha256"]
    p = h.thumb(i)
    assert p == thumb_path(h.ws, sha) and p.is_relative_to(h.ws.root / "cache" / "thumbs") and sha in p.name
    with Image.open(p) as im:
        assert im.format == "WEBP" and max(im.size) == 256
    mtime = p.stat().st_mtime_ns
    assert h.thumb(i) == p and p.stat().st_mtime_ns == mtime  # made once
    assert h.thumb_bytes(i) == p.read_bytes() == h.cached_thumb(i)
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".")]
    assert h.file(p.relative_to(h.ws.root).as_posix()) == p  # cache/ is served


def test_finish_closes_the_rate_phase_of_the_current_round(h):
    with pytest.raises(BadRequest, match="has no images yet"):  # nothing generated yet: nothing to close
        h.finish()
    assert not h.store.phase_done(0, "rate")
    _add(h, 2)  # images of the round, made by `loop generate` (no generate phase): there is something to rate
    out = h.finish()
    assert out["round"] == 0 and not out["already"] and "0/2 rated" in out["summary"]
    assert h.store.phase_done(0, "rate")
    assert h.finish()["already"]


def test_finish_refuses_a_round_that_is_over_and_counters_name_the_current_one(h):
    # a page open since round 0: unit 1 appears (round 1 starts); its button still said "round 0"
    _add(h, 2, round=0)
    h.store.add_unit(1, parent=0, path="checkpoints/unit_001", base="embedded", method="lora", strategy="converge",
                     manifest={})  # fmt: skip
    _add(h, 3, round=1, seed=5)
    assert h.counters(round=0)["current_round"] == 1  # what the page's button follows
    with pytest.raises(BadRequest, match=r"^nothing closed: round 0 is over \(unit 1 exists\), round 1 is"):
        h.finish(round=0)
    assert not h.store.phase_done(1, "rate")  # round 1, unseen, stays open
    with pytest.raises(BadRequest, match="round must be an integer"):
        h.finish(round="1")
    assert h.finish(round=1)["round"] == 1 and h.store.phase_done(1, "rate")


@pytest.fixture
def files(ws):
    """A served image, plus things that must never be served: the database, a sibling folder, links out."""
    img = ws.root / "generations" / "unit_000" / "a.png"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"png")
    (ws.root / "generations2").mkdir()
    (ws.root / "generations2" / "x.png").write_bytes(b"secret")
    (ws.root / "golden" / "db.png").symlink_to(ws.db_path)
    (ws.root / "cache" / "out").symlink_to(ws.root / "configs", target_is_directory=True)
    (ws.root / "generations" / "unit_000" / ".a.png.tmp-1").write_bytes(b"half")
    return ws


FORBIDDEN = [
    "../loop.db",
    "loop.db",
    "configs/loop.yaml",
    "/etc/passwd",
    "//etc/passwd",
    "generations/../loop.db",
    "generations/unit_000/../../loop.db",
    "generations2/x.png",
    "generations",
    "golden/db.png",  # a symlink to loop.db
    "cache/out/loop.yaml",  # a symlinked folder that points out of cache/
    "generations/unit_000/.a.png.tmp-1",  # a half-written temporary
    "generations\\..\\loop.db",
    "checkpoints/unit_001/manifest.json",
]


@pytest.mark.parametrize("rel", FORBIDDEN)
def test_safe_file_refuses_everything_outside_the_served_folders(files, rel):
    with pytest.raises((Forbidden, NotFound)):
        safe_file(files, rel)


def test_safe_file_serves_inside_and_404s_missing(files):
    assert safe_file(files, "generations/unit_000/a.png").read_bytes() == b"png"
    with pytest.raises(NotFound):
        safe_file(files, "generations/unit_000/nope.png")
    with pytest.raises(NotFound):
        safe_file(files, "generations/unit_000")  # a folder is not a file


def test_parse_auth(tmp_path):
    assert parse_auth("ann:pw:with:colons") == [("ann", "pw:with:colons")]
    f = tmp_path / "users"
    f.write_text("# raters\nann:one\n\nbob:two\n")
    assert parse_auth(None, f) == [("ann", "one"), ("bob", "two")]
    for bad in ("nocolon", ":pw", "ann:"):
        with pytest.raises(LoopError, match="user:password"):
            parse_auth(bad)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(LoopError, match="no user:password line"):
        parse_auth(None, tmp_path / "empty")
    with pytest.raises(LoopError, match="cannot read"):
        parse_auth(None, tmp_path / "missing")


def test_basic_auth_checks_every_user():
    import base64

    mw = BasicAuth(None, [("ann", "one"), ("bob", "two")])
    header = lambda u, p: b"Basic " + base64.b64encode(f"{u}:{p}".encode())  # noqa: E731
    assert mw.allowed(header("ann", "one")) and mw.allowed(header("bob", "two"))
    assert not mw.allowed(header("ann", "two")) and not mw.allowed(header("eve", ""))
    assert not mw.allowed(None) and not mw.allowed(b"Basic !!!") and not mw.allowed(b"Bearer x")


@pytest.mark.parametrize(
    "args",
    [["--listen"], ["--host", "0.0.0.0"], ["--listen", "--host", "192.168.1.5"]],
)
def test_listen_without_auth_is_refused(ws, capsys, args):
    assert entry(["rate", *args, "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--auth user:password or --auth-file FILE" in err and err.count("\n") == 1


def test_bad_auth_is_refused_before_serving(ws, capsys):
    assert entry(["rate", "--listen", "--auth", "nopassword", "-w", str(ws.root)]) == 2
    assert "user:password" in capsys.readouterr().err


def test_every_route_needs_auth_when_it_is_set(ws):
    from starlette.testclient import TestClient

    with ws.store() as store:
        (i,) = add_images(ws, store, 1)
        rel = store.image(i)["path"]
    _, app = build_app(ws, auth=[("ann", "secret")])
    try:
        client = TestClient(app)
        routes = [
            "/",
            "/config",
            "/gradio_api/info",
            "/loop/api/meta",
            "/loop/api/images?round=0",
            f"/loop/api/image/{i}",
            f"/loop/thumb/{i}",
            f"/loop/files/{rel}",
            "/theme.css",
            "/assets/index.js",
        ]
        for url in routes:
            r = client.get(url)
            assert r.status_code == 401, url
            assert r.headers["www-authenticate"].startswith("Basic")
            assert client.get(url, auth=("ann", "wrong")).status_code == 401, url
        for url in ("/loop/api/rate", "/loop/api/undo", "/loop/api/finish"):
            assert client.post(url, json={"rater": "x"}).status_code == 401, url
        ok = ("ann", "secret")
        assert client.get("/loop/api/meta", auth=ok).json()["current_round"] == 0
        assert client.get(f"/loop/files/{rel}", auth=ok).status_code == 200
        assert client.get(f"/loop/thumb/{i}", auth=ok).headers["content-type"] == "image/webp"
        assert client.get("/", auth=ok).status_code == 200
        r = client.post("/loop/api/rate", json={"rater": "ann", "ratings": [{"image_id": i, "tier": "UR"}]}, auth=ok)
        assert r.json()["images"][str(i)]["tier"] == "UR"
    finally:
        close_app(app)


def test_json_routes_answer_bad_input_with_400_and_one_line(ws):
    from starlette.testclient import TestClient

    with ws.store() as store:
        (i,) = add_images(ws, store, 1)
    _, app = build_app(ws)
    try:
        client = TestClient(app, base_url="http://127.0.0.1:7860")  # the page answers only to this machine
        r = client.post("/loop/api/rate", json={"rater": "ann", "ratings": [{"image_id": i, "tier": "X"}]})
        assert r.status_code == 400 and r.json()["error"] == "tier must be one of UR, SSR, SR, R, N, got 'X'"
        # a form post from another site is not JSON: refused, nothing written
        r = client.post("/loop/api/rate", data={"rater": "ann"}, headers={"content-type": "text/plain"})
        assert r.status_code == 400 and "application/json" in r.json()["error"]
        assert client.get("/loop/api/images?round=x").json()["error"] == "round must be an integer, got 'x'"
        assert client.get("/loop/api/image/999").status_code == 404
        assert client.get("/loop/static/../handlers.py").status_code == 404
        assert client.get("/loop/static/page.py").status_code == 404
    finally:
        close_app(app)
    with ws.store() as store:
        assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0


def test_package_ships_the_page_assets():
    import loop.rate.page as page

    assert (Path(page.__file__).parent / "static" / "rate.js").is_file()
    assert (Path(page.__file__).parent / "static" / "rate.css").is_file()


# -- claims: where each open page has its focus ----------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_claimed_image_is_refused_to_every_other_page_until_released_or_lapsed():
    from loop.rate.handlers import Claims

    clock = _Clock()
    c = Claims(ttl=10.0, clock=clock)
    assert c.claim("tab-a", 7, "alice") is None
    assert c.claim("tab-b", 7, "bob") == "alice"  # refused, and bob's page holds nothing
    assert c.held("tab-b") is None and c.others("tab-b") == {7: "alice"}
    assert c.claim("tab-a2", 7, "alice") == "alice"  # alice's second page is another page
    assert c.claim("tab-b", 8, "bob") is None
    assert c.others("tab-a") == {8: "bob"} and c.others() == {7: "alice", 8: "bob"}
    assert c.claim("tab-a", 9, "alice") is None  # moving the focus on...
    assert c.claim("tab-b", 7, "bob") == "alice"  # ...keeps 7 hers a few seconds (her rating may be on its way)
    assert c.others("tab-b") == {7: "alice", 9: "alice"}
    clock.now += 3.5
    assert c.claim("tab-b", 7, "bob") is None and c.held("tab-b") == 7
    clock.now += 6
    c.renew("tab-b")  # a poll keeps bob's claim; alice's page stopped polling
    clock.now += 6
    assert c.others() == {7: "bob"}  # alice's lapsed after 10 s
    assert c.claim("tab-a", None) is None and c.claim("tab-b", None) is None  # release
    assert c.others() == {7: "bob"}  # (for the grace)
    clock.now += 3.5
    assert c.others() == {}
    for bad in ("", None, 5, "x" * 65, "tab\n"):
        with pytest.raises(BadRequest, match="tab must be"):
            c.claim(bad, 1, "alice")


def test_the_list_and_the_poll_name_the_other_pages_claims(h):
    ids = _add(h, 3)
    assert h.claim("tab-a", ids[0], "alice") == {"ok": True, "by": None, "claims": []}
    out = h.claim("tab-b", ids[0], "bob")
    assert out == {"ok": False, "by": "alice", "claims": [[ids[0], "alice"]]}
    h.claim("tab-b", ids[1], "bob")
    assert h.images(round=0, tab="tab-a")["claims"] == [[ids[1], "bob"]]
    changes = h.changes(0, 0, round=0, tab="tab-b")
    assert changes["claims"] == [[ids[0], "alice"]] and changes["mine"] == ids[1]
    assert h.changes(0, 0, round=0)["mine"] is None
    with pytest.raises(BadRequest, match="image_id must be"):
        h.claim("tab-a", "3", "alice")
    assert h.claim("tab-c", ids[2], 42)["ok"]  # a name that is not a string is shown as another rater
    assert h.images(tab="tab-a")["claims"][-1] == [ids[2], "another rater"]
    # a rated image is nobody's to be sent to: refused, with its tier, whatever the claims
    h.rate([(ids[2], "SR")], "carol")
    out = h.claim("tab-d", ids[2], "dave")
    assert out["ok"] is False and out["rated"] == ["SR", "carol"] and h.claims.held("tab-d") is None


LOCAL = "http://127.0.0.1"  # without a login the page answers loopback Hosts only


def test_thumbnail_urls_name_the_workspace_so_another_ones_cached_pictures_never_show(tmp_path):
    from starlette.testclient import TestClient

    apps, tokens = {}, {}
    for name in ("a", "b"):  # two workspaces whose first image has the same id, served one after the other
        ws = Workspace.init(tmp_path / name)
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            (i,) = add_images(ws, store, 1, seed=ord(name))
        _, apps[name] = build_app(ws, warm=0)
        tokens[name] = TestClient(apps[name], base_url=LOCAL).get("/loop/api/images?round=0").json()["w"]
    try:
        assert tokens["a"] != tokens["b"] and len(tokens["a"]) == 16
        a, b = TestClient(apps["a"], base_url=LOCAL), TestClient(apps["b"], base_url=LOCAL)
        got = a.get(f"/loop/thumb/{i}?w={tokens['a']}")
        assert got.status_code == 200 and "immutable" in got.headers["cache-control"]
        stale = b.get(f"/loop/thumb/{i}?w={tokens['a']}")  # a page of workspace a, now talking to b's server
        assert stale.status_code == 404 and "reload it" in stale.json()["error"]
        bare = b.get(f"/loop/thumb/{i}")  # no token: served, but never cached for good
        assert bare.status_code == 200 and "immutable" not in bare.headers["cache-control"]
    finally:
        for app in apps.values():
            close_app(app)
    _, again = build_app(Workspace(tmp_path / "a"), warm=0)  # a restart keeps the token: the cache stays good
    try:
        assert TestClient(again, base_url=LOCAL).get("/loop/api/images").json()["w"] == tokens["a"]
    finally:
        close_app(again)


def test_a_pixel_bomb_in_generations_is_a_404_thumbnail_not_a_page_that_cannot_start(h):
    (i,) = _add(h, 1)
    path = h.ws.root / h.store.image(i)["path"]
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100  # the 32x32 image is now a "bomb" to PIL (over twice the limit), as real ones are
    try:
        assert path.exists()
        assert h.warm_thumbs() == 0  # skipped, not raised
        with pytest.raises(NotFound, match="DecompressionBombError"):
            h.thumb(i)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_a_batch_resent_with_its_keys_is_stored_once_and_a_bad_key_is_refused(h):
    a, b = _add(h, 2)
    first = h.rate([(a, "UR", "key0001a"), (b, "N", "key0001b")], "alice")
    again = h.rate([(a, "UR", "key0001a"), (b, "N", "key0001b")], "alice")
    assert again["events"] == first["events"] and again["images"][a]["tier"] == "UR"
    assert h.undo("alice", key="undo0001") == h.undo("alice", key="undo0001")
    assert h.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 3
    for bad in ("short", "x" * 65, "has space", 12345678, "ключключ"):
        with pytest.raises(BadRequest, match="key must be"):
            h.rate([(a, "R", bad)], "alice")
    with pytest.raises(BadRequest, match="key must be"):
        h.undo("alice", key="../../x")
    assert h.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 3  # nothing written by a refused call
