"""Mistakes people make on the command line: each is one `error: ` line (exit 2), or one line per skipped
thing while the rest of the work goes on, never a traceback (in-process, through loop.cli.entry)."""

import hashlib
import json
import shutil

import pytest
from PIL import Image

from loop.cli import entry, parse_units
from loop.errors import LoopError

QUICK = ["generate.steps=2", "generate.images_per_prompt=1", "generate.batch_size=2"]


def sql_count(ws, query: str) -> int:
    with ws.store() as store:
        return store.db.execute(query).fetchone()[0]


def one_error(capsys, *words) -> str:
    """The stderr of the command just run: exactly one line, `error: ...`, naming every word."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _generated(ws, store, name: str, color, round_: int = 0) -> int:
    """A generated-looking PNG (with its loop metadata) in generations/unit_000 and its row."""
    from loop.images import png_bytes
    from loop.workspace import sha256_bytes

    meta = dict(prompt="a circle", seed=len(name), unit=0, round=round_, source="generated", width=16, height=16)
    data = png_bytes(Image.new("RGB", (16, 16), color), meta)
    path = ws.generations(0) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    cols = {k: meta[k] for k in ("seed", "unit", "round", "width", "height")}
    return store.add_image(sha256=sha256_bytes(data), path=ws.rel(path), prompt="a circle", params=meta, **cols)


def _import_ur(ws, tmp_path, colors=((200, 40, 30),), name="mine") -> list:
    src = tmp_path / name
    src.mkdir()
    for i, c in enumerate(colors):
        Image.new("RGB", (24, 24), c).save(src / f"{i}.png")
    assert entry(["import", str(src), "--tier", "UR", "-w", str(ws.root)]) == 0
    with ws.store() as store:
        return store.images()


# 1 -------------------------------------------------------------------------------------------------------------
def test_auto_rate_skips_cut_off_and_deleted_images_and_rates_the_rest(ws, capsys):
    with ws.store() as store:
        good = _generated(ws, store, "good.png", (220, 40, 20))
        cut = _generated(ws, store, "cut.png", (20, 40, 220))
        gone = _generated(ws, store, "gone.png", (120, 40, 20))
        store.finish_phase(0, "generate")
    data = (ws.generations(0) / "cut.png").read_bytes()
    (ws.generations(0) / "cut.png").write_bytes(data[: len(data) // 2])
    (ws.generations(0) / "gone.png").unlink()
    capsys.readouterr()
    assert entry(["rate", "--auto", "-w", str(ws.root)]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    said = [ln for ln in (out.out + out.err).splitlines() if "left unrated" in ln]
    assert len(said) == 2 and any("cut.png" in ln for ln in said) and any("gone.png" in ln for ln in said)
    with ws.store() as store:
        assert store.tier_of(good) is not None
        assert store.tier_of(cut) is None and store.tier_of(gone) is None


# 2 -------------------------------------------------------------------------------------------------------------
def test_a_seed_sqlite_cannot_hold_is_a_bad_line_or_a_bad_config_value(ws, capsys):
    from loop.prompts import MAX_SEED, read_prompts

    ws.prompts_path.write_text(
        "a circle --seed 99999999999999999999999\na square --seed -1\na ring --seed 9223372036854775807\n"
    )
    lines, problems = read_prompts(ws.prompts_path)
    assert [ln.text for ln in lines] == ["a ring"] and lines[0].seed == MAX_SEED
    assert len(problems) == 2 and all("--seed must be between 0 and" in p for p in problems)
    for key in ("generate.seed=9223372036854775808", "train.seed=-3"):
        assert entry(["config", "-w", str(ws.root), key]) == 2
        one_error(capsys, key.split("=")[0], "must be between 0 and 9223372036854775807")


def test_seeds_past_the_top_wrap_round_instead_of_overflowing_sqlite():
    from loop.config import GenerateConfig
    from loop.generate import line_jobs
    from loop.prompts import MAX_SEED, PromptLine

    jobs = line_jobs(PromptLine("a", 1, n=3, seed=MAX_SEED), GenerateConfig(), 32)
    assert [j.seed for j in jobs] == [MAX_SEED, 0, 1]


# 3, 14 ---------------------------------------------------------------------------------------------------------
def test_fit_size_keeps_the_aspect_and_the_native_size():
    from loop.generate import fit_size

    assert fit_size((6000, 4000), 512, 64) == (512, 320)
    assert fit_size((4000, 6000), 32, 8) == (16, 32)
    assert fit_size((24, 24), 32, 8) == (24, 24)  # a small image is left at its size
    assert fit_size((100, 3), 32, 8) == (32, 8)


def test_vary_of_a_large_photo_renders_at_the_model_size(ws, tmp_path, capsys):
    src = tmp_path / "photo"
    src.mkdir()
    Image.new("RGB", (1200, 800), (200, 120, 40)).save(src / "big.jpg", quality=80)
    assert entry(["import", str(src), "-w", str(ws.root)]) == 0
    with ws.store() as store:
        (parent,) = store.images()
    assert entry(["vary", str(parent["id"]), "--n", "1", "-w", str(ws.root), *QUICK]) == 0
    with ws.store() as store:
        (child,) = store.children(parent["id"])
    assert (child["width"], child["height"]) == (32, 16)


def test_vary_that_makes_nothing_fails_with_one_line(ws, tmp_path, capsys):
    rows = _import_ur(ws, tmp_path)
    (ws.root / rows[0]["path"]).write_bytes(b"not an image any more")
    capsys.readouterr()
    assert entry(["vary", str(rows[0]["id"]), "--n", "1", "-w", str(ws.root), *QUICK]) == 2
    err = capsys.readouterr().err  # (the progress bar's lines, then the error)
    assert err.splitlines()[-1].startswith("error: no variation") and "Traceback" not in err


def test_vary_catches_a_render_error_per_parent(ws, tmp_path, capsys, monkeypatch):
    from loop.generate import Renderer

    def boom(self, batch, parent_images=None):
        raise RuntimeError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore detail")

    monkeypatch.setattr(Renderer, "render", boom)
    rows = _import_ur(ws, tmp_path)
    capsys.readouterr()
    assert entry(["vary", str(rows[0]["id"]), "--n", "1", "-w", str(ws.root), *QUICK]) == 2
    out = capsys.readouterr()
    assert "could not be varied (CUDA out of memory. Tried to allocate 3.00 GiB)" in out.err
    assert out.err.splitlines()[-1].startswith("error: no variation") and "Traceback" not in out.err


# 4 -------------------------------------------------------------------------------------------------------------
def test_run_round_with_a_word_for_the_number(ws, capsys):
    assert entry(["run", "--round", "abc", "-w", str(ws.root)]) == 2
    one_error(capsys, "'abc'", "loop run --round 0")


# 5 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["status", "init"])
def test_a_loop_db_that_is_not_sqlite(tmp_path, capsys, command):
    (tmp_path / "w" / "configs").mkdir(parents=True)
    (tmp_path / "w" / "loop.db").write_text("these are my notes, not a database\n" * 20)
    args = ["status", "-w", str(tmp_path / "w")] if command == "status" else ["init", str(tmp_path / "w")]
    assert entry(args) == 2
    one_error(capsys, "is not a loop database", "move it aside")


# 6 -------------------------------------------------------------------------------------------------------------
def test_generate_with_a_unit_whose_weights_are_damaged(ws, capsys):
    weights = ws.checkpoint(1) / "pytorch_lora_weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\x00" * 100)
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        store.add_unit(1, parent=0, path=ws.rel(weights.parent), base="embedded", method="lora",
                       strategy="golden", manifest={})  # fmt: skip
    assert entry(["generate", "--unit", "1", "-w", str(ws.root), *QUICK]) == 2
    one_error(capsys, str(weights), "not a readable safetensors file", "retrain")


# 7 -------------------------------------------------------------------------------------------------------------
def test_paths_the_system_refuses_are_one_line(ws, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile.txt"
    afile.write_text("hello")
    assert entry(["init", str(afile)]) == 2
    one_error(capsys, "File exists", str(afile))
    _import_ur(ws, tmp_path)
    capsys.readouterr()
    assert entry(["export", "--out", str(afile / "sub"), "-w", str(ws.root)]) == 2
    one_error(capsys, str(afile))
    assert afile.read_text() == "hello"


def test_compare_checks_its_out_folder_before_rendering(ws, tmp_path, capsys, monkeypatch):
    import loop.compare

    def no_render(*a, **k):
        raise AssertionError("rendered before checking --out")

    monkeypatch.setattr(loop.compare, "compare", no_render)
    afile = tmp_path / "afile.txt"
    afile.write_text("hello")
    for out in (afile, afile / "sub"):
        assert entry(["compare", "--out", str(out), "-w", str(ws.root)]) == 2
        one_error(capsys, str(out))


def test_an_os_error_keeps_its_traceback_with_debug(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("hello")
    with pytest.raises(FileExistsError):
        entry(["--debug", "init", str(afile)])


# 8, 13 ---------------------------------------------------------------------------------------------------------
def test_compare_units_over_a_huge_or_backwards_range(ws, capsys):
    with pytest.raises(LoopError, match="more than 1000 units"):
        parse_units("0..10000000000", [0])
    with pytest.raises(LoopError, match="more than 1000 units"):
        parse_units(",".join(["0..900"] * 3), [0])
    assert entry(["compare", "--units", "0..10000000000", "-w", str(ws.root)]) == 2
    one_error(capsys, "more than 1000 units")
    assert entry(["compare", "--units", "3..1", "-w", str(ws.root)]) == 2
    line = one_error(capsys, "3..1", "--units 1..3")
    assert "loop compare 0 1" not in line
    assert entry(["compare", "--units", "0..5", "-w", str(ws.root)]) == 2  # units that were never made
    one_error(capsys, "unit 1 does not exist; units that can be compared here: 0")


def test_export_lora_of_a_unit_that_does_not_exist(ws, capsys):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
    assert entry(["export-lora", "--unit", "99", "-w", str(ws.root)]) == 2
    line = one_error(capsys, "unit 99 does not exist", "units: 0")
    assert "--round 98" not in line


# 9 -------------------------------------------------------------------------------------------------------------
def test_export_skips_damaged_files_and_refuses_an_out_in_the_workspace(ws, tmp_path, capsys):
    rows = _import_ur(ws, tmp_path, colors=((200, 40, 30), (30, 200, 40)))
    bad, good = rows
    (ws.root / bad["path"]).write_bytes(b"overwritten")
    capsys.readouterr()
    assert entry(["export", "--out", str(tmp_path / "ds"), "-w", str(ws.root)]) == 0
    out = capsys.readouterr()
    skipped = [ln for ln in out.out.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 1 and bad["path"] in skipped[0] and "sha256" in skipped[0]
    meta = [json.loads(ln) for ln in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert [m["sha256"] for m in meta] == [good["sha256"]]
    for name in (tmp_path / "ds").glob("*.png"):
        assert hashlib.sha256(name.read_bytes()).hexdigest() == good["sha256"]
    for inside in (ws.root / "generations" / "out", ws.root / "golden" / "x", ws.root):
        assert entry(["export", "--out", str(inside), "-w", str(ws.root)]) == 2
        one_error(capsys, "inside the workspace", "outside the workspace")
    assert not (ws.root / "generations" / "out").exists() and not (ws.root / "golden" / "x").exists()


# 10 ------------------------------------------------------------------------------------------------------------
def test_recover_does_not_claim_to_adopt_a_copy_of_a_known_image(ws):
    from loop.workspace import recover

    with ws.store() as store:
        _generated(ws, store, "a.png", (200, 40, 30))
        shutil.copy(ws.generations(0) / "a.png", ws.generations(0) / "copy.png")
        for _ in range(2):
            logs = []
            assert recover(ws, store, logs.append)["adopted"] == 0
            assert not any("adopted" in m for m in logs), logs
        assert len(store.images()) == 1


# 11 ------------------------------------------------------------------------------------------------------------
def test_import_of_an_empty_folder_or_of_the_workspace_fails(ws, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert entry(["import", str(tmp_path / "empty"), "-w", str(ws.root)]) == 2
    one_error(capsys, "no image files found in", "empty")
    for where in (ws.root, ws.root / "golden", tmp_path):
        assert entry(["import", str(where), "-w", str(ws.root)]) == 2
        one_error(capsys, "workspace", "import from a folder outside the workspace")


def test_import_with_a_tier_rates_an_image_that_is_already_here_unrated(ws, tmp_path, capsys):
    with ws.store() as store:
        image_id = _generated(ws, store, "a.png", (200, 40, 30))
        row = store.image(image_id)
    src = tmp_path / "again"
    src.mkdir()
    shutil.copy(ws.root / row["path"], src / "a.png")
    capsys.readouterr()
    assert entry(["import", str(src), "--tier", "UR", "-w", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "1 already there (1 of them unrated until now: rated UR)" in out
    with ws.store() as store:
        events = store.db.execute("SELECT tier, rater FROM ratings WHERE image_id = ?", (image_id,)).fetchall()
        assert [tuple(e) for e in events] == [("UR", "import")]
        assert store.tier_of(image_id) == "UR"
    assert list((ws.root / "golden").iterdir())  # a UR image is in golden/
    # a second import leaves the rating alone
    assert entry(["import", str(src), "--tier", "N", "-w", str(ws.root)]) == 0
    with ws.store() as store:
        assert store.tier_of(image_id) == "UR"


# 12 ------------------------------------------------------------------------------------------------------------
def test_init_with_bad_seed_images_lays_out_nothing(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    assert entry(["init", str(tmp_path / "w"), "--seed-images", str(bad)]) == 2
    one_error(capsys, "no readable image")
    assert not (tmp_path / "w").exists()
    assert entry(["init", str(tmp_path / "w2"), "--seed-images", str(tmp_path / "nothing")]) == 2
    one_error(capsys, "does not exist")
    assert not (tmp_path / "w2").exists()


def test_init_warns_about_more_than_five_seed_images(tmp_path, capsys):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i in range(7):
        Image.new("RGB", (16, 16), (30 * i, 40, 40)).save(seeds / f"{i}.png")
    assert entry(["init", str(tmp_path / "w"), "--seed-images", str(seeds)]) == 0
    out = capsys.readouterr()
    assert len([ln for ln in out.err.splitlines() if ln.startswith("warning: 7 seed images")]) == 1
    assert "warning" not in out.out  # warnings go to stderr, results to stdout


# 15 ------------------------------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(ws, capsys, monkeypatch):
    import loop.status

    def interrupted(ws):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.status, "format_status", interrupted)
    assert entry(["status", "-w", str(ws.root)]) == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["interrupted; run the same command again to continue (finished work is kept)"]


# 16 ------------------------------------------------------------------------------------------------------------
def test_config_of_a_folder_that_is_not_a_workspace(tmp_path, capsys):
    assert entry(["config", "-w", str(tmp_path / "nonexistent")]) == 2
    one_error(capsys, "does not exist")
    (tmp_path / "afile").write_text("x")
    assert entry(["config", "-w", str(tmp_path / "afile")]) == 2
    one_error(capsys, "not a folder")
    (tmp_path / "plain").mkdir()
    assert entry(["config", "-w", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr()
    assert "model:" in out.out and out.err.count("\n") == 1 and "not a loop workspace" in out.err


def test_finishing_the_rating_of_a_round_with_no_images_is_refused(ws, capsys):
    # it used to close the phase on 0/0, and the next `loop run --round` trained past images nobody had seen
    assert entry(["rate", "--finish", "-w", str(ws.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round 0 has no images yet" in err
    with ws.store() as store:
        assert not store.phase_done(0, "rate")


def test_finishing_the_rating_while_the_round_is_still_generating_is_refused(ws, capsys):
    # `loop run --round` killed mid-generate (or generating now): closing the ratings let the next run make the
    # rest of the round and train on them unseen
    from loop.bench.rate import add_images

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        store.begin_phase(0, "generate")
        add_images(ws, store, 3, round=0)
    assert entry(["rate", "--finish", "-w", str(ws.root)]) == 2
    one_error(capsys, "round 0 is still generating (3 image(s) so far", "loop run --round")
    assert entry(["rate", "--auto", "-w", str(ws.root)]) == 2  # refused before the scripted rater rates anything
    one_error(capsys, "round 0 is still generating")
    assert sql_count(ws, "SELECT COUNT(*) FROM ratings") == 0
    with ws.store() as store:
        assert not store.phase_done(0, "rate")
        store.finish_phase(0, "generate")
    assert entry(["rate", "--finish", "-w", str(ws.root)]) == 0  # once it has finished: closed
    with ws.store() as store:
        assert store.phase_done(0, "rate")


def test_a_second_run_or_train_on_a_busy_workspace_is_refused_and_status_says_who_works(ws, capsys):
    import os
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom loop.workspace import Workspace, work_lock\n"
         "with work_lock(Workspace(sys.argv[1]), 'run --round'):\n    print('held', flush=True)\n    time.sleep(60)",
         str(ws.root)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "LOOP_LAUNCHED": "", "RANK": "0"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (["run", "--round"], ["train"]):
            assert entry([*argv, "-w", str(ws.root)]) == 2
            err = one_error(capsys, "is working on this workspace now", "wait for it")
            assert f"`loop run --round` (pid {holder.pid})" in err
        assert entry(["status", "-w", str(ws.root)]) == 0
        assert f"working now: `loop run --round` (pid {holder.pid})" in capsys.readouterr().out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed, it holds nothing: the next run may go on
    from loop.workspace import lock_holder

    assert lock_holder(ws) is None
    assert entry(["status", "-w", str(ws.root)]) == 0
    assert "working now" not in capsys.readouterr().out


def test_a_command_run_inside_a_workspace_folder_names_the_workspace_instead_of_init(ws, capsys):
    with ws.store():
        pass  # the workspace has its database
    inner = ws.root / "generations"
    assert entry(["status", "-w", str(inner)]) == 2
    err = one_error(capsys, f"is inside the workspace {ws.root}", f"-w {ws.root}")
    assert "loop init" not in err  # following that would make a workspace inside this one
    assert not (inner / "configs").exists()


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("train:\n  rank: 4\n  lr 1e-4: x: y\n", "(line 3, column 13)", "mapping values are not allowed"),
        ("train:\n  rank: 4\ntrain:\n  lr: 1\n", "(line 3, column 1)", "found duplicate key train"),
    ],
    ids=["syntax", "duplicate-section"],
)
def test_a_broken_loop_yaml_says_where(ws, capsys, text, where, what):
    ws.root.joinpath("configs", "loop.yaml").write_text(text)
    assert entry(["run", "--round", "-w", str(ws.root)]) == 2
    one_error(capsys, f"loop.yaml is not valid YAML {where}: {what}")


def test_init_on_an_existing_workspace_says_so_and_changes_nothing(tmp_path, capsys):
    w = tmp_path / "w"
    assert entry(["init", str(w)]) == 0
    assert "workspace ready" in capsys.readouterr().out
    (w / "configs" / "prompts.txt").write_text("my own prompt\n")
    assert entry(["init", str(w)]) == 0
    assert (
        "is a workspace already (0 image(s), 0 trained unit(s)); nothing in it was changed" in capsys.readouterr().out
    )
    assert (w / "configs" / "prompts.txt").read_text() == "my own prompt\n"


def test_status_after_rating_closed_on_generated_images_says_select_and_train_come_next(ws, capsys):
    from loop.bench.rate import add_images

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        add_images(ws, store, 2, round=0)  # made by `loop generate` (the ring), not by `loop run --round`
    assert entry(["rate", "--finish", "-w", str(ws.root)]) == 0
    err = capsys.readouterr().err  # closed with nothing rated: allowed (earlier rounds may carry the set), said
    assert "warning: none of round 0's 2 image(s) is rated" in err
    assert entry(["status", "-w", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "round 0: rating closed on its 2 image(s); `loop run --round` selects and trains unit 1" in out
    assert "generates (or finishes)" not in out


def test_from_parent_with_another_method_or_rank_is_refused_before_the_round_starts(ws, capsys):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        train = {"method": "lora", "rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                 "text_encoder_lora": False}  # fmt: skip
        store.add_unit(1, parent=0, path="checkpoints/unit_001", base="embedded", method="lora",
                       strategy="golden", manifest={"config": {"train": train}})  # fmt: skip
    w = ["-w", str(ws.root)]
    assert entry(["run", "--round", *w, "train.start=from_parent", "train.rank=4"]) == 2
    one_error(capsys, "continues unit 1's adapter, made with train.rank=8 (asked: rank 4)", "train.start=from_base")
    assert entry(["run", "--round", *w, "train.start=from_parent", "train.method=custom_diffusion"]) == 2
    one_error(capsys, "made with train.method=lora (asked: method custom_diffusion)")
    assert sql_count(ws, "SELECT COUNT(*) FROM images WHERE round = 1") == 0  # nothing generated first


def test_train_in_a_new_workspace_or_with_processes_and_no_selection_is_one_line(ws, capsys):
    assert entry(["train", "-w", str(ws.root)]) == 2
    one_error(capsys, "no round has started", "loop run --round")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
    # --processes 2: said once by the launching command, before any worker starts
    assert entry(["train", "--processes", "2", "-w", str(ws.root)]) == 2
    one_error(capsys, "no selection for unit 1")
    assert entry(["generate", "--processes", "2", "-w", str(ws.root), "generate.stepz=1"]) == 2
    one_error(capsys, "generate.stepz")


def test_a_failed_worker_ends_the_launch_with_its_code_and_no_launcher_traceback(ws, tmp_path):
    """loop.launch: the workers said why (one line each); torchrun's ChildFailedError traceback is not added."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "loop.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29581",
           "-m", "loop", "config", "-w", str(ws.root), "train.rnak=4"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr[-2000:]
    assert "train.rnak" in out.stderr


def test_init_takes_w_and_settings_for_its_loop_yaml(tmp_path, capsys):
    from loop.config import load_config

    assert entry(["init", str(tmp_path / "a"), "train.rank=4", "select.strategy=converge"]) == 0
    cfg = load_config(tmp_path / "a")
    assert (cfg.train.rank, cfg.select.strategy, cfg.model.base) == (4, "converge", "embedded")
    assert entry(["init", "-w", str(tmp_path / "b")]) == 0 and (tmp_path / "b" / "loop.db").is_file()
    capsys.readouterr()
    assert entry(["init", str(tmp_path / "c"), "train.rnak=4"]) == 2
    one_error(capsys, "train.rnak", "did you mean train.rank")
    assert not (tmp_path / "c").exists()  # nothing laid out
    before = (tmp_path / "a" / "configs" / "loop.yaml").read_text()
    assert entry(["init", str(tmp_path / "a"), "train.rank=8"]) == 2
    one_error(capsys, "has a configs/loop.yaml already")
    assert (tmp_path / "a" / "configs" / "loop.yaml").read_text() == before
    (tmp_path / "d" / "configs").mkdir(parents=True)  # a folder with the user's own settings, no loop.db yet
    (tmp_path / "d" / "configs" / "loop.yaml").write_text("train:\n  steps: 50\n")
    assert entry(["init", str(tmp_path / "d"), "train.rank=8"]) == 2
    one_error(capsys, "has a configs/loop.yaml already")
    assert (tmp_path / "d" / "configs" / "loop.yaml").read_text() == "train:\n  steps: 50\n"
    assert entry(["init", str(tmp_path / "a"), "-w", str(tmp_path / "b")]) == 2
    one_error(capsys, "two folders")
