"""`python -m loop.bench shots`: the Compare and A/B tabs' screenshots for the README (docs/img/compare.png,
docs/img/ab.png).

A workspace with two real units (unit 1 a short LoRA on unit 0's warmest images), both drawing the same
prompts and seeds, a few blind votes, then the page in headless Chromium: the probe grid rendered, and the
A/B pair with its ranking unfolded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from loop.bench.rate import CHROMIUM, CHROMIUM_ARGS
from loop.config import load_config
from loop.generate import generate_ring
from loop.rate.ab import ABVotes
from loop.rate.page import BackgroundServer, build_app, close_app
from loop.round import run_round
from loop.workspace import Workspace


def compare_screenshot(out: str = "docs") -> Path:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="loop-shots-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        ws.prompts_path.write_text("a circle\na square\na triangle\na ring\n")
        cfg = load_config(ws.root, ["generate.images_per_prompt=6", "train.steps=120"])
        run_round(ws, cfg, 0, auto_rate_=True, log=lambda m: None)
        with ws.store() as store:
            generate_ring(ws, store, cfg, unit=1, count=24, log=lambda m: None)
            ab = ABVotes(store)
            for k in range(12):
                ab.vote({"pair": ab.pair()["pair"], "winner": ("left", "right")[k % 2]})
        _, app = build_app(ws, cfg, warm=0)
        server = BackgroundServer(app)
        target = Path(out) / "img" / "compare.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 1400})
                page.goto(server.url + "/")
                page.get_by_role("tab", name="Compare").click()
                page.get_by_role("button", name="Render the probe grid").click()
                page.wait_for_selector("#loop-compare-view img[alt='probe grid']", timeout=180_000)
                page.wait_for_function(
                    "[...document.querySelectorAll('#loop-compare-view img')].every(i => i.naturalWidth > 0)"
                )
                page.screenshot(path=str(target), full_page=True)
                page.set_viewport_size({"width": 1100, "height": 800})
                page.get_by_role("tab", name="A/B").click()
                page.wait_for_function("document.querySelector('.ab-img[data-side=right]')?.naturalWidth > 0")
                page.locator(".ab-results summary").click()
                page.wait_for_selector(".ab-rank")
                page.screenshot(path=str(target.with_name("ab.png")), full_page=True)
                browser.close()
        finally:
            server.stop()
            close_app(app)
    print(f"wrote {target} and {target.with_name('ab.png')}")
    return target
