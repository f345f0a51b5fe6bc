"""The prompt ring buffer, graceful stop, img2img variations and several processes (issue 4)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from loop.errors import LoopError
from loop.generate import Renderer, StopFlag, generate_ring, resolve_image, vary
from loop.images import load_rgb, read_meta
from loop.prompts import Ring
from loop.workspace import TMP_MARK, recover, sha256_file

QUIET = dict(log=lambda m: None)


def made(store):
    """(prompt, seed) of the txt2img images, in the order they were made."""
    return [
        (r["prompt"], r["seed"]) for r in store.db.execute("SELECT * FROM images WHERE parent_id IS NULL ORDER BY id")
    ]


def files_match_rows(ws, store):
    rows = store.db.execute("SELECT path, sha256 FROM images").fetchall()
    files = {ws.rel(p) for p in ws.root.joinpath("generations").rglob("*.png")}
    assert files == {r["path"] for r in rows}, "every file has its row and every row its file"
    for r in rows:
        assert sha256_file(ws.root / r["path"]) == r["sha256"]
    assert not list(ws.root.joinpath("generations").rglob(f"*{TMP_MARK}*")), "no temporary file left"


def test_ring_goes_round_in_order_with_new_seeds_each_cycle(ws, cfg):
    ws.prompts_path.write_text("a circle --n 2\n# skip me\n\na square --n 1\n", encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        out = generate_ring(ws, store, cfg, unit=0, count=5, **QUIET)
        assert out["made"] == 5
        assert made(store) == [("a circle", 0), ("a circle", 1), ("a square", 0), ("a circle", 2), ("a circle", 3)]
        assert out["position"]["cycle"] == 1 and out["position"]["text"] == "a square"
        assert out["position"]["lineno"] == 4  # the line it is on, as the message says (not the one just done)


def test_ring_picks_up_edits_without_a_restart(ws, cfg, monkeypatch):
    ws.prompts_path.write_text("a circle --n 2\na square --n 2\na ring --n 2\n", encoding="utf-8")
    original = Renderer.run
    calls = []

    def run_then_edit(self, jobs, bar=None, log=print):
        out = original(self, jobs, bar, log)
        calls.append(jobs[0].prompt if jobs else None)
        if len(calls) == 1:  # while the generator is running: drop "a square", add "a triangle" first
            ws.prompts_path.write_text("a triangle --n 1\na circle --n 2\na ring --n 2\n", encoding="utf-8")
        return out

    monkeypatch.setattr(Renderer, "run", run_then_edit)
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=7, **QUIET)
        # after "a circle" the ring follows the file as it is now: "a circle" moved to line 2, so "a ring"
        # is next; then the next cycle starts with the new first line
        assert made(store) == [
            ("a circle", 0), ("a circle", 1), ("a ring", 0), ("a ring", 1),
            ("a triangle", 1), ("a circle", 2), ("a circle", 3),
        ]  # fmt: skip


def test_ring_follows_a_moved_line_and_survives_a_deleted_one(tmp_path):
    from loop.store import Store

    p = tmp_path / "prompts.txt"
    p.write_text("one\ntwo\nthree\n", encoding="utf-8")
    with Store(tmp_path / "x.db") as store:
        ring = Ring(p, store, "ring/0of1", **QUIET)
        assert ring.current().text == "one"
        ring.advance()
        assert ring.current().text == "two"
        p.write_text("zero\none\ntwo\nthree\n", encoding="utf-8")  # a line added above: follow "two"
        assert ring.current().text == "two"
        p.write_text("zero\none\nthree\n", encoding="utf-8")  # "two" deleted: carry on with what took its place
        assert ring.current().text == "three"
        ring.advance()
        assert (ring.current().text, ring.pos.cycle) == ("zero", 1)
        p.write_text("# nothing\n", encoding="utf-8")
        assert ring.current() is None  # the generator waits instead of failing
        # the position is in the store: a new ring (a restart) continues from it
        p.write_text("zero\none\nthree\n", encoding="utf-8")
        again = Ring(p, store, "ring/0of1", **QUIET)
        assert (again.current().text, again.pos.cycle) == ("zero", 1)


def test_ring_goes_on_with_the_next_line_when_the_current_and_the_one_before_are_deleted(tmp_path):
    from loop.store import Store

    p = tmp_path / "prompts.txt"
    p.write_text("circle\nsquare\nring\ntriangle\n", encoding="utf-8")
    with Store(tmp_path / "x.db") as store:
        ring = Ring(p, store, "ring/0of1", **QUIET)
        ring.current()
        ring.advance()
        ring.current()
        ring.advance()
        assert ring.current().text == "ring"
        p.write_text("circle\ntriangle\n", encoding="utf-8")  # "square" and "ring" deleted
        assert (ring.current().text, ring.pos.cycle) == ("triangle", 0)  # not back to "circle" in cycle 1
        # and after a restart too: the lines that followed are kept with the position (as saved on "ring")
        store.set_state("ring/0of1", {"index": 2, "text": "ring", "cycle": 0, "after": "square",
                                      "ahead": ["triangle"]})  # fmt: skip
        p.write_text("circle\ntriangle\n", encoding="utf-8")
        again = Ring(p, store, "ring/0of1", **QUIET)
        assert (again.current().text, again.pos.cycle) == ("triangle", 0)


def test_restart_continues_where_it_stopped(ws, cfg):
    ws.prompts_path.write_text("a circle --n 3\na square --n 3\n", encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=2, **QUIET)
    with ws.store() as store:  # a new process, a new connection: the position comes from the store
        generate_ring(ws, store, cfg, unit=0, count=3, **QUIET)
        assert made(store) == [("a circle", 0), ("a circle", 1), ("a circle", 2), ("a square", 0), ("a square", 1)]
        files_match_rows(ws, store)
    from loop.status import format_status

    assert "prompt ring (process 0 of 1): at 'a square', cycle 0" in format_status(ws)


def test_per_line_overrides_reach_the_image_and_its_row(ws, cfg):
    ws.prompts_path.write_text(
        'a circle --n 2 --seed 100 --steps 3 --cfg 2.5 --neg "blue" --w 48 --h 24\na square --n 1\n',
        encoding="utf-8",
    )
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=3, **QUIET)
        rows = store.db.execute("SELECT * FROM images ORDER BY id").fetchall()
    first = rows[0]
    assert (first["seed"], first["steps"], first["cfg"], first["negative_prompt"]) == (100, 3, 2.5, "blue")
    assert (first["width"], first["height"]) == (48, 24)
    assert load_rgb(ws.root / first["path"]).shape == (24, 48, 3)
    assert "Negative prompt: blue" in (ws.root / first["path"]).read_bytes().decode("latin-1")
    square = rows[2]
    assert (square["seed"], square["steps"], square["cfg"]) == (0, cfg.generate.steps, cfg.generate.cfg)


def test_a_bad_line_is_named_and_the_others_generate(ws, cfg):
    ws.prompts_path.write_bytes(b"a circle --n 1\na square --n lots\n\xff\xfe\na ring --n 1\n")
    logged = []
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=2, log=logged.append)
        assert made(store) == [("a circle", 0), ("a ring", 0)]
    assert any("prompts.txt:2" in m and "--n" in m for m in logged)
    assert any("prompts.txt:3" in m and "UTF-8" in m for m in logged)


def test_empty_prompt_file_is_one_clear_error(ws, cfg):
    ws.prompts_path.write_text("# nothing yet\n", encoding="utf-8")
    with ws.store() as store, pytest.raises(LoopError, match="no usable prompts"):
        generate_ring(ws, store, cfg, unit=0, count=1, **QUIET)


def test_a_stop_flag_discards_the_batch_in_flight(ws, cfg):
    ws.prompts_path.write_text("a circle --n 8\n", encoding="utf-8")
    stop = StopFlag()
    steps = []

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        renderer = Renderer(ws, store, cfg, 0, stop=stop)
        original = renderer._check_stop

        def stop_midway(pipe, step, t, kwargs):
            steps.append(step)
            if step == 1:
                stop.set("test")
            return original(pipe, step, t, kwargs)

        renderer._check_stop = stop_midway
        from loop.generate import line_jobs
        from loop.prompts import parse_line

        n, stopped = renderer.run(line_jobs(parse_line("a circle --n 8", 1), cfg.generate, renderer.native), **QUIET)
        assert (n, stopped) == (0, True)
        assert steps == [0, 1]  # it stopped between steps, not after the whole batch
        assert store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
        files_match_rows(ws, store)


def _signal_a_generator(ws, args, sig, after: int) -> tuple[int, str]:
    """`loop generate ARGS` in a process of its own, sent `sig` once it has written `after` images; its exit
    status and output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "loop", "generate", *args, "-w", str(ws.root), "generate.batch_size=4",
           "generate.steps=12"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(ws.generations(0).glob("*.png"))) < after:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def test_sigterm_stops_a_real_generator_cleanly(ws):
    ws.prompts_path.write_text("a circle --n 40\na square --n 40\n", encoding="utf-8")  # whole batches of 4
    rc, out = _signal_a_generator(ws, ["--forever"], signal.SIGTERM, after=6)
    assert rc == 0, out
    assert "stopped cleanly" in out
    with ws.store() as store:
        n = store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        assert n >= 6 and n % 4 == 0, "whole batches only: the batch in flight was finished or discarded"
        files_match_rows(ws, store)
        assert store.get_state("ring/0of1") is not None


@pytest.mark.parametrize("args", [["--count", "400"], []], ids=["count", "one-pass"])
def test_ctrl_c_before_the_count_or_the_pass_is_done_exits_130_and_says_how_far(ws, args):
    # `loop generate --count K && loop rate --finish` must not go on after K was not reached
    ws.prompts_path.write_text("a circle --n 200\na square --n 200\n", encoding="utf-8")
    rc, out = _signal_a_generator(ws, args, signal.SIGINT, after=4)
    assert rc == 130, out
    assert "stopped cleanly" in out and "interrupted;" not in out  # said once, by the command itself


def test_variations_record_their_parent(ws, cfg):
    ws.prompts_path.write_text("a circle --n 1\n", encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=1, **QUIET)
        parent = store.images()[0]
        assert resolve_image(ws, store, parent["sha256"][:8])["id"] == parent["id"]
        assert resolve_image(ws, store, str(ws.root / parent["path"]))["id"] == parent["id"]
        ids = vary(ws, store, cfg, [parent], n=2, strength=0.7, **QUIET)
        more = vary(ws, store, cfg, [parent], n=1, strength=0.7, **QUIET)
        kids = [store.image(i) for i in ids + more]
    assert [k["parent_id"] for k in kids] == [parent["id"]] * 3
    assert [k["seed"] for k in kids] == [0, 1, 2], "asking again gives new seeds"
    assert {k["source"] for k in kids} == {"variation"}
    meta = read_meta(ws.root / kids[0]["path"])
    assert meta["parent"] == parent["sha256"] and meta["strength"] == 0.7 and meta["prompt"] == parent["prompt"]
    a, b = load_rgb(ws.root / parent["path"]), load_rgb(ws.root / kids[0]["path"])
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 1, "a variation is a new image"
    # a variation is not mistaken for the txt2img image of the same seed: the ring still makes seed 0's sibling
    with ws.store() as store:
        assert store.made_seeds(0, parent["prompt"], [0, 1, 2]) == {0}


def test_vary_rejects_unknown_image_and_bad_strength(ws, cfg):
    with ws.store() as store:
        with pytest.raises(LoopError, match="no image"):
            resolve_image(ws, store, "123456")
        with pytest.raises(LoopError, match="strength"):
            vary(ws, store, cfg, [], n=1, strength=1.5, **QUIET)


def test_recovery_spares_a_live_writers_temp_file(ws):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = ws.generations(0) / f".a.png{TMP_MARK}{sleeper.pid}-x1"
        live.parent.mkdir(parents=True, exist_ok=True)
        live.write_bytes(b"being written")
        with ws.store() as store:
            recover(ws, store, **QUIET)
            assert live.exists()
            sleeper.kill()
            sleeper.wait()
            recover(ws, store, **QUIET)
            assert not live.exists()
    finally:
        sleeper.kill()


@pytest.mark.parametrize("mode", [["--count", "9"], []])
def test_two_processes_split_seeds_without_overlap(ws, mode):
    ws.prompts_path.write_text("a circle --n 5\na square --n 4\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "loop", "generate", "--processes", "2", *mode, "-w", str(ws.root),
           "generate.steps=3", "generate.batch_size=4"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with ws.store() as store:
        rows = store.db.execute("SELECT prompt, seed, params FROM images").fetchall()
        pairs = [(r["prompt"], r["seed"]) for r in rows]
        assert len(rows) == 9 and len(set(pairs)) == 9, "no seed made twice"
        assert sorted(pairs) == sorted([("a circle", k) for k in range(5)] + [("a square", k) for k in range(4)])
        import json

        by = {json.loads(r["params"]).get("process") for r in rows}
        assert by == {"0/2", "1/2"}, "both processes made images"
        files_match_rows(ws, store)
    # each process says its own share, and which process it is
    said = [ln for ln in out.stdout.splitlines() if "made" in ln and "image(s)" in ln]
    assert sorted(ln.split(":")[0] for ln in said) == ["process 1 of 2", "process 2 of 2"], out.stdout
