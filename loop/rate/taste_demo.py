"""A workspace whose colours decide the tiers, for the taste model's page tests and its screenshot.

    python -m loop.rate.taste_demo [docs/img/page_likely_ur.png]

Each image is a field of one colour between blue (worst) and red (best) with a small shape of another colour on
it; its "warmth" w in [0, 1] decides the tier a scripted person gives (N below 0.2 .. UR from 0.8). Rated
through RateHandlers, as the page would. The screenshot is the Rate tab in "likely UR first" order with the
predicted tiers on, in headless Chromium (Debian's /usr/bin/chromium).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from loop.config import TIERS
from loop.images import png_bytes
from loop.workspace import Workspace, sha256_bytes

PROMPTS = ("a warm field", "a quiet field")


def tier_of(warmth: float) -> str:
    """N below 0.2, R below 0.4, SR below 0.6, SSR below 0.8, else UR."""
    return TIERS[len(TIERS) - 1 - min(len(TIERS) - 1, int(warmth * len(TIERS)))]


def colour(warmth: float, rng: random.Random) -> tuple[int, int, int]:
    blue, red = (30, 70, 210), (225, 45, 30)
    return tuple(max(0, min(255, round(b + (r - b) * warmth + rng.uniform(-12, 12)))) for b, r in zip(blue, red))


def coloured_images(ws: Workspace, store, n: int, round: int = 1, seed: int = 0, size: int = 48) -> list:
    """n images in generations/unit_<round>/ with their rows; returns [(image id, warmth)], warmth spread evenly
    over [0, 1) in a shuffled order."""
    rng = random.Random(seed * 7919 + round)
    warmths = [(k + rng.random()) / n for k in range(n)]
    rng.shuffle(warmths)
    out = []
    for k, w in enumerate(warmths):
        im = Image.new("RGB", (size, size), colour(w, rng))
        d = ImageDraw.Draw(im)
        x, y, r = rng.randrange(8, size - 8), rng.randrange(8, size - 8), rng.randrange(3, 8)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        prompt = PROMPTS[k % len(PROMPTS)]
        meta = dict(prompt=prompt, seed=seed + k, steps=20, cfg=4.0, width=size, height=size, model="embedded",
                    unit=round, round=round)  # fmt: skip
        data = png_bytes(im, meta)
        sha = sha256_bytes(data)
        path = ws.generations(round) / f"{sha[:16]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        i = store.add_image(sha256=sha, path=ws.rel(path), prompt=prompt, params=meta, seed=seed + k, steps=20,
                            cfg=4.0, width=size, height=size, unit=round, round=round)  # fmt: skip
        out.append((i, w))
    return out


def rate_by_colour(ws: Workspace, store, images: list, rater: str = "alice") -> None:
    """Rate [(id, warmth)] as the scripted person would, through the page's handlers."""
    from loop.rate.handlers import RateHandlers

    RateHandlers(ws, store).rate([(i, tier_of(w)) for i, w in images], rater)


def wait_ready(service, unrated: int, timeout: float = 120.0):
    """The service's snapshot once its model is ready and has predicted `unrated` images (or raise)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = service.snapshot()
        if s.ready and not s.predicting and len(s.preds) >= unrated:
            return s
        time.sleep(0.1)
    raise TimeoutError(f"the taste model was not ready in {timeout:.0f} s: {service.snapshot().status()}")


def screenshot(out: Path, n: int = 72, rated: int = 44) -> Path:
    """Make docs/img/page_likely_ur.png: a workspace of coloured images, `rated` of them rated by colour."""
    import tempfile

    from playwright.sync_api import sync_playwright

    from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS
    from loop.rate.page import BackgroundServer, build_app, close_app

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            images = coloured_images(ws, store, n, round=1)
            rate_by_colour(ws, store, images[:rated], rater="alice")
            rate_by_colour(ws, store, images[rated : rated + 6], rater="bob")
        _, app = build_app(ws, warm=0)
        server = BackgroundServer(app)
        try:
            wait_ready(app.state.handlers.taste, n - rated - 6)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                ctx = browser.new_context(viewport={"width": 1100, "height": 640})
                ctx.add_init_script(
                    "localStorage.setItem('loop.rater', 'alice'); localStorage.setItem('loop.predicted', '1')"
                )
                page = ctx.new_page()
                page.goto(f"{server.url}/?round=1&order=likely_ur")
                page.wait_for_selector(".lr[data-ready='1'] .lr-tile .lr-pred:not(:empty)", timeout=60_000)
                page.wait_for_function("[...document.images].every((i) => i.complete)", timeout=60_000)
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out))
                browser.close()
        finally:
            server.stop()
            close_app(app)
    return out


if __name__ == "__main__":
    path = screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/page_likely_ur.png"))
    print(f"wrote {path}")
