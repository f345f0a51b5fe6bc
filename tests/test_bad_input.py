"""Nothing lost on bad input: every item of the bad-input corpus (tests/data/bad/make_bad.py) gives one clear
line that says what to do, the rest of the work goes on, and nothing is left half-written.

Import and config errors run the real `python -m loop` in a subprocess (cheap: no model is loaded); the items
that need the model go through the same entry point in-process (cli.entry), which returns the exit code.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loop.cli import entry
from loop.workspace import TMP_MARK, sha256_file

sys.path.insert(0, str(Path(__file__).parent / "data" / "bad"))
from make_bad import BAD_ARGS, BAD_IMAGES, GOOD_PROMPTS, ODD_IMAGES, make_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEN = ["generate.steps=2", "generate.images_per_prompt=1", "generate.batch_size=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("bad"), lora=False)


def loop_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "loop", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def one_error(err: str) -> str:
    """The single `error: ...` line of a failed command (no traceback, nothing else)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def consistent(ws) -> list:
    """Every image row has its file (with that sha256), every stored file its row, and no temporary file."""
    with ws.store() as store:
        rows = store.db.execute("SELECT path, sha256 FROM images").fetchall()
    files = {ws.rel(p) for d in ("generations", "golden") for p in (ws.root / d).rglob("*") if p.is_file()}
    files -= {ws.rel(ws.root / d / n) for d in ("generations", "golden") for n in ("README.md", ".gitkeep")}
    assert files == {r["path"] for r in rows}, "a file without its row, or a row without its file"
    for r in rows:
        assert sha256_file(ws.root / r["path"]) == r["sha256"]
    leftovers = [p for p in ws.root.rglob("*") if TMP_MARK in p.name or p.suffix == ".tmp"]
    assert not leftovers, f"temporary files left: {leftovers}"
    return rows


# -- images ----------------------------------------------------------------------------------------------------
def test_import_skips_each_bad_image_with_one_line_and_imports_the_rest(ws, corpus, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    for name in BAD_IMAGES + ODD_IMAGES:
        shutil.copy(corpus[name], src / name)
    Image.new("RGB", (30, 30), (200, 40, 30)).save(src / "good.png")

    r = loop_cli("import", src, "--tier", "UR", "-w", ws.root)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    # stderr holds one warning only: none of them has a caption (so they train with the empty one)
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("warning: 5 imported image(s) have no caption"), r.stderr
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == len(BAD_IMAGES)
    for name in BAD_IMAGES:
        (line,) = [ln for ln in skipped if ln.startswith(f"skipped {name}: ")]
        assert ";" in line  # the reason, then what to do
    said = {ln.split(":")[0].split()[1]: ln for ln in skipped}
    assert "empty" in said["empty.png"]
    assert "cut off" in said["truncated.png"]
    assert "not an image" in said["text.png"]
    assert "too many pixels" in said["bomb.png"] and "10000000000" in said["bomb.png"]
    assert "imported 5 image(s)" in r.stdout and "4 skipped" in r.stdout

    rows = consistent(ws)
    assert len(rows) == 5
    with ws.store() as store:
        names = {json.loads(row["params"])["original_name"]: row for row in store.images()}
    assert set(names) == {"good.png", *ODD_IMAGES}
    assert {row["tier"] for row in names.values()} == {"UR"}
    assert names["good.png"]["sha256"] == sha256_file(src / "good.png")  # a plain PNG is kept byte for byte


def _import_one(ws, path):
    assert entry(["import", str(path), "-w", str(ws.root)]) == 0
    assert len(consistent(ws)) == 1
    (row,) = _images(ws)
    with Image.open(ws.root / row["path"]) as im:
        im.load()
    return im, json.loads(row["params"])


def test_cmyk_jpeg_is_stored_as_rgb(ws, corpus):
    im, params = _import_one(ws, corpus["cmyk.jpg"])
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 24)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 100 and b < 100  # red, as any viewer shows the CMYK file
    assert params["format"] == "JPEG" and params["converted"] == ["CMYK to 8-bit RGB"]


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(ws, corpus):
    im, params = _import_one(ws, corpus["gray16.png"])
    assert im.mode == "RGB" and im.size == (48, 32)
    ramp = np.asarray(im)[0, :, 0].astype(int)
    assert ramp[0] == 0 and ramp[-1] == 255 and abs(ramp.mean() - 127.5) < 2
    assert np.all(np.diff(ramp) >= 0)  # still a ramp
    assert params["converted"] == ["I;16 to 8-bit RGB"]


def test_exif_rotated_jpeg_is_stored_upright(ws, corpus):
    im, params = _import_one(ws, corpus["exif6.jpg"])
    assert im.size == (20, 40)  # orientation 6: the 40x20 file is shown 20 wide, 40 high
    with ws.store() as store:
        row = store.images()[0]
    assert (row["width"], row["height"]) == (20, 40)
    top, bottom = np.asarray(im)[5, 10], np.asarray(im)[35, 10]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # the red left half is now on top
    assert params["converted"] == ["EXIF orientation applied"]


def test_animated_gif_keeps_its_first_frame(ws, corpus):
    im, params = _import_one(ws, corpus["animated.gif"])
    assert im.format == "PNG" and im.size == (24, 24)
    assert tuple(np.asarray(im.convert("RGB"))[0, 0]) == (255, 0, 0)
    assert params["format"] == "GIF" and params["converted"] == ["first of 3 frames"]


# -- configs and command-line values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "item, words",
    [
        ("wrong_type.yaml", ["generate.steps", "'many'", "loop.yaml", "whole number", "20"]),
        ("unknown_key.yaml", ["generate.stepz", "4", "loop.yaml", "did you mean generate.steps"]),
    ],
)
def test_bad_yaml_is_one_line_naming_file_key_and_value(ws, corpus, capsys, item, words):
    shutil.copy(corpus[item], ws.root / "configs" / "loop.yaml")
    r = loop_cli("config", "-w", ws.root)
    assert r.returncode == 2
    line = one_error(r.stderr)
    for w in words:
        assert w in line
    assert entry(["generate", "-w", str(ws.root)]) == 2  # the same line from a command that would record work
    assert one_error(capsys.readouterr().err) == line
    assert not consistent(ws)
    with ws.store() as store:
        assert not store.units()  # nothing recorded by a command that could not start


@pytest.mark.parametrize("item", ["negative_images_per_prompt", "negative_count"])
def test_negative_counts_are_refused_before_any_work(ws, capsys, item):
    assert entry([BAD_ARGS[item][0], "-w", str(ws.root), *BAD_ARGS[item][1:]]) == 2
    line = one_error(capsys.readouterr().err)
    assert "-3" in line or "-5" in line
    assert "positive" in line
    with ws.store() as store:
        assert not store.units()
    consistent(ws)


def test_missing_model_is_one_line_and_records_nothing(ws, capsys):
    assert entry([BAD_ARGS["missing_model"][0], "-w", str(ws.root), *BAD_ARGS["missing_model"][1:]]) == 2
    line = one_error(capsys.readouterr().err)
    assert "model.base='/nonexistent/model'" in line and "no such folder" in line and "embedded" in line
    with ws.store() as store:
        assert not store.units()  # unit 0 is not recorded with a base model that isn't there
    # the workspace still works with the right model afterwards
    assert entry(["generate", "-w", str(ws.root), *GEN]) == 0
    with ws.store() as store:
        assert store.unit(0)["base"] == "embedded"
    assert len(consistent(ws)) == 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["import"], ["Missing argument", "import --help"]),
        (["generate", "--nope"], ["No such option: --nope", "generate --help"]),
        (["generate", "--count", "many"], ["--count", "integer", "loop generate --help"]),
    ],
)
def test_usage_errors_are_one_line(ws, capsys, argv, words):
    assert entry([*argv, "-w", str(ws.root)]) == 2
    line = one_error(capsys.readouterr().err)
    for w in words:
        assert w in line


# -- prompt files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "item, words, ring",
    [
        ("latin1_prompts.txt", ["prompts.txt:2: not UTF-8", "save the file as UTF-8"], False),
        ("long_prompts.txt", ["prompts.txt:2: 1,048,576 characters", "over the 10,000", "shorten it"], True),
    ],
)
def test_a_bad_prompt_line_is_skipped_with_one_line_and_the_good_lines_generate(ws, corpus, capsys, item, words, ring):
    shutil.copy(corpus[item], ws.prompts_path)
    assert entry(["generate", "-w", str(ws.root), *(["--count", "2"] if ring else []), *GEN]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    warnings = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, warnings
    for w in words:
        assert w in warnings[0]
    assert len(warnings[0]) < 300  # the 1 MB line is not echoed back
    rows = consistent(ws)
    assert sorted(r["prompt"] for r in _images(ws)) == sorted(GOOD_PROMPTS)
    assert len(rows) == 2


def _images(ws):
    with ws.store() as store:
        return store.images()


# -- a LoRA from another base model ----------------------------------------------------------------------------
def test_lora_from_another_base_model_is_one_line_and_writes_nothing(ws, tmp_path, capsys):
    from make_bad import other_base_lora

    folder = ws.checkpoint(1)
    other_base_lora(folder)
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        store.add_unit(
            1, parent=0, path=ws.rel(folder), base="embedded", method="lora", strategy="golden", manifest={}
        )
    assert entry(["generate", "-w", str(ws.root), "--unit", "1", *GEN]) == 2
    out = capsys.readouterr()
    line = one_error(out.err)
    assert "unit 1's adapter" in line and "unit_001" in line and "another base model" in line
    assert "[4, 128] in the file, [4, 64] in the model" in line
    assert not consistent(ws)
    assert not list((ws.root / "generations").glob("unit_001/*"))
