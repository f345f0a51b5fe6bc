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
    assert table.splitlines()[0].split()[:8] == ["unit", "images", "rated", *TIERS]
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
    assert im.size == (GRID_LABEL_W + 2 * cw, GRID_LABEL_H + 2 * ch)
    a = np.asarray(im)
    assert tuple(a[GRID_LABEL_H + 5, GRID_LABEL_W + 5]) == (255, 0, 0)
    assert tuple(a[GRID_LABEL_H + ch + 5, GRID_LABEL_W + 5]) == (0, 0, 255)
    assert tuple(a[GRID_LABEL_H + ch - 1, GRID_LABEL_W + 2 * cw - 1]) == (0, 0, 255)


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
