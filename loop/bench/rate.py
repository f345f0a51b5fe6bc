"""`python -m loop.bench rate`: the rating page in headless Chromium, against a plain gr.Gallery page.

A workspace with 10,000 tiny images in one round is served by `loop rate`'s app and driven by Playwright
(Debian's /usr/bin/chromium). Measured:

- first_grid_s: navigation until the first screen of tiles shows its thumbnails (fresh browser profile);
- visible_p95_ms: key event until the frame in which the tile shows its tier (timed inside the page);
- durable_p95_ms: key event until the server's answer, which it sends after the SQLite commit; afterwards
  loop.db must hold exactly one new row per keypress, with the pressed tier;
- the baseline: a minimal Blocks page, a gr.Gallery of the same round and a "UR" button. One rating there is
  a click on a thumbnail (select event) and a click on the button, which writes the rating and answers in a
  textbox, timed inside the page from the first click to the frame showing the answer. `ratio` is its mean
  time per rating over ours (key event until durable).

It also saves docs/img/rate-grid.png and docs/img/rate-detail.png from a small, partly rated workspace.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from loop.images import png_bytes
from loop.store import Store
from loop.workspace import Workspace, sha256_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEYS = "12345"


def add_images(
    ws: Workspace, store: Store, n: int, round: int = 0, size: int = 32, seed: int = 0, **cols
) -> list[int]:
    """n small PNGs of drawn shapes (with loop metadata) in generations/unit_<round>/ and their rows.

    Cheap stand-ins for generated images (about 1 ms each), for tests and benchmarks of the page.
    """
    from loop.tiny.shapes import draw, random_scene

    rng = random.Random(seed * 1_000_003 + round)
    ids = []
    unit = cols.pop("unit", round)
    with store.tx():
        for k in range(n):
            scene = random_scene(rng)
            meta = dict(
                prompt=scene.full_caption(),
                negative_prompt="blurry",
                seed=seed + k,
                steps=20,
                cfg=4.0,
                sampler="dpm++",
                width=size,
                height=size,
                model="embedded",
                unit=unit,
                round=round,
                parent=None,
                strategy="golden",
                exploration=False,
            )
            data = png_bytes(draw(scene, size), meta)
            sha = sha256_bytes(data)
            path = ws.generations(unit if unit is not None else 0) / f"{sha[:16]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            keys = ("negative_prompt", "seed", "steps", "cfg", "sampler", "width", "height")
            row = dict(sha256=sha, path=ws.rel(path), prompt=meta["prompt"], params=meta, unit=unit, round=round)
            ids.append(store.add_image(**row, **{k: meta[k] for k in keys}, **cols))
    return ids


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _grid_ready_js(min_tiles: int) -> str:
    return f"""() => {{
        const imgs = [...document.querySelectorAll('.lr[data-ready="1"] .lr-tile img')];
        const box = document.querySelector('.lr-scroll');
        if (!box || imgs.length < {min_tiles}) return false;
        const b = box.getBoundingClientRect();
        const shown = imgs.filter(i => {{
            const r = i.getBoundingClientRect();
            return r.top < b.bottom && r.bottom > b.top;
        }});
        return shown.length >= {min_tiles} && shown.every(i => i.complete && i.naturalWidth > 0);
    }}"""


def _last_event(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(id), 0) FROM ratings").fetchone()[0]


def measure_ours(browser, url: str, db_path: Path, ratings: int, rng: random.Random) -> dict:
    """First grid (fresh profile, then a reload), then `ratings` keypresses, one after another.

    Each rating is timed inside the page, from the key event's timestamp to the frame that shows the tier
    (visible) and to the server's answer, which it sends after the commit (durable). Afterwards loop.db must
    hold exactly one new row per keypress, with the pressed tier.
    """
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script("localStorage.setItem('loop.rater', 'bench')")
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url + "/")
    page.wait_for_function(_grid_ready_js(20), polling="raf", timeout=120_000)
    first = time.perf_counter() - t0
    marks = page.evaluate(
        "() => Object.fromEntries(['loop-rate-mount', 'loop-rate-grid']"
        ".map(n => [n, performance.getEntriesByName(n)[0]?.startTime]))"
    )
    t0 = time.perf_counter()
    page.reload()
    page.wait_for_function(_grid_ready_js(20), polling="raf", timeout=120_000)
    warm = time.perf_counter() - t0

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    before = _last_event(db)
    pressed = []
    for k in range(ratings):
        key = rng.choice(KEYS)
        pressed.append(("UR", "SSR", "SR", "R", "N")[KEYS.index(key)])
        page.keyboard.press(key)
        page.wait_for_function(
            f"() => {{ const t = LoopRate.timings[{k}]; return t && t.painted !== null && t.durable !== null; }}",
            polling="raf",
            timeout=60_000,
        )
    times = page.evaluate("LoopRate.timings.map(t => [t.painted - t.input, t.durable - t.input])")
    rows = db.execute("SELECT tier, rater FROM ratings WHERE id > ? ORDER BY id", (before,)).fetchall()
    db.close()
    if rows != [(t, "bench") for t in pressed]:
        raise RuntimeError(f"loop.db holds {len(rows)} new ratings for {ratings} keypresses, or other tiers")
    ctx.close()
    return {
        "first_grid_s": first,
        "first_grid_warm_s": warm,
        "shell_s": (marks["loop-rate-mount"] or 0) / 1000,
        "visible": [v / 1000 for v, _ in times],
        "durable": [d / 1000 for _, d in times],
    }


def baseline_app(ws: Workspace, round: int):
    """The plain way: a gr.Gallery of the round, a button that rates the selected image UR, a textbox."""
    import gradio as gr

    store = ws.store()
    rows = store.images(round=round)
    items = [(str(ws.root / r["path"]), f"#{r['id']}") for r in rows]
    ids = [r["id"] for r in rows]

    def pick(evt):
        return evt.index

    pick.__annotations__["evt"] = gr.SelectData  # a real class, not this module's postponed string annotation

    def rate_ur(index):
        if index is None:
            return "select an image first"
        store.rate(ids[index], "UR", "baseline")
        return f"rated #{ids[index]} UR"

    with gr.Blocks(analytics_enabled=False) as blocks:
        gallery = gr.Gallery(value=items, columns=8, height=700, allow_preview=False, label="round")
        selected = gr.State(None)
        button = gr.Button("UR")
        out = gr.Textbox(label="status", elem_id="rating-status")
        gallery.select(pick, None, selected)
        button.click(rate_ur, selected, out)
    from fastapi import FastAPI

    app = FastAPI()
    gr.mount_gradio_app(app, blocks, path="/", allowed_paths=[str(ws.root / "generations")], ssr_mode=False)
    return app, store, ids


def _serve_child(kind: str, root: str, port: int) -> None:
    """In a child process, like `loop rate`: serve our page ("ours") or the baseline until terminated."""
    import uvicorn

    ws = Workspace(Path(root))
    if kind == "ours":
        from loop.rate.page import build_app

        _, app = build_app(ws)
    else:
        app, _, _ = baseline_app(ws, round=0)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class ChildServer:
    """A page served from its own process, as `loop rate` is: the browser driver here must not share a
    Python interpreter (and its lock) with the server it measures."""

    def __init__(self, kind: str, root: Path, timeout: float = 300.0):
        import multiprocessing
        import socket
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve_child, args=(kind, str(root), port), daemon=True
        )
        self.proc.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if not self.proc.is_alive() or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the {kind} page did not start on {self.url}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(timeout=30)


BASELINE_TIMER = """
window.__ratings = [];
document.addEventListener("pointerdown", (e) => {
  if (e.target.closest("button.thumbnail-item")) window.__ratings.push({ input: e.timeStamp, done: null });
}, true);
let last = "";
const watch = () => {
  const box = document.querySelector("#rating-status textarea, #rating-status input");
  if (box && box.value !== last) {
    last = box.value;
    const r = window.__ratings[window.__ratings.length - 1];
    if (r && r.done === null && last.startsWith("rated")) setTimeout(() => { r.done = performance.now(); });
  }
  requestAnimationFrame(watch);
};
requestAnimationFrame(watch);
"""


def measure_baseline(browser, url: str, ids: list[int], ratings: int) -> dict:
    """Per rating: click a thumbnail, click "UR"; timed in the page from the first click's pointer event to the
    frame where the answer shows in the textbox (both round trips: the select event and the button's)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.add_init_script(BASELINE_TIMER)
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url + "/", timeout=600_000)
    page.wait_for_function(
        "() => { const im = [...document.querySelectorAll('button.thumbnail-item img')];"
        " return im.length >= 20 && im.slice(0, 20).every(i => i.complete && i.naturalWidth > 0); }",
        polling="raf",
        timeout=600_000,
    )
    first = time.perf_counter() - t0
    thumbs = page.locator("button.thumbnail-item")
    button = page.get_by_role("button", name="UR", exact=True)
    for k in range(ratings):
        thumbs.nth(k).click()
        button.click()
        page.wait_for_function(
            f"() => window.__ratings[{k}]?.done != null && document.querySelector("
            f"'#rating-status textarea, #rating-status input').value === 'rated #{ids[k]} UR'",
            polling="raf",
            timeout=120_000,
        )
    per = page.evaluate("window.__ratings.map(r => r.done - r.input)")
    ctx.close()
    return {"first_grid_s": first, "per": [p / 1000 for p in per]}


def screenshots(browser, out_img: Path) -> None:
    """The grid and the detail view of a small round that two people are rating, for the README."""
    from loop.rate.page import BackgroundServer, build_app, close_app

    with tempfile.TemporaryDirectory(prefix="loop-shots-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            store.add_unit(
                1,
                parent=0,
                path="checkpoints/unit_001",
                base="embedded",
                method="lora",
                strategy="golden",
                manifest={},
            )
            first = add_images(ws, store, 12, round=0, size=128, seed=3)
            ids = add_images(ws, store, 180, round=1, size=128, seed=1)
            store.db.execute("UPDATE images SET parent_id = ? WHERE id = ?", (first[2], ids[5]))
            store.rate(ids[5], "SR", "bob")  # later undone: the detail view shows the history
            store.undo("bob")
        _, app = build_app(ws)
        server = BackgroundServer(app)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 820})
            ctx.add_init_script("localStorage.setItem('loop.rater', 'alice')")
            page = ctx.new_page()
            page.goto(server.url + "/")
            page.wait_for_function(_grid_ready_js(20), polling="raf", timeout=60_000)
            # bob's recent (undone) rating makes alice's page start half way down the list, as it would for a
            # second rater; she goes back to the top herself
            page.keyboard.press("Home")
            for key in "14234":
                page.keyboard.press(key)
            with ws.store() as store:  # bob, on his own page, rates a few further along
                store.rate_many([(i, t) for i, t in zip(ids[10:15], ["N", "R", "SSR", "N", "SR"])], "bob")
            app.state.handlers.claim("bobs-page", ids[15], "bob")  # and has his focus on the next one
            page.wait_for_function("LoopRate.idle()")
            page.wait_for_function(f"LoopRate.state.claims.has({ids[15]})")  # one poll: all of that arrives
            # she moves to ids[5] herself (the image with a parent), as the detail view below shows it
            page.keyboard.press("Home")
            for _ in range(5):
                page.keyboard.press("ArrowRight")
            page.wait_for_function(f"LoopRate.state.ids[LoopRate.state.focus] === {ids[5]}")
            out_img.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out_img / "rate-grid.png"))
            page.keyboard.press("Enter")  # the focus is on ids[5]
            page.wait_for_selector(".lr-detail:not([hidden]) .lr-meta dt")
            page.click(".lr-excellent")
            page.wait_for_function("LoopRate.idle()")
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowRight")  # reload the detail: history and golden/ as stored
            page.wait_for_selector(".lr-d-hist .lr-undone")
            page.wait_for_function("() => document.querySelector('.lr-d-img img').complete")
            page.wait_for_timeout(300)
            page.screenshot(path=str(out_img / "rate-detail.png"))
            ctx.close()
        finally:
            server.stop()
            close_app(app)


def bench_rate(
    images: int = 10_000,
    ratings: int = 200,
    baseline_ratings: int = 20,
    out: str = "docs",
    shots: bool = True,
) -> dict:
    from playwright.sync_api import sync_playwright

    from loop.bench.report import table, write

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    rng = random.Random(0)
    load = os.getloadavg()[0]  # what else the machine is doing: these are wall-clock times
    with tempfile.TemporaryDirectory(prefix="loop-bench-rate-") as tmp:
        # 1. a round of tiny images
        ws = Workspace.init(Path(tmp) / "ws")
        t0 = time.time()
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            add_images(ws, store, images, round=0, size=32)
        print(f"made {images} images in {time.time() - t0:.1f} s")
        with ws.store() as store:
            ids = [r["id"] for r in store.images(round=0)]  # the gallery's order
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            # 2. our page, served from its own process as `loop rate` does
            server = ChildServer("ours", ws.root)
            try:
                ours = measure_ours(browser, server.url, ws.db_path, ratings, rng)
            finally:
                server.stop()
            # 3. the baseline, on the same images, the same way
            server = ChildServer("baseline", ws.root)
            try:
                base = measure_baseline(browser, server.url, ids, baseline_ratings)
            finally:
                server.stop()
            # 4. pictures for the README
            if shots:
                screenshots(browser, Path(out) / "img")
            browser.close()

    ours_per = statistics.mean(ours["durable"])
    base_per = statistics.mean(base["per"])
    figures = {
        "images": images,
        "ratings": ratings,
        "first_grid_s": round(ours["first_grid_s"], 3),
        "first_grid_warm_s": round(ours["first_grid_warm_s"], 3),
        "gradio_shell_s": round(ours["shell_s"], 3),
        "visible_p50_ms": round(_p(ours["visible"], 0.5) * 1000, 1),
        "visible_p95_ms": round(_p(ours["visible"], 0.95) * 1000, 1),
        "durable_p50_ms": round(_p(ours["durable"], 0.5) * 1000, 1),
        "durable_p95_ms": round(_p(ours["durable"], 0.95) * 1000, 1),
        "per_rating_ms": round(ours_per * 1000, 1),
        "baseline_first_grid_s": round(base["first_grid_s"], 3),
        "baseline_per_rating_ms": round(base_per * 1000, 1),
        "baseline_ratings": baseline_ratings,
        "ratio": round(base_per / ours_per, 2),
        "load_avg_1m": round(load, 2),
        "cpus": os.cpu_count(),
    }
    rows = [
        {
            "page": "loop rate (keys)",
            "first_grid_s": figures["first_grid_s"],
            "visible_p95_ms": figures["visible_p95_ms"],
            "durable_p95_ms": figures["durable_p95_ms"],
            "per_rating_ms": figures["per_rating_ms"],
        },
        {
            "page": "gr.Gallery + button",
            "first_grid_s": figures["baseline_first_grid_s"],
            "visible_p95_ms": round(_p(base["per"], 0.95) * 1000),
            "durable_p95_ms": round(_p(base["per"], 0.95) * 1000),
            "per_rating_ms": round(base_per * 1000),
        },
    ]
    t = table(rows)
    print(t)
    print(f"ratio (baseline time per rating / ours): {figures['ratio']}")
    write(
        "rate",
        figures,
        f"""## rate

`python -m loop.bench rate`: the rating page with {images:,} tiny images in one round, in headless Chromium
(Playwright, Debian's chromium). {ratings} ratings by keyboard, each timed inside the page from the key event
until the frame showing the tile's tier (visible) and until the server's answer after the SQLite commit
(durable); loop.db is then checked to hold one row per keypress. The baseline is a minimal Blocks page, a
`gr.Gallery` of the same round and a button: click a thumbnail, click "UR", until the answer shows
({baseline_ratings} ratings). The first grid is timed with a fresh browser profile, from navigation until the
first screen of thumbnails has loaded; {figures["gradio_shell_s"]} s of it is Gradio's own page starting up
(until the Rate tab mounts), and a reload takes {figures["first_grid_warm_s"]} s.

{t}

Per rating, the page is **{figures["ratio"]}×** faster than the gallery (mean time per rating of the baseline
over ours, key event until durable). Targets: first grid ≤ 1.5 s, visible p95 ≤ 100 ms, durable p95 ≤ 300 ms,
≥ 3×. Measured on {figures["cpus"]} CPU cores with a 1-minute load average of {figures["load_avg_1m"]} from
other work, under `nice -n 19`: wall-clock figures grow with that load.
""",
        out,
    )
    return figures
