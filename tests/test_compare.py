import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from loop.compare import (
    DEFAULT_PROMPTS,
    DEFAULT_SEEDS,
    GRID_LABEL_H,
    GRID_LABEL_W,
    GRID_LINE_H,
    cell_size,
    compare,
    format_table,
    grid_image,
    probe_set,
)
from loop.config import TIERS
from loop.errors import LoopError
from loop.images import load_rgb
from loop.metrics import NOVEL_HIT_THRESHOLD, features, novel_hits, thumbnail

QUIET = dict(log=lambda m: None)


def make_unit_1(ws, store, cfg):
    """A LoRA unit whose adapter visibly changes the base model's pictures."""
    from loop.config import ModelConfig
    from loop.models import load_base
    from loop.train import add_lora, save_lora

    pipe = load_base(ModelConfig())
    add_lora(pipe.unet, cfg.train)
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_lora(pipe.unet, ws.checkpoint(1))
    store.add_unit(
        1, parent=0, path=ws.rel(ws.checkpoint(1)), base="embedded", method="lora", strategy="golden", manifest={}
    )


def cell(grid: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = GRID_LABEL_H + row * size, GRID_LABEL_W + col * size
    return grid[y : y + size, x : x + size]


def test_compare_grid_stats_and_files(ws, cfg, tmp_path):
    from loop.generate import generate_ring

    cfg.generate.steps = 2  # fast; the pictures only have to differ between units and seeds
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        make_unit_1(ws, store, cfg)
        generate_ring(ws, store, cfg, unit=0, count=4, **QUIET)
        generate_ring(ws, store, cfg, unit=1, count=4, **QUIET)
        ids0 = [r["id"] for r in store.images(unit=0)]
        ids1 = [r["id"] for r in store.images(unit=1)]
        assert len(ids0) == len(ids1) == 4
        for image_id, tier in zip(ids0, ["UR", "UR", "N"]):  # the fourth stays unrated
            store.rate(image_id, tier, rater="t")
        for image_id, tier in zip(ids1, ["SSR", "UR"]):
            store.rate(image_id, tier, rater="t")
        store.rate(ids1[0], "R", rater="t")  # re-rated: the current tier counts

        result = compare(ws, store, cfg, [0, 1], **QUIET)
        ur_rows = [r for r in store.images() if r["tier"] == "UR"]
        centre = np.mean([features(load_rgb(ws.root / r["path"])) for r in store.images(unit=0)], axis=0)
        expected_hits = novel_hits(
            [features(load_rgb(ws.root / r["path"])) for r in ur_rows], NOVEL_HIT_THRESHOLD, centre
        )

    out = ws.root / "cache" / "compare"
    assert result["grid"] == out / "compare_grid.png" and result["plot"] == out / "compare_plot.png"

    # the grid: 2 units x (2 prompts x 2 seeds), 32 px images upscaled 3x to 96 px cells, plus the label margins
    probes = [(p, s) for p in ("a circle", "a square") for s in DEFAULT_SEEDS]
    assert [(d["prompt"], d["seed"]) for d in result["probes"]] == probes
    size = cell_size(32, 32)[0]
    assert size == 96
    with Image.open(result["grid"]) as im:
        assert im.size == (GRID_LABEL_W + 4 * size, GRID_LABEL_H + 2 * size)
        grid = np.asarray(im.convert("RGB"))
    for col in range(4):
        assert not np.array_equal(cell(grid, 0, col, size), cell(grid, 1, col, size))  # unit 0 vs unit 1
    assert not np.array_equal(cell(grid, 0, 0, size), cell(grid, 0, 1, size))  # another seed
    block = cell(grid, 0, 0, size)
    assert np.array_equal(block, np.repeat(np.repeat(block[::3, ::3], 3, axis=0), 3, axis=1))  # NEAREST 3x
    assert grid[:GRID_LABEL_H, GRID_LABEL_W:].min() < 128  # column labels were drawn
    assert grid[GRID_LABEL_H:, :GRID_LABEL_W].min() < 128  # row labels too

    # per-unit statistics
    s0, s1 = result["units"]
    assert (s0["unit"], s0["images"], s0["rated"]) == (0, 4, 3)
    assert s0["tiers"] == {"UR": 2, "SSR": 0, "SR": 0, "R": 0, "N": 1}
    assert s0["ur_rate"] == pytest.approx(2 / 3)
    assert (s1["unit"], s1["images"], s1["rated"]) == (1, 4, 2)
    assert s1["tiers"] == {"UR": 1, "SSR": 0, "SR": 0, "R": 1, "N": 0}
    assert s1["ur_rate"] == pytest.approx(1 / 2)
    for s in (s0, s1):
        assert list(s["tiers"]) == list(TIERS)
        assert 1.0 <= s["vendi"] <= 4.0 + 1e-9
        assert 0.0 <= s["near_dup_rate"] <= 1.0
    with ws.store() as store:  # seed diversity: the thumbnails of each prompt's images, compared pairwise
        for s in (s0, s1):
            groups = {}
            for r in store.images(unit=s["unit"]):
                groups.setdefault(r["prompt"], []).append(thumbnail(load_rgb(ws.root / r["path"])))
            pairs = [
                [np.sqrt(np.mean((g[i] - g[j]) ** 2)) for i in range(len(g)) for j in range(i + 1, len(g))]
                for g in groups.values()
            ]
            assert any(pairs)  # some prompt has two seeds
            expected = np.mean([np.mean(p) for p in pairs if p])
            assert s["seed_diversity"] == pytest.approx(expected) and s["seed_diversity"] > 0
    hit_units = [r["unit"] for r, hit in zip(ur_rows, expected_hits) if hit]
    assert (s0["novel_hits"], s1["novel_hits"]) == (hit_units.count(0), hit_units.count(1))

    # compare.json holds the same data; the plot is a PNG
    data = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert data["units"] == result["units"] and data["grid"] == str(result["grid"])
    with Image.open(result["plot"]) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
        im.load()
    table = format_table(result)
    assert table.splitlines()[0].startswith("per-prompt coverage")  # it leads (no unit here has a manifest.json)
    assert any(ln.split()[:8] == ["unit", "images", "rated", *TIERS] for ln in table.splitlines())
    assert "66.7%" in table and "50.0%" in table

    # the same unit renders the same cells again (here unit 1 alone, into another folder)
    with ws.store() as store:
        again = compare(ws, store, cfg, [1], out_dir=tmp_path / "again", **QUIET)
    assert again["grid"] == tmp_path / "again" / "compare_grid.png"
    with Image.open(again["grid"]) as im:
        assert im.size == (GRID_LABEL_W + 4 * size, GRID_LABEL_H + size)
        grid2 = np.asarray(im.convert("RGB"))
    for col in range(4):
        assert np.array_equal(cell(grid2, 0, col, size), cell(grid, 1, col, size))


def test_compare_unknown_unit(ws, cfg):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        with pytest.raises(LoopError, match="unit 7"):
            compare(ws, store, cfg, [0, 7], **QUIET)
        with pytest.raises(LoopError, match="unit -1"):
            compare(ws, store, cfg, [-1], **QUIET)
        with pytest.raises(LoopError):
            compare(ws, store, cfg, [], **QUIET)
    assert not (ws.root / "cache" / "compare" / "compare_grid.png").exists()  # failed before rendering


def test_probe_set(ws):
    assert probe_set(ws) == [(p, s) for p in ("a circle", "a square") for s in DEFAULT_SEEDS]
    assert probe_set(ws, ["x"], [5, 6]) == [("x", 5), ("x", 6)]
    ws.prompts_path.write_text("a --n 2\nb\nc\nd\ne\nf\n", encoding="utf-8")  # options are dropped; first four
    assert [p for p, _ in probe_set(ws, seeds=[1])] == ["a", "b", "c", "d"]
    ws.prompts_path.unlink()
    assert [p for p, _ in probe_set(ws, seeds=[1])] == list(DEFAULT_PROMPTS)
    with pytest.raises(LoopError):
        probe_set(ws, [], [1])


def test_grid_layout_non_square():
    images = [Image.new("RGB", (48, 24), (255, 0, 0)), Image.new("RGB", (48, 24), (0, 0, 255))]
    probes = [("a very long prompt that cannot fit in one cell", 1), ("b", 2)]
    cw, ch = cell_size(48, 24)
    assert (cw, ch) == (192, 96)  # factor 4: the short side reaches 96
    assert cell_size(512, 512) == (512, 512)  # never shrunk
    im = grid_image([(0, images), (3, images[::-1])], probes)
    top = im.info["label_h"]  # the long prompt wraps onto a second line: the label row grows by one line
    assert top == GRID_LABEL_H + GRID_LINE_H
    assert im.size == (GRID_LABEL_W + 2 * cw, top + 2 * ch)
    a = np.asarray(im)
    assert tuple(a[top + 5, GRID_LABEL_W + 5]) == (255, 0, 0)
    assert tuple(a[top + ch + 5, GRID_LABEL_W + 5]) == (0, 0, 255)
    assert tuple(a[top + ch - 1, GRID_LABEL_W + 2 * cw - 1]) == (0, 0, 255)


def test_a_long_prompt_wraps_onto_lines_and_is_never_cut():
    from PIL import ImageDraw

    from loop.fonts import label_font, wrap

    prompt = "a watercolour of a sleepy tabby cat curled up on a hill of red poppies under a wide summer sky at noon"
    cell = Image.new("RGB", (32, 32), (0, 128, 0))
    im = grid_image([(0, [cell])], [(prompt, 7)])
    font, _ = label_font([prompt, "unit 0"])
    lines = wrap(ImageDraw.Draw(im), prompt, font, cell_size(32, 32)[0] - 4)
    assert len(lines) > 3 and " ".join(lines) == prompt  # every word, in order, none cut
    assert im.info["label_h"] == GRID_LABEL_H + (len(lines) - 1) * GRID_LINE_H
    a = np.asarray(im)
    assert tuple(a[im.info["label_h"] + 3, GRID_LABEL_W + 3]) == (0, 128, 0)  # the cells start under the labels
    # the label area holds ink down to its last line (the seed's), not just the first
    ink = (a[: im.info["label_h"], GRID_LABEL_W:] < 128).any(axis=(1, 2))
    assert ink[im.info["label_h"] - GRID_LINE_H :].any()
    # a prompt with no spaces (as Japanese is written) breaks between characters
    assert len(wrap(ImageDraw.Draw(im), "あ" * 40, font, 90)) > 1


def test_a_japanese_prompt_is_drawn_with_a_font_that_has_its_glyphs():
    from loop.fonts import FONT_PACKAGE, label_font, missing_chars

    prompt = "夕焼けの海辺を歩く猫"
    font, lacking = label_font([prompt])
    if lacking:
        pytest.skip(f"no installed font covers Japanese: install {FONT_PACKAGE} (.ci/run does)")
    assert not missing_chars(font, prompt)
    warned = []
    im = grid_image([(0, [Image.new("RGB", (32, 32))])], [(prompt, 1)], log=warned.append)
    assert warned == []
    # drawn, not boxed: the default font's boxes for these characters are all alike, the glyphs are not
    from PIL import ImageDraw, ImageFont

    def label(f):
        canvas = Image.new("L", (200, 20), 255)
        ImageDraw.Draw(canvas).text((0, 0), prompt, font=f, fill=0)
        return np.asarray(canvas)

    assert not np.array_equal(label(font), label(ImageFont.load_default(10)))
    assert (np.asarray(im)[:GRID_LABEL_H, GRID_LABEL_W:] < 128).any()


def test_without_a_font_for_the_prompt_the_grid_says_which_package_to_install(monkeypatch):
    import loop.fonts as fonts

    monkeypatch.setattr(fonts, "KNOWN_FONTS", ())
    monkeypatch.setattr(fonts, "_fontconfig", lambda chars: [])
    fonts._choose.cache_clear()
    try:
        said = []
        im = grid_image([(0, [Image.new("RGB", (32, 32))])], [("夕焼けの海辺", 1)], log=said.append)
        assert im.size[1] >= GRID_LABEL_H  # drawn all the same, with PIL's default font
        assert len(said) == 1 and "\n" not in said[0]
        assert "fonts-noto-cjk" in said[0] and "夕" in said[0]
        with pytest.warns(UserWarning, match="fonts-noto-cjk"):  # no log given: a warning
            grid_image([(0, [Image.new("RGB", (32, 32))])], [("夕焼けの海辺", 1)])
    finally:
        fonts._choose.cache_clear()


def test_a_probe_from_a_prompt_line_is_drawn_with_that_lines_options(ws, cfg):
    """The probe grid draws what the ring draws: a line's --cfg, --neg, --steps, --w and --h apply to its probe
    (they were dropped: the grid showed the global settings), so its cell is `loop generate`'s image."""
    from loop.generate import generate_ring

    cfg.generate.steps = 2
    ws.prompts_path.write_text('a circle --cfg 9 --neg "blue" --steps 3 --w 48 --h 32 --seed 1000\n', encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=1, **QUIET)
        (row,) = store.images(unit=0)
        result = compare(ws, store, cfg, [0], seeds=[1000], **QUIET)
    assert (row["seed"], row["cfg"], row["negative_prompt"], row["width"], row["height"]) == (1000, 9, "blue", 48, 32)
    (probe,) = result["probes"]
    assert probe == {"prompt": "a circle", "seed": 1000, "negative_prompt": "blue", "steps": 3, "cfg": 9.0,
                     "width": 48, "height": 32}  # fmt: skip
    cw, ch = cell_size(48, 32)
    with Image.open(result["grid"]) as im:
        assert im.size == (GRID_LABEL_W + cw, GRID_LABEL_H + ch)
        got = np.asarray(im.convert("RGB"))[GRID_LABEL_H : GRID_LABEL_H + ch, GRID_LABEL_W : GRID_LABEL_W + cw]
    with Image.open(ws.root / row["path"]) as made:
        want = np.asarray(made.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_grid_keeps_each_images_shape_in_its_cell():
    wide, tall = Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (32, 64), (0, 0, 255))
    im = np.asarray(grid_image([(0, [wide, tall])], [("w", 1), ("t", 2)]))
    cw, ch = cell_size(64, 32)  # the first image's cell: 192 x 96
    tall_cell = im[GRID_LABEL_H : GRID_LABEL_H + ch, GRID_LABEL_W + cw : GRID_LABEL_W + 2 * cw]
    blue = (tall_cell == (0, 0, 255)).all(axis=2)
    assert blue.sum() == 48 * 96  # scaled to fit (x1.5), not stretched to 192 x 96
    assert blue[:, cw // 2].all() and not blue[:, 0].any()  # centred


def test_a_prompt_that_collapsed_is_named_even_when_the_average_hides_it(ws):
    """Unit 1's 'a triangle' draws one picture for every seed while its 'a circle' varies more than unit 0's: the
    average seed diversity barely moves, but the prompt is named as collapsing, against its parent unit 0."""
    from loop.compare import unit_stats
    from loop.workspace import atomic_write, sha256_bytes

    rng = np.random.default_rng(0)

    def put(store, unit, prompt, seed, pixels):
        data = io.BytesIO()
        Image.fromarray(pixels).save(data, format="PNG")
        data = data.getvalue()
        path = atomic_write(ws.generations(unit) / f"{sha256_bytes(data)[:16]}.png", data)
        store.add_image(sha256=sha256_bytes(data), path=ws.rel(path), prompt=prompt, seed=seed, unit=unit, round=unit)

    def noisy(spread):
        return np.clip(128 + rng.normal(0, spread, (32, 32, 3)), 0, 255).astype(np.uint8)

    one = noisy(40)
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        store.add_unit(1, parent=0, path="checkpoints/unit_001", base="embedded", method="lora", strategy="golden",
                       manifest={})  # fmt: skip
        for seed in range(6):
            put(store, 0, "a circle", seed, noisy(20))
            put(store, 0, "a triangle", seed, noisy(40))
            put(store, 1, "a circle", seed, noisy(60))
            same = one.copy()
            same[0, 0] = seed  # one pixel apart: another file, the same picture
            put(store, 1, "a triangle", seed, same)
        store.add_unit(2, parent=0, path="checkpoints/unit_002", base="embedded", method="lora", strategy="golden",
                       manifest={})  # fmt: skip
        for seed in range(6):  # unit 2: every prompt narrows alike, as a taste does in a first round
            put(store, 2, "a circle", seed, noisy(8))
            put(store, 2, "a triangle", seed, noisy(16))
        s0, s1, s2 = unit_stats(ws, store, [0, 1, 2], **QUIET)
    assert s2["seed_diversity"] < 0.7 * s0["seed_diversity"] and s2["collapsing"] == []
    assert s1["seed_diversity_by_prompt"]["a triangle"] < 0.1 * s0["seed_diversity_by_prompt"]["a triangle"]
    assert s1["seed_diversity"] > 0.6 * s0["seed_diversity"]  # the average alone would not say it
    assert [c["prompt"] for c in s1["collapsing"]] == ["a triangle"] and s1["collapsing"][0]["parent"] == 0
    assert s0["collapsing"] == []  # unit 0 has no parent here
    table = format_table({"units": [s0, s1, s2]})
    assert "collapsing? unit 1: 'a triangle'" in table


# -- per-prompt coverage of the selection: a collapse shows where it happens ---------------------------------
PROMPTS = ("a circle", "a square")


def picture(rng, prompt: str) -> np.ndarray:
    """A varied picture of the prompt: its shape, in a random colour, place and size, on a light background."""
    from PIL import ImageDraw

    bg, fg = tuple(int(v) for v in rng.integers(140, 256, 3)), tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", (32, 32), bg)
    x, y, w = (int(v) for v in rng.integers(4, 20, 3))
    draw = ImageDraw.Draw(im)
    (draw.ellipse if prompt == "a circle" else draw.rectangle)((x, y, min(31, x + w), min(31, y + w)), fill=fg)
    return np.asarray(im)


def red_blob_on_blue() -> np.ndarray:
    """What a collapsed unit draws for every seed."""
    from PIL import ImageDraw

    im = Image.new("RGB", (32, 32), (20, 30, 120))
    ImageDraw.Draw(im).ellipse((8, 8, 24, 24), fill=(220, 30, 30))
    return np.asarray(im)


def put_image(ws, store, unit: int, prompt: str, seed: int, pixels: np.ndarray) -> int:
    """An image row and its file, as the generator leaves them (seed in one pixel: one picture, many files)."""
    from loop.workspace import atomic_write, sha256_bytes

    pixels = pixels.copy()
    pixels[0, 0, 0] = seed % 256
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    data = data.getvalue()
    path = atomic_write(ws.generations(unit) / f"{sha256_bytes(data)[:16]}.png", data)
    return store.add_image(
        sha256=sha256_bytes(data), path=ws.rel(path), prompt=prompt, seed=seed, unit=unit, round=unit
    )


def add_trained_unit(ws, store, unit: int, selection: list[int]) -> None:
    """Unit `unit` as training leaves it: a manifest.json naming its selection (id, sha256, caption) and its row."""
    from loop.workspace import atomic_write

    images = [{"id": i, "sha256": store.image(i)["sha256"], "caption": store.image(i)["prompt"], "tier": "UR"}
              for i in selection]  # fmt: skip
    atomic_write(
        ws.checkpoint(unit) / "manifest.json", json.dumps({"unit": unit, "parent": unit - 1, "images": images})
    )
    store.add_unit(unit, parent=unit - 1, path=ws.rel(ws.checkpoint(unit)), base="embedded", method="lora",
                   strategy="golden", manifest={})  # fmt: skip


def collapse_workspace(ws, store) -> None:
    """Unit 0 draws 28 varied pictures of each prompt. Unit 1 learnt from 8 of each, and draws one red blob on blue
    for every seed of 'a circle' while its 'a square' stays varied. Unit 2 learnt from 8 others of each and draws
    both prompts as varied as the base does."""
    rng = np.random.default_rng(0)
    store.ensure_base_unit("embedded")
    base = {p: [put_image(ws, store, 0, p, s, picture(rng, p)) for s in range(28)] for p in PROMPTS}
    add_trained_unit(ws, store, 1, [i for p in PROMPTS for i in base[p][:8]])
    for s in range(12):
        put_image(ws, store, 1, "a circle", s, red_blob_on_blue())
        put_image(ws, store, 1, "a square", s, picture(rng, "a square"))
    add_trained_unit(ws, store, 2, [i for p in PROMPTS for i in base[p][-8:]])
    for s in range(12):
        for p in PROMPTS:
            put_image(ws, store, 2, p, s, picture(rng, p))


def test_coverage_of_the_selection_per_prompt_finds_the_unit_and_prompt_that_collapsed(ws):
    """Unit 1's 'a circle' covers none of its selection where the base covers all of it: its coverage share is
    below eval.min_coverage_share and the prompt is named; unit 2, as varied as the base, is not."""
    from loop.compare import unit_stats

    with ws.store() as store:
        collapse_workspace(ws, store)
        s0, s1, s2 = unit_stats(ws, store, [0, 1, 2], **QUIET)
        (only1,) = unit_stats(ws, store, [1], **QUIET)  # unit 0's images are the baseline even when not compared
    assert only1["coverage_share"] == s1["coverage_share"]

    c1 = s1["selection_by_prompt"]
    assert set(c1) == set(PROMPTS) and set(c1["a circle"]) == {"precision", "recall", "density", "coverage", "k"}
    assert c1["a circle"]["coverage"] <= 0.2 and c1["a circle"]["recall"] <= 0.2  # one picture spans nothing
    assert c1["a square"]["coverage"] >= 0.8
    assert s1["base_coverage_by_prompt"]["a circle"] >= 0.8  # the base's OTHER images cover the selection
    assert (
        s1["vs_base_by_prompt"]["a circle"]["coverage"] <= 0.2
        and s1["vs_base_by_prompt"]["a square"]["coverage"] >= 0.8
    )
    assert s1["collapsed"] and s1["coverage_share"] < 0.6
    assert s1["coverage_share"] == pytest.approx(s1["selection_coverage"] / s1["base_selection_coverage"], abs=1e-3)
    assert [d["prompt"] for d in s1["coverage_lost"]][:1] == ["a circle"]

    assert not s2["collapsed"] and s2["coverage_share"] >= 0.8 and s2["selection_unit"] == 2
    assert min(d["coverage"] for d in s2["selection_by_prompt"].values()) >= 0.8
    # unit 0, which learnt nothing, is measured against unit 1's selection: the baseline, share 1
    assert s0["selection_unit"] == 1 and s0["coverage_share"] == pytest.approx(1.0) and not s0["collapsed"]
    assert s0["vs_base_by_prompt"] == {}

    lines = format_table({"units": [s0, s1, s2]}).splitlines()
    assert lines[0].startswith("per prompt") and lines[1].split()[:3] == ["unit", "prompt", "cov"]
    named = [ln for ln in lines if "collapsed:" in ln]
    assert len(named) == 1 and named[0].startswith("unit 1 collapsed:") and "lost most: 'a circle'" in named[0]
    assert lines.index(named[0]) < next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["unit", "images"])


def test_a_unit_without_a_manifest_has_no_selection_figures(ws):
    from loop.compare import unit_stats

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        rng = np.random.default_rng(1)
        for s in range(6):
            put_image(ws, store, 0, "a circle", s, picture(rng, "a circle"))
        (s0,) = unit_stats(ws, store, [0], **QUIET)
    assert s0["selection_unit"] is None and s0["selection_by_prompt"] == {} and s0["coverage_share"] is None
    assert not s0["collapsed"]
    assert format_table({"units": [s0]}).startswith("per-prompt coverage: nothing to compare yet")


def test_loop_compare_leads_with_the_per_prompt_coverage_and_names_the_collapse(ws, cfg, capsys):
    """`loop compare` on a workspace whose unit 1 collapsed on 'a circle': the output opens with the per-prompt
    table, names unit 1 and 'a circle' (not unit 2), and compare.json has the figures."""
    import shutil

    from loop.cli import entry
    from loop.config import ModelConfig
    from loop.models import load_base
    from loop.train import add_lora, save_lora

    pipe = load_base(ModelConfig())  # weights for units 1 and 2, so that the probe grid can render them
    add_lora(pipe.unet, cfg.train)
    save_lora(pipe.unet, ws.checkpoint(1))
    shutil.copytree(ws.checkpoint(1), ws.checkpoint(2), dirs_exist_ok=True)
    with ws.store() as store:
        collapse_workspace(ws, store)
    capsys.readouterr()
    assert entry(["compare", "-w", str(ws.root), "generate.steps=2", "eval.min_coverage_share=0.6"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("per prompt") :].splitlines()
    assert lines[0].startswith("per prompt, against the unit's own selection")
    named = [ln for ln in lines if "collapsed:" in ln]
    assert len(named) == 1 and named[0].startswith("unit 1 collapsed: it covers 50% of what its selection spans")
    assert "lost most: 'a circle' (1.00 -> 0.00)" in named[0] and "unit 2" not in named[0]
    assert out.index("collapsed:") < out.index("vendi")  # the figures lead; Vendi and seed diversity follow
    data = json.loads((ws.root / "cache" / "compare" / "compare.json").read_text(encoding="utf-8"))
    assert data["collapsed"] == [1]
    assert data["eval"] == {"features": "cheap", "k": 5, "min_coverage_share": 0.6, "taste_grid": True}
    by_unit = {s["unit"]: s for s in data["units"]}
    assert by_unit[1]["selection_by_prompt"]["a circle"]["coverage"] == 0.0
    assert by_unit[2]["collapsed"] is False and by_unit[1]["coverage_lost"][0]["prompt"] == "a circle"
    assert {"ur_rate", "vendi", "seed_diversity", "novel_hits", "collapsing"} <= set(by_unit[1])
    assert by_unit[1]["vendi"] > by_unit[0]["vendi"]  # what the Vendi score across prompts alone would have said


def test_coverage_with_a_vision_model_uses_its_cached_embeddings(ws, tmp_path):
    """eval.features as a local CLIP folder: the same figures come out, each image embedded once and cached by
    sha256 (here a tiny random model: the plumbing, not what it sees)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from loop.compare import unit_stats
    from loop.config import EvalConfig
    from loop.features import model_slug

    folder = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)  # fmt: skip
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    ec = EvalConfig(features=str(folder))
    with ws.store() as store:
        collapse_workspace(ws, store)
        first = unit_stats(ws, store, [0, 1, 2], ec=ec, **QUIET)
        again = unit_stats(ws, store, [0, 1, 2], ec=ec, **QUIET)
        shas = {r["sha256"] for r in store.images()}
    cached = {p.stem for p in (ws.root / "cache" / "features" / model_slug(str(folder))).glob("*.npy")}
    assert cached == shas  # every image of every unit (the selections are unit 0's images)
    for a, b in zip(first, again):
        assert a["selection_by_prompt"] == b["selection_by_prompt"] and a["coverage_share"] == b["coverage_share"]
    assert set(first[1]["selection_by_prompt"]) == set(PROMPTS) and first[1]["coverage_share"] is not None
