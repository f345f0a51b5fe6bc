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
    from loop.images import SAMPLER_NAMES, schedule_type
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
        # the schedule it names is the one the pipeline steps through (A1111 reads a missing one as Karras)
        assert info["Schedule type"] == schedule_type(pipe.scheduler.config, row["sampler"]) == "SGM Uniform"
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


# -- the latent cache ------------------------------------------------------------------------------------------
def _images_in(ws, n: int) -> list[dict]:
    """`n` random-noise PNGs in the workspace, as training items (sha256 and workspace-relative path)."""
    import io

    from loop.workspace import sha256_bytes

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        path = atomic_write(ws.generations(0) / f"{i}.png", data)
        items.append({"id": i, "sha256": sha256_bytes(data), "path": ws.rel(path), "caption": "noise"})
    return items


def _changed_vae(pipe, which: str):
    """The pipeline with another VAE of the same config: every weight moved, or only the encoder's last layer (the
    one that makes the latents; the first weights, which a cheap fingerprint might look at, stay the same)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.vae.named_parameters():
            if which == "all" or name.startswith("quant_conv."):
                p.add_(torch.randn_like(p) * 0.1)
    return pipe


@pytest.mark.parametrize("vae_change", ["all", "last encoder layer"])
def test_the_latent_cache_misses_when_the_resolution_or_the_vae_changes(ws, vae_change):
    from loop.config import ModelConfig
    from loop.models import load_base
    from loop.train import encode_latents

    items = _images_in(ws, 3)
    pipe = load_base(ModelConfig())
    first, kept, stats = encode_latents(ws, pipe, items, 32, "embedded", log=lambda m: None)
    assert len(kept) == 3 and stats == {"cache_hits": 0, "cache_misses": 3}
    again, _, stats = encode_latents(ws, pipe, items, 32, "embedded", log=lambda m: None)
    assert stats == {"cache_hits": 3, "cache_misses": 0}  # the cache is used at all
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    # another training resolution: encoded again, at that size
    small, _, stats = encode_latents(ws, pipe, items, 16, "embedded", log=lambda m: None)
    assert stats == {"cache_hits": 0, "cache_misses": 3}
    assert small[0].shape[-2:] == tuple(s // 2 for s in first[0].shape[-2:])

    # another VAE (same model.base, same config, other weights): encoded again, by that VAE
    other = _changed_vae(load_base(ModelConfig()), vae_change)
    theirs, _, stats = encode_latents(ws, other, items, 32, "embedded", log=lambda m: None)
    assert stats == {"cache_hits": 0, "cache_misses": 3}
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(first, theirs))
    from loop.train import load_square

    with torch.no_grad():
        x = load_square(ws.root / items[0]["path"], 32).unsqueeze(0)
        direct = other.vae.encode(x).latent_dist.mean[0] * other.vae.config.scaling_factor
    assert torch.allclose(theirs[0], direct, atol=1e-5)

    # and each VAE still finds its own encodings
    assert encode_latents(ws, pipe, items, 32, "embedded", log=lambda m: None)[2]["cache_hits"] == 3
    assert encode_latents(ws, other, items, 32, "embedded", log=lambda m: None)[2]["cache_hits"] == 3
