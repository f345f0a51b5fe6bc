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

import pytest

from loop.workspace import atomic_write


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
