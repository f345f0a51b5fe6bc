import json

import numpy as np
import pytest
from PIL import Image

from loop.errors import LoopError
from loop.generate import generate, parse_line, read_prompts
from loop.images import read_meta
from loop.workspace import TMP_MARK, recover, sha256_file


def test_parse_line_overrides():
    line = parse_line('a red circle --n 3 --seed 7 --cfg 5.5 --neg "blue, dark" --steps 9 --w 64 --h 32', 4)
    assert (line.text, line.n, line.seed, line.cfg, line.neg, line.steps, line.w, line.h) == (
        "a red circle",
        3,
        7,
        5.5,
        "blue, dark",
        9,
        64,
        32,
    )


@pytest.mark.parametrize("raw, words", [("a --n x", ["--n", "x"]), ("a --zoom 2", ["--zoom"]), ("a --n -1", ["--n"])])
def test_parse_line_bad_option(raw, words):
    with pytest.raises(ValueError) as e:
        parse_line(raw, 1)
    for w in words:
        assert w in str(e.value)


def test_read_prompts_skips_comments_and_reports_bad_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# comment\n\n猫 🐱\na square --n zero\na ring --n 2\n", encoding="utf-8")
    lines, problems = read_prompts(p)
    assert [ln.text for ln in lines] == ["猫 🐱", "a ring"]
    assert len(problems) == 1 and "prompts.txt:4" in problems[0]


def test_read_prompts_not_utf8_line_is_skipped_and_named(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"\xef\xbb\xbfa circle\n" + b"\xff\xfe bad\n" + "夕焼け 🌅\n".encode())
    lines, problems = read_prompts(p)
    assert [ln.text for ln in lines] == ["a circle", "夕焼け 🌅"]  # the BOM is not part of the prompt
    assert len(problems) == 1 and "prompts.txt:2" in problems[0] and "UTF-8" in problems[0]


@pytest.mark.parametrize(
    "content, words",
    [(None, ["no prompt file"]), (b"", ["no usable prompts"]), (b"# only\n\n", ["no usable prompts"]),
     (b"\xff\n", ["prompts.txt:1", "UTF-8"]), (b"x --n 0\n", ["prompts.txt:1", "--n"])],
)  # fmt: skip
def test_unusable_prompt_file_is_one_clear_error(tmp_path, content, words):
    p = tmp_path / "prompts.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(LoopError) as e:
        read_prompts(p)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_generate_writes_pngs_with_metadata_and_rows(ws, cfg):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        out = generate(ws, store, cfg, unit=0, log=lambda m: None)
        rows = store.images(unit=0)
    assert out["made"] == 8 == len(rows)
    files = sorted(ws.generations(0).glob("*.png"))
    assert len(files) == 8
    assert not list(ws.generations(0).glob(f"*{TMP_MARK}*"))
    for row in rows:
        path = ws.root / row["path"]
        assert sha256_file(path) == row["sha256"]
        with Image.open(path) as im:
            params = im.info["parameters"]
            meta = json.loads(im.info["loop"])
        assert params.splitlines()[0] == row["prompt"]
        assert f"Seed: {row['seed']}" in params and "Steps: 4" in params and "Sampler: DPM++ 2M" in params
        assert meta["unit"] == 0 and meta["seed"] == row["seed"] and meta["parent"] is None
    # image k of a prompt uses seed + k
    assert sorted(r["seed"] for r in rows if r["prompt"] == "a circle") == [0, 1, 2, 3]


def test_same_seed_same_image_and_different_seeds_vary(ws, cfg):
    ws.prompts_path.write_text("a circle --n 2 --seed 5\n")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate(ws, store, cfg, unit=0, log=lambda m: None)
        first = {r["seed"]: r["sha256"] for r in store.images()}
        # a second workspace-free pass: drop the rows and files, generate again
        for r in store.images():
            (ws.root / r["path"]).unlink()
        store.db.execute("DELETE FROM images")
        generate(ws, store, cfg, unit=0, log=lambda m: None)
        second = {r["seed"]: r["sha256"] for r in store.images()}
    assert first == second
    assert first[5] != first[6]


def test_guidance_rescale_changes_the_image_and_is_recorded(ws):
    """generate.guidance_rescale reaches the pipeline (other pixels at the same seed) and is written into the PNG,
    in the loop chunk and in the A1111 parameters."""
    from conftest import FAST

    from loop.config import load_config

    ws.prompts_path.write_text("a circle --n 2 --seed 5\n")
    made = {}
    for phi in (0.0, 0.7):
        cfg = load_config(ws.root, [*FAST, f"generate.guidance_rescale={phi}", "generate.cfg=7"])
        with ws.store() as store:
            store.ensure_base_unit("embedded")
            for r in store.images():  # a fresh pass at the same seeds
                (ws.root / r["path"]).unlink()
            store.db.execute("DELETE FROM images")
            generate(ws, store, cfg, unit=0, log=lambda m: None)
            made[phi] = []
            for r in sorted(store.images(), key=lambda r: r["seed"]):
                with Image.open(ws.root / r["path"]) as im:
                    pixels, text = np.asarray(im.convert("RGB"), dtype=float), im.info["parameters"]
                made[phi].append((pixels, text, read_meta(ws.root / r["path"])))
    assert len(made[0.0]) == len(made[0.7]) == 2
    for (plain, t0, m0), (rescaled, t1, m1) in zip(made[0.0], made[0.7]):
        assert np.abs(plain - rescaled).mean() > 1.0  # not the same picture
        assert m1["guidance_rescale"] == 0.7 and "guidance_rescale" not in m0
        assert "Rescale CFG: 0.7" in t1 and "Rescale CFG" not in t0
    with pytest.raises(LoopError, match="generate.guidance_rescale"):
        load_config(ws.root, ["generate.guidance_rescale=1.5"])


def test_generate_resumes_instead_of_redoing(ws, cfg):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate(ws, store, cfg, unit=0, log=lambda m: None)
        again = generate(ws, store, cfg, unit=0, log=lambda m: None)
    assert again["made"] == 0


def test_recover_adopts_orphan_png_and_removes_temp_files(ws, cfg):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate(ws, store, cfg, unit=0, log=lambda m: None)
        victim = store.images()[0]
        # simulate a crash after the rename but before the row: drop the row; and leave a temp file behind
        store.db.execute("DELETE FROM images WHERE id = ?", (victim["id"],))
        tmp = ws.generations(0) / f".x.png{TMP_MARK}123"
        tmp.write_bytes(b"half")
        out = recover(ws, store, log=lambda m: None)
        assert out == {"removed": 1, "adopted": 1, "golden": 0}
        assert not tmp.exists()
        rows = {r["sha256"]: r for r in store.images()}
        assert victim["sha256"] in rows
        assert rows[victim["sha256"]]["seed"] == victim["seed"]
        assert len(rows) == len(list(ws.generations(0).glob("*.png")))


def test_samples_vary_with_prompt_and_seed(base_pipe):
    """The embedded model is trained: a colour word sets the shape's colour, and the seed varies the rest."""
    import torch

    from loop.images import preference_score

    def warmth(prompt):
        g = [torch.Generator().manual_seed(s) for s in range(6)]
        ims = base_pipe([prompt] * 6, num_inference_steps=10, guidance_scale=4.0, generator=g, output_type="np").images
        ims = (ims * 255).astype(np.uint8)
        centre = [preference_score(im[12:20, 12:20], "warm") for im in ims]  # where the shape is
        whole = [preference_score(im, "warm") for im in ims]
        return np.mean(centre), np.std(whole)

    red_centre, red_spread = warmth("a big red circle")
    blue_centre, _ = warmth("a big blue circle")
    assert red_centre > blue_centre + 100
    assert red_spread > 10  # a random-init tiny model gives a spread of about 0.1


def test_read_meta_none_for_foreign_png(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(p)
    assert read_meta(p) is None
