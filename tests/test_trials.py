"""Nothing lost: short versions of `python -m loop.trials` (kill -9 of the real commands, concurrent writers).

The full trials (20 kills of each kind, 180 s of concurrency) are `python -m loop.trials`; docs/reliability.md
has their figures. Here: the checker itself; the two crash windows the trials showed up, each hit exactly (a
round killed after its unit was saved, a rating killed before golden/ followed it); then two kills of
`loop generate`, one of a round's training and one of the rating server, and ten seconds of a generator and two
raters on one workspace, all four at once.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import loop.train
from loop.config import load_config
from loop.round import run_round
from loop.trials import (
    GEN,
    RATE,
    TMP_MARK,
    check_store,
    concurrency,
    crash_generate,
    crash_rate,
    crash_round,
    round_template,
    snapshot,
)
from loop.workspace import Workspace

quiet = None  # the trial functions print one line per trial when given a log; tests keep quiet


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Round 0 generated (real images), rated by the scripted rater and selected; training is next."""
    return round_template(tmp_path_factory.mktemp("trials"), log=quiet)


def _copy(template, tmp_path, name="ws"):
    return shutil.copytree(template, tmp_path / name)


def _sql(root, q, *args):
    import sqlite3

    db = sqlite3.connect(root / "loop.db", isolation_level=None)
    try:
        return db.execute(q, args).fetchall()
    finally:
        db.close()


def test_the_checker_finds_every_kind_of_damage(template, tmp_path):
    root = _copy(template, tmp_path)
    assert check_store(root) == []
    tiers = dict(_sql(root, "SELECT image_id, tier FROM current_tiers"))
    rows = _sql(root, "SELECT id, path, sha256 FROM images ORDER BY id")
    (a, rel_a, _), (c, rel_c, _) = [r for r in rows if tiers.get(r[0]) != "UR"][:2]
    b, _, sha_b = next(r for r in rows if tiers.get(r[0]) == "UR")
    # leftovers a kill may leave and recovery must clear: a temporary file, a complete file without its row,
    # a UR image missing from golden/
    (root / "generations" / "unit_000" / f".x.png{TMP_MARK}999999-1").write_bytes(b"half")
    orphan = root / "generations" / "unit_000" / "0000000000000000.png"
    shutil.copy(root / rel_c, orphan)
    (root / "golden" / f"{sha_b[:16]}.png").unlink()
    _sql(root, "UPDATE images SET sha256 = ? WHERE id = ?", "f" * 64, a)  # a row that names another file
    lo = {}
    crash = check_store(root, settled=False, leftovers=lo)
    assert lo == {"temp": 1, "orphans": 1, "golden": 1}
    assert crash == [f"image {a}: {rel_a} does not have the row's sha256"]
    settled = check_store(root)
    assert len(settled) == 4
    assert any("temporary file left" in p for p in settled)
    assert "file without a row: generations/unit_000/0000000000000000.png" in settled
    assert f"UR image {b} is missing from golden/" in settled
    # always problems: half a file under a final name, a row without its file, a lost acknowledged rating
    orphan.write_bytes(orphan.read_bytes()[:100])
    (root / rel_c).unlink()
    problems = check_store(root, [(10**6, c, "UR", "alice")], settled=False)
    assert "half-written or unreadable file under a final name: generations/unit_000/0000000000000000.png" in problems
    assert f"image {c}: row without its file ({rel_c})" in problems
    assert f"acknowledged rating event 1000000 (alice: image {c} UR) is lost" in problems
    assert len(snapshot(root)) == len(rows), "rows and complete files only"


class Killed(BaseException):
    """Stands in for SIGKILL at one exact line."""


@pytest.mark.slow
def test_a_kill_after_the_unit_is_saved_closes_that_round_not_the_next(template, tmp_path, monkeypatch):
    # the widest gap a random kill can hardly hit: unit 1's weights, manifest and row are written, the round's
    # train phase is not yet recorded and the checkpoints not yet cleared
    ws = Workspace.open(_copy(template, tmp_path))
    cfg = load_config(ws.root, GEN + RATE + ["train.steps=4", "train.batch_size=2", "train.checkpoint_every=2"])

    def killed(self):
        raise Killed

    monkeypatch.setattr(loop.train.Checkpoints, "clear", killed)
    with pytest.raises(Killed):
        run_round(ws, cfg, auto_rate_=True, log=lambda m: None)
    monkeypatch.undo()
    with ws.store() as store:
        assert store.unit(1) is not None and store.phase(0, "train")["status"] == "running"
    assert (ws.checkpoint(1) / ".training").exists()
    res = run_round(ws, cfg, auto_rate_=True, log=lambda m: None)  # `loop run --round` again, no number
    assert (res.round, res.status, res.ran) == (0, "done", ["train"]), "it finishes round 0, not round 1"
    with ws.store() as store:
        assert store.phase_done(0, "train") and store.phases(1) == {}
        assert json.loads(store.phase(0, "train")["detail"])["unit"] == 1
    assert check_store(ws) == []


def test_recovery_brings_golden_back_in_line_after_a_kill_between_rating_and_linking(template, tmp_path):
    # ratings are committed before golden/ follows them: a kill in between leaves a UR image outside golden/
    # (or a demoted one inside), and the re-run's scripted rater only rates unrated images, so nothing else fixes it
    from loop.workspace import recover

    ws = Workspace.open(_copy(template, tmp_path))
    with ws.store() as store:
        ur = [r for r in store.images() if r["tier"] == "UR"]
        other = next(r for r in store.images() if r["tier"] != "UR")
        (ws.root / "golden" / f"{ur[0]['sha256'][:16]}.png").unlink()  # rated UR, killed before the link
        store.rate(ur[1]["id"], "N", "bob")  # demoted, killed before the unlink
        store.rate(other["id"], "UR", "bob")  # promoted, killed before the link
        assert len(check_store(ws)) == 3
        out = recover(ws, store, log=lambda m: None)
    assert out == {"removed": 0, "adopted": 0, "golden": 3}
    assert check_store(ws) == []


TIMING = {"load": 4.0, "step": 0.3, "save": 1.0}  # seconds of a round's train stretches (no calibration run)


@pytest.mark.slow
def test_kill_9_and_concurrent_writers_lose_nothing(template, tmp_path):
    # the four trials at once: each has its own workspace, processes and port (and the machine two cores)
    jobs = {
        "generate": lambda: crash_generate(2, 1, tmp_path / "g", log=quiet, batch_s=1.0),
        "round": lambda: crash_round(1, 1, tmp_path / "r", template, log=quiet, timing=TIMING),
        "rate": lambda: crash_rate(1, 1, tmp_path / "k", template, log=quiet),
        "concurrency": lambda: concurrency(10, 0, tmp_path / "c", template, log=quiet),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        running = {name: pool.submit(job) for name, job in jobs.items()}
        gen, rnd, rate, conc = (running[name].result() for name in jobs)
    for k in (gen, rnd, rate, conc):
        assert k.problems == [], k.problems
        assert (k.lost_images, k.lost_ratings, k.inconsistent) == (0, 0, 0), k.name
    assert (gen.trials, gen.reruns_ok) == (2, 2) and (rnd.trials, rnd.reruns_ok) == (1, 1)
    assert (rate.trials, rate.killed, rate.reruns_ok) == (1, 1, 1)
    assert rate.notes["acknowledged_ratings"] > 0, "the server was rating when it was killed"
    n = conc.notes
    assert n["events_acknowledged"] == n["events_posted"] == n["events_in_db"] > 0
    assert n["error_responses"] == n["database_locked"] == n["tracebacks"] == 0
    assert n["images_generated"] > 0, "the generator wrote while the raters rated"
