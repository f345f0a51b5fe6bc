"""The command line for import, export, export-lora, compare and init --seed-images (in-process)."""

from PIL import Image

from loop.cli import entry, parse_units


def test_import_then_export_golden_through_the_cli(ws, tmp_path, capsys):
    src = tmp_path / "mine"
    src.mkdir()
    Image.new("RGB", (40, 30), (200, 50, 40)).save(src / "a.png")
    (src / "a.txt").write_text("a red thing")
    (src / "broken.png").write_bytes(b"not a png")
    assert entry(["import", str(src), "--tier", "UR", "--source", "mine", "-w", str(ws.root)]) == 0
    out = capsys.readouterr()
    assert "imported 1 image(s)" in out.out and "1 skipped" in out.out and "broken.png" in out.out + out.err
    assert out.out.count("imported") == 1  # one summary, not two
    assert entry(["export", "--set", "golden", "--out", str(tmp_path / "ds"), "-w", str(ws.root)]) == 0
    lines = (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"a red thing"' in lines[0]
    Image.new("RGB", (20, 20), (10, 200, 40)).save(src / "b.png")
    assert entry(["import", str(src), "--tier", "ur", "-w", str(ws.root)]) == 0  # as `--set ur` is taken
    with ws.store() as store:
        assert store.tier_counts().get("UR") == 2
    assert entry(["import", str(src), "--tier", "XR", "-w", str(ws.root)]) == 2
    assert "--tier 'XR'" in capsys.readouterr().err


def test_an_import_where_every_file_is_unreadable_fails(ws, tmp_path, capsys):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    (src / "b.jpg").write_bytes(b"")
    assert entry(["import", str(src), "--tier", "UR", "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert "nothing was imported" in err and "all 2 file(s) were unreadable" in err
    with ws.store() as store:
        assert store.images() == []


def test_export_lora_of_the_base_unit_is_one_clear_error(ws, capsys):
    assert entry(["export-lora", "--unit", "0", "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_init_with_seed_images(tmp_path, capsys):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    Image.new("RGB", (32, 32), (220, 120, 40)).save(seeds / "one.png")
    assert entry(["init", str(tmp_path / "w"), "--seed-images", str(seeds)]) == 0
    assert "1 seed image(s)" in capsys.readouterr().out
    from loop.workspace import Workspace

    with Workspace.open(tmp_path / "w").store() as store:
        rows = store.images()
    assert len(rows) == 1 and rows[0]["source"] == "seed" and rows[0]["tier"] == "UR"


def test_parse_units():
    assert parse_units("0..3", [0, 1]) == [0, 1, 2, 3]
    assert parse_units("0,2", [0, 1, 2]) == [0, 2]
    assert parse_units(None, [2, 0, 1]) == [0, 1, 2]
    import pytest

    from loop.errors import LoopError

    with pytest.raises(LoopError, match="--units"):
        parse_units("a..b", [0])


def test_commands_that_read_no_config_still_take_and_check_overrides(ws, tmp_path, capsys):
    """DESIGN.md: every command takes trailing key=value overrides; status, import, export and export-lora read no
    config, so they check them (one wrapper can pass the same ones to every command) and a typo is refused."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (40, 30), (20, 50, 240)).save(src / "b.png")
    w = ["-w", str(ws.root)]
    assert entry(["status", *w, "train.rank=4"]) == 0
    assert entry(["import", str(src), "--tier", "UR", *w, "train.rank=4"]) == 0
    assert entry(["export", "--out", str(tmp_path / "ds"), *w, "train.rank=4"]) == 0
    capsys.readouterr()
    for argv in (
        ["status", *w, "train.rnak=4"],
        ["import", str(src), *w, "train.rnak=4"],
        ["export", "--out", str(tmp_path / "ds2"), *w, "train.rnak=4"],
        ["export-lora", "--unit", "1", *w, "train.rnak=4"],
    ):
        assert entry(argv) == 2, argv
        assert "unknown config key train.rnak=4" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists()  # refused before anything was written
    # without overrides they read no config at all: a broken configs/loop.yaml does not stop them
    (ws.root / "configs" / "loop.yaml").write_text("train: [unclosed\n")
    assert entry(["status", *w]) == 0
    assert entry(["export", "--out", str(tmp_path / "ds3"), *w]) == 0


def test_status_counts_imported_images_and_shows_the_last_process_layouts_rings(ws, tmp_path):
    from loop.status import format_status

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 90, 40, 40)).save(src / f"{i}.png")
    assert entry(["import", str(src), "--tier", "UR", "-w", str(ws.root)]) == 0
    with ws.store() as store:
        store.set_state("ring/0of1", {"index": 0, "text": "a circle", "cycle": 3})
        store.db.execute("UPDATE state SET updated_at = updated_at - 3600 WHERE key = 'ring/0of1'")
        store.db.commit()
        for k in (0, 1):  # a later `--processes 2` run
            store.set_state(f"ring/{k}of2", {"index": k, "text": ["a square", "a ring"][k], "cycle": 5})
    out = format_status(ws)
    imported = next(ln.split() for ln in out.splitlines() if ln.split()[2:3] == ["imported"])
    assert imported == ["-", "-", "imported", "3", "3", "3", "0", "0", "0", "0", "-"]  # images, rated, UR..N
    assert "process 0 of 2" in out and "process 1 of 2" in out and "process 0 of 1" not in out


def test_status_columns_stay_aligned_with_a_custom_diffusion_unit(ws):
    from loop.status import format_status

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        store.add_unit(1, parent=0, path="checkpoints/unit_001", base="embedded", method="custom_diffusion",
                       strategy="converge", manifest={})  # fmt: skip
    lines = format_status(ws).splitlines()
    head = next(ln for ln in lines if ln.lstrip().startswith("unit"))
    rows = [ln for ln in lines if ln[:4].strip().isdigit()]
    assert len(rows) == 2
    end = head.index("images") + len("images") - 1
    for ln in rows:  # every row as long as the heading, its image count ending under "images"
        assert len(ln) == len(head), (head, ln)
        assert ln[end].isdigit() and ln[end + 1] == " ", (head, ln)
