"""The promises users rely on, each held by a test that fails when a plausible bug breaks it.

- An image re-renders from what its row and its PNG record (prompt, negative prompt, seed, steps, CFG, size,
  sampler): "Send to txt2img" must reproduce it.
- atomic_write: a write that fails part-way leaves the old file whole and no temporary file behind; a link at the
  destination is replaced, never written through.
- The latent cache misses when the training resolution or the VAE changes.
"""

import os
import resource
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from loop.workspace import atomic_write


# -- re-render from the record ---------------------------------------------------------------------------------
def _infotext(path) -> dict:
    """What AUTOMATIC1111's PNG Info reads from the `parameters` chunk (parse_generation_parameters' split):
    Prompt, Negative prompt and each `Key: value` of the settings line."""
    from loop.images import A1111_PARAM

    with Image.open(path) as im:
        text = im.info["parameters"]
    *lines, last = text.strip().split("\n")
    assert len(A1111_PARAM.findall(last)) >= 3, text
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {k: v[1:-1] if v.startswith('"') else v for k, v in A1111_PARAM.findall(last)}
    return {**out, "Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}


def test_every_image_re_renders_from_what_its_row_and_png_record(ws, cfg):
    """ "Send to txt2img": the prompt, negative prompt, seed, steps, CFG, size and sampler an image records (in its
    row and in its PNG) give that image again, through a fresh pipeline, one image at a time."""
    from loop.generate import generate
    from loop.images import SAMPLER_NAMES
    from loop.models import load_unit, set_scheduler

    # one line with the defaults, one with every per-line setting its own
    ws.prompts_path.write_text('a circle\na square --n 3 --seed 40 --cfg 6 --steps 3 --neg "blue" --w 24 --h 40\n')
    with ws.store() as store:
        generate(ws, store, cfg, 0, log=lambda m: None)
        rows = store.images()
    assert len(rows) == 4 + 3
    assert sorted(r["seed"] for r in rows) == [0, 1, 2, 3, 40, 41, 42]

    pipe = load_unit(cfg.model, ws.checkpoint(0), 0)
    by_label = {label: name for name, label in SAMPLER_NAMES.items()}
    for row in rows:
        png = ws.root / row["path"]
        info = _infotext(png)
        # the row and the PNG agree on every setting
        assert info["Prompt"] == row["prompt"] and info["Negative prompt"] == row["negative_prompt"]
        assert int(info["Seed"]) == row["seed"] and int(info["Steps"]) == row["steps"]
        assert float(info["CFG scale"]) == row["cfg"]
        assert info["Size"] == f"{row['width']}x{row['height']}"
        assert by_label[info["Sampler"]] == row["sampler"]
        width, height = (int(v) for v in info["Size"].split("x"))

        set_scheduler(pipe, by_label[info["Sampler"]])
        with torch.inference_mode():
            again = pipe(
                info["Prompt"],
                negative_prompt=info["Negative prompt"] or None,
                num_inference_steps=int(info["Steps"]),
                guidance_scale=float(info["CFG scale"]),
                width=width,
                height=height,
                generator=torch.Generator(pipe.device).manual_seed(int(info["Seed"])),
                output_type="np",
            ).images[0]
        with Image.open(png) as im:
            made = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        assert made.shape == again.shape == (height, width, 3)
        diff = np.abs(made - again).max() * 255
        assert diff <= 3, f"image {row['id']} (seed {row['seed']}) is not what its record re-renders: {diff:.0f}/255"


# -- atomic_write ----------------------------------------------------------------------------------------------
def _fail_part_way(monkeypatch, where: str):
    """Make the next write fail at `where`: "write" (the disk fills after 1,000 bytes: RLIMIT_FSIZE, so the OS
    itself refuses the rest, whatever API writes), "fsync", or "replace"."""
    if where == "write":
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old_limit[1]))
        return lambda: (
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit),
            signal.signal(signal.SIGXFSZ, old_handler),
        )

    def boom(*args, **kwargs):
        raise OSError(5, f"simulated failure in os.{where}")

    monkeypatch.setattr(os, where, boom)
    return monkeypatch.undo


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_write_that_fails_part_way_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    folder = tmp_path / "configs"
    folder.mkdir()
    target = folder / "loop.yaml"
    old = b"model:\n  base: embedded\n"
    target.write_bytes(old)
    new = b"x" * 50_000

    restore = _fail_part_way(monkeypatch, where)
    try:
        with pytest.raises(OSError):
            atomic_write(target, new)
    finally:
        restore()

    assert target.read_bytes() == old, "the old file must stay whole when a write fails"
    assert sorted(p.name for p in folder.iterdir()) == ["loop.yaml"], "no temporary file may be left behind"
    atomic_write(target, new)  # and the next write goes through
    assert target.read_bytes() == new
    assert sorted(p.name for p in folder.iterdir()) == ["loop.yaml"]


def test_a_link_at_the_destination_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.txt"  # e.g. a file the link's planter wants overwritten
    outside.write_text("keep me", encoding="utf-8")
    folder = tmp_path / "golden"
    folder.mkdir()
    link = folder / "abc.png"
    link.symlink_to(outside)

    atomic_write(link, b"new bytes")

    assert not link.is_symlink() and link.read_bytes() == b"new bytes"
    assert outside.read_text(encoding="utf-8") == "keep me", "the link's target must be untouched"
    assert sorted(p.name for p in folder.iterdir()) == ["abc.png"]
    # a link to a folder is replaced too, not followed into it
    other = tmp_path / "other"
    other.mkdir()
    dlink = folder / "d.txt"
    dlink.symlink_to(other, target_is_directory=True)
    atomic_write(dlink, "text")
    assert not dlink.is_symlink() and dlink.read_text(encoding="utf-8") == "text" and not any(other.iterdir())


def test_atomic_write_keeps_the_mode_a_plain_open_gives(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "é")
    assert path.read_text(encoding="utf-8") == "é"
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
