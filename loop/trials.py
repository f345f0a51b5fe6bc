"""Crash and concurrency trials: nothing the loop acknowledged is ever lost, and a kill never leaves a mess.

    python -m loop.trials                       all: crash trials (20 of each kind), then concurrency (180 s)
    python -m loop.trials crash --trials 20 --seed 0
    python -m loop.trials concurrency --seconds 180

Crash trials kill the real command line with SIGKILL (the whole process group) at seeded random moments:

- generate: `loop generate` (one pass) while it renders and writes; a new prompt line per trial, so every pass
  has work. The same command is then run again and must finish the pass.
- round:    `loop run --round --auto-rate` during its train phase (from the moment the store says the phase is
  running: model load, encoding, steps, checkpoints, the final save). Run again, it must finish the round.
- rate:     the `loop rate` server while two client threads post ratings to it as fast as they can; every
  rating the server acknowledged (HTTP 200 with its event id) is recorded. The next trial's server start on
  the same workspace is the re-run; a last start rates once more and stops cleanly.

After each kill `check_store(..., settled=False)` checks what must hold even before any recovery (every row's
file exists with its sha256, no half-written file under a final name, every acknowledged rating is stored);
after the re-run `check_store(...)` checks everything, leftovers included (no temporary file, no file without
its row, golden/ mirrors the UR set, every unit is complete and its round closed).

The concurrency trial runs `loop generate --forever` and a `loop rate` server on one workspace while two
raters (threads with their own HTTP connections) rate whatever images exist, for N seconds; then it stops both
gracefully and counts acknowledged events against the database, error responses, and "database is locked".

Figures go to docs/bench/reliability.json (flat, as the benchmarks' files) and a table is printed.
The checker is independent of the code it checks: plain sqlite3, hashlib and PIL, no loop.store.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TIERS = ("UR", "SSR", "SR", "R", "N")
TMP_MARK = ".tmp-"  # what every temporary name carries (loop/workspace.py); restated so the checker stands alone
FOLDERS = ("generations", "golden", "checkpoints", "cache")
WEIGHTS = "pytorch_lora_weights.safetensors"

# small, fast settings: 4 images per prompt line in batches of 2 (so writes interleave with rendering), and a
# short training with a checkpoint every 4 steps (so kills land before, between and after checkpoints)
PER_LINE = 4
GEN = [f"generate.images_per_prompt={PER_LINE}", "generate.steps=4", "generate.batch_size=2"]
TRAIN_STEPS = 20
TRAIN = [f"train.steps={TRAIN_STEPS}", "train.batch_size=2", "train.checkpoint_every=4"]
RATE = ["rate.cutoffs=[100,50,0,-100]"]  # about half of the template's images are UR (scores 27..174): never empty
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "reliability.json"


# -- the independent checker -------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _png_state(path: Path) -> str:
    """'ok' (complete, with loop's metadata), 'no-meta' (complete, no metadata), or 'broken'."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes every row: a truncated file fails here
            meta = im.info.get("loop") if im.format == "PNG" else None
        if meta:
            json.loads(meta)
            return "ok"
        return "no-meta"
    except Exception:
        return "broken"


def _connect(root: Path) -> sqlite3.Connection:
    db = sqlite3.connect(root / "loop.db", timeout=60, isolation_level=None)
    db.execute("PRAGMA busy_timeout=60000")
    return db


def current_tiers(db: sqlite3.Connection) -> dict[int, str]:
    """image id -> tier of its newest rating event that is not an undo and has not been undone."""
    rows = db.execute("SELECT id, image_id, tier, undoes FROM ratings ORDER BY id").fetchall()
    undone = {r[3] for r in rows if r[3] is not None}
    out: dict[int, str] = {}
    for eid, image_id, tier, undoes in rows:
        if undoes is None and eid not in undone:
            out[image_id] = tier
    return out


def check_store(ws, acked=None, *, settled: bool = True, leftovers: dict | None = None) -> list[str]:
    """The problems of a workspace (an empty list: consistent).

    Always: the database passes integrity and foreign-key checks; every image row's file exists and has the
    row's sha256; no file under a final name in generations/ is half-written; no (unit, prompt, seed) was
    made twice; every acknowledged rating `(event id, image id, tier, rater)` in `acked` is stored as such.
    settled=True (after a recovery or a clean stop) also: no temporary file anywhere; no PNG in generations/
    without its row; golden/ holds exactly the current UR images (plus imported files); every trained unit
    has its weights and manifest, no leftover .training folder, and its round's train phase is done.
    settled=False (right after a kill) counts those leftovers into `leftovers` instead of reporting them.
    """
    root = Path(ws if isinstance(ws, (str, os.PathLike)) else ws.root)
    problems: list[str] = []
    lo = leftovers if leftovers is not None else {}

    def leftover(kind: str, what: str) -> None:
        if settled:
            problems.append(what)
        else:
            lo[kind] = lo.get(kind, 0) + 1

    if not (root / "loop.db").exists():
        return [f"{root}: no loop.db"]
    db = _connect(root)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            problems.append(f"integrity_check: {ok}")
        if db.execute("PRAGMA foreign_key_check").fetchall():
            problems.append("foreign_key_check found dangling references")
        rows = db.execute("SELECT id, sha256, path, unit, prompt, seed, parent_id, source FROM images").fetchall()
        by_path = {}
        for image_id, sha, rel, *_ in rows:
            by_path[rel] = sha
            p = root / rel
            if not p.is_file():
                problems.append(f"image {image_id}: row without its file ({rel})")
            elif _sha(p) != sha:
                problems.append(f"image {image_id}: {rel} does not have the row's sha256")
        for unit, prompt, seed, k in db.execute(
            "SELECT unit, prompt, seed, COUNT(*) FROM images WHERE parent_id IS NULL AND source = 'generated' "
            "GROUP BY unit, prompt, seed HAVING COUNT(*) > 1"
        ):
            problems.append(f"unit {unit} made ({prompt!r}, seed {seed}) {k} times")

        # files: temporary names, then PNGs without a row (a complete one is adoptable; a broken one is a bug)
        for folder in FOLDERS:
            for p in sorted((root / folder).rglob(f"*{TMP_MARK}*")):
                if not any(TMP_MARK in part for part in p.relative_to(root).parts[:-1]):  # not inside a temp dir
                    leftover("temp", f"temporary file left: {p.relative_to(root)}")
        for p in sorted((root / "generations").rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            if TMP_MARK in rel:
                continue
            state = _png_state(p)
            if state == "broken":
                problems.append(f"half-written or unreadable file under a final name: {rel}")
            elif rel not in by_path:
                if state == "no-meta":
                    problems.append(f"file without a row that recovery cannot adopt (no metadata): {rel}")
                else:
                    leftover("orphans", f"file without a row: {rel}")

        # acknowledged ratings
        for event_id, image_id, tier, rater in acked or ():
            got = db.execute("SELECT image_id, tier, rater FROM ratings WHERE id = ?", (event_id,)).fetchone()
            if got is None:
                problems.append(f"acknowledged rating event {event_id} ({rater}: image {image_id} {tier}) is lost")
            elif tuple(got) != (image_id, tier, rater):
                problems.append(f"acknowledged rating event {event_id} is stored as {tuple(got)}")

        # golden/ mirrors the current UR set
        tiers = current_tiers(db)
        sha_of = {r[0]: r[1] for r in rows}
        path_of = {r[0]: r[2] for r in rows}
        ur_names = {}
        for image_id, tier in tiers.items():
            if tier != "UR" or image_id not in path_of or path_of[image_id].startswith("golden/"):
                continue
            name = f"{sha_of[image_id][:16]}{Path(path_of[image_id]).suffix or '.png'}"
            ur_names[name] = sha_of[image_id]
            g = root / "golden" / name
            if not g.is_file():
                leftover("golden", f"UR image {image_id} is missing from golden/")
            elif _sha(g) != sha_of[image_id]:
                problems.append(f"golden/{name} is not image {image_id}'s file")
        for g in sorted((root / "golden").rglob("*")):
            rel = g.relative_to(root).as_posix()
            if not g.is_file() or TMP_MARK in rel or g.name in (".gitkeep", "README.md") or rel in by_path:
                continue
            if g.name not in ur_names:
                leftover("golden", f"{rel} is in golden/ but its image is not UR")

        # units and rounds
        units = dict(db.execute("SELECT unit, path FROM units WHERE unit > 0").fetchall())
        for unit, rel in units.items():
            folder = root / (rel or f"checkpoints/unit_{unit:03d}")
            for need in (WEIGHTS, "manifest.json"):
                if not (folder / need).is_file():
                    problems.append(f"unit {unit}: {need} missing")
            try:
                json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                problems.append(f"unit {unit}: manifest.json is not readable JSON")
            if (folder / ".training").exists():
                leftover("training", f"unit {unit} is done but its .training/ checkpoints were left")
        phases = {}
        for rnd, phase, status in db.execute("SELECT round, phase, status FROM phases"):
            phases.setdefault(rnd, {})[phase] = status
        for rnd, ph in phases.items():
            order = ["generate", "rate", "select", "train"]
            done = [ph.get(p) == "done" for p in order]
            if any(later and not earlier for earlier, later in zip(done, done[1:])):
                problems.append(f"round {rnd}: a phase is done before the one it follows ({ph})")
            if ph.get("train") == "done" and rnd + 1 not in units:
                problems.append(f"round {rnd}: train is done but unit {rnd + 1} is not in the store")
            if rnd + 1 in units and ph.get("train") == "running":
                leftover("phase", f"round {rnd}: unit {rnd + 1} exists but the round's train phase is not done")
    finally:
        db.close()
    return problems


def snapshot(root: Path) -> dict[str, str]:
    """sha256 -> path of every image the workspace holds now: its rows, and complete files without a row."""
    out = {}
    db = _connect(root)
    try:
        for sha, rel in db.execute("SELECT sha256, path FROM images"):
            out[sha] = rel
    finally:
        db.close()
    known = set(out.values())
    for p in (root / "generations").rglob("*.png"):
        rel = p.relative_to(root).as_posix()
        if TMP_MARK not in rel and rel not in known and _png_state(p) == "ok":
            out.setdefault(_sha(p), rel)
    return out


def lost_images(root: Path, before: dict[str, str]) -> list[str]:
    """Images of `before` that are not now a row with its file."""
    db = _connect(root)
    try:
        now = dict(db.execute("SELECT sha256, path FROM images").fetchall())
    finally:
        db.close()
    return [f"{rel} ({sha[:12]})" for sha, rel in before.items() if sha not in now or not (root / now[sha]).is_file()]


# -- processes -------------------------------------------------------------------------------------------
def _env() -> dict:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )


def loop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loop", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A process in its own group (so SIGKILL reaches every child), its output into `log`."""
    f = open(log, "ab")
    try:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), start_new_session=True
        )
    finally:
        f.close()


def kill9(proc: subprocess.Popen) -> bool:
    """SIGKILL to the process group; True if it was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def stop_process(proc: subprocess.Popen, sig: int, timeout: float):
    """Send `sig` and wait up to `timeout` s for a clean exit; then SIGKILL. Returns the exit code or "timeout"."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(proc)
        return "timeout"


def run(cmd: list[str], log: Path, timeout: float = 600) -> tuple[int, str]:
    """Run to the end; (exit status, its output)."""
    start_at = log.stat().st_size if log.exists() else 0
    proc = start(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(proc)
        rc = -9
    text = log.read_bytes()[start_at:].decode("utf-8", "replace")
    return rc, text


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> bool:
    """Poll `cond()` until true; False on timeout or when `proc` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(cond())
        time.sleep(poll)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phase(root: Path, rnd: int, phase: str) -> str | None:
    try:
        db = sqlite3.connect(root / "loop.db", timeout=5)
        try:
            row = db.execute("SELECT status FROM phases WHERE round = ? AND phase = ?", (rnd, phase)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _count(root: Path, table: str) -> int:
    db = _connect(root)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- rating clients ---------------------------------------------------------------------------------------
@dataclass
class Acked:
    """Every rating event a server acknowledged: (event id, image id, tier, rater)."""

    events: list = field(default_factory=list)
    posted: int = 0  # rating events sent
    requests: int = 0
    errors: list = field(default_factory=list)  # non-200 answers (a refused connection after a kill is not one)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, items, rater, answer) -> None:
        with self.lock:
            self.events += [(e, i, t, rater) for e, (i, t) in zip(answer["events"], items)]


class Rater(threading.Thread):
    """Posts ratings to /loop/api/rate as fast as it can, over its own keep-alive connection, until stopped or
    the server goes away. Refreshes the image ids now and then, so it rates whatever exists."""

    def __init__(self, port: int, name: str, acked: Acked, seed: int, stop: threading.Event, refresh: float = 1.0):
        super().__init__(daemon=True, name=f"rater-{name}")
        self.port, self.rater, self.acked, self.stop_ev, self.refresh = port, name, acked, stop, refresh
        self.rng = random.Random(seed)
        self.ids: list[int] = []
        self.gone = False  # the server stopped answering (killed)

    def _request(self, conn, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        last = 0.0
        try:
            while not self.stop_ev.is_set():
                try:
                    if not self.ids or time.time() - last > self.refresh:
                        status, body = self._request(conn, "GET", "/loop/api/images")
                        if status != 200:
                            with self.acked.lock:
                                self.acked.errors.append(f"GET /loop/api/images: HTTP {status} {body[:200]!r}")
                        else:
                            self.ids = json.loads(body)["ids"] or self.ids
                        last = time.time()
                        if not self.ids:
                            time.sleep(0.1)
                            continue
                    items = [
                        (self.rng.choice(self.ids), self.rng.choice(TIERS)) for _ in range(self.rng.randint(1, 3))
                    ]
                    payload = {"rater": self.rater, "ratings": [{"image_id": i, "tier": t} for i, t in items]}
                    with self.acked.lock:
                        self.acked.posted += len(items)
                        self.acked.requests += 1
                    status, body = self._request(conn, "POST", "/loop/api/rate", payload)
                    if status == 200:
                        self.acked.add(items, self.rater, json.loads(body))
                    else:
                        with self.acked.lock:
                            self.acked.errors.append(f"POST /loop/api/rate: HTTP {status} {body[:200]!r}")
                except (OSError, http.client.HTTPException):
                    self.gone = True  # killed under us: what it acknowledged before is what counts
                    return
        finally:
            conn.close()


def _get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_server(root: Path, log: Path, timeout: float = 240) -> tuple[subprocess.Popen, int, float]:
    """`loop rate` on a free port; returns (process, port, seconds until it answered)."""
    port = free_port()
    t0 = time.time()
    proc = start(loop_cmd("rate", "-w", str(root), "--port", str(port)), log)

    def ready():
        try:
            return _get(port, "/loop/api/meta", timeout=5)[0] == 200
        except OSError:
            return False

    if not wait_for(ready, timeout, proc, poll=0.2):
        kill9(proc)
        tail = log.read_bytes()[-1500:].decode("utf-8", "replace")
        raise RuntimeError(f"`loop rate` did not answer within {timeout:.0f} s:\n{tail}")
    return proc, port, time.time() - t0


# -- results ----------------------------------------------------------------------------------------------
@dataclass
class Kind:
    """The figures of one kind of trial."""

    name: str
    trials: int = 0
    killed: int = 0  # killed while still running (the rest had finished before the chosen moment)
    lost_images: int = 0
    lost_ratings: int = 0
    inconsistent: int = 0  # trials with any problem, before or after the re-run
    reruns_ok: int = 0
    problems: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, trial: int, crash: list[str], after: list[str], lost: int = 0, lost_r: int = 0) -> None:
        self.trials += 1
        self.lost_images += lost
        self.lost_ratings += lost_r
        if crash or after:
            self.inconsistent += 1
            self.problems += [f"{self.name} trial {trial}: {p}" for p in crash + after]


def _say(log, msg: str) -> None:
    if log is print:
        print(msg, flush=True)  # one line per trial, as it ends, even into a file
    elif log:
        log(msg)


# -- crash trials: loop generate --------------------------------------------------------------------------
GEN_LINE = 6  # images of each trial's prompt line: three batches of two


def _created(root: Path, prompt: str) -> list[float]:
    db = _connect(root)
    try:
        rows = db.execute("SELECT created_at FROM images WHERE prompt = ? ORDER BY created_at", (prompt,))
        return [r[0] for r in rows]
    finally:
        db.close()


WRITE_SHARE = 0.3  # share of the generate trials aimed at a file being written (a random moment rarely is)


def _writing(folder: Path) -> bool:
    """A temporary file is being written under `folder` now."""
    for d in folder.glob("unit_*"):
        with os.scandir(d) as it:
            if any(TMP_MARK in e.name for e in it):
                return True
    return False


def _batch_gaps(times: list[float], batch: int = 2) -> list[float]:
    """Seconds between consecutive batches' rows (rows of one batch are written together)."""
    firsts = times[::batch]
    return [b - a for a, b in zip(firsts, firsts[1:])]


def crash_generate(trials: int, seed: int, base: Path, log=print, batch_s: float | None = None) -> Kind:
    """Kill `loop generate` (one pass) at random moments of its rendering and writing; run it again.

    Each trial adds a prompt line of three batches to the file, so the pass has work. The moment: a batch
    drawn at random, then a delay drawn uniformly over one batch's time (measured from the rows' timestamps
    of a first clean pass and of every re-run, unless `batch_s` gives it), so kills fall while a batch is
    denoised or written in proportion to their length. Writing a file takes a few milliseconds of a batch,
    so WRITE_SHARE of the trials instead watch for a temporary file and kill within 4 ms of seeing it."""
    from loop.workspace import Workspace

    rng = random.Random(f"generate-{seed}")
    kind = Kind("generate")
    t_start = time.time()
    ws = Workspace.init(base / "generate")
    root, logf = ws.root, base / "generate.log"
    ws.prompts_path.write_text("# crash trials: one new line per trial\n", encoding="utf-8")
    cmd = loop_cmd("generate", "-w", str(root), *GEN)
    nb = GEN_LINE // 2
    gaps = [batch_s] if batch_s else []
    expected = 0

    def add_line(text: str) -> None:
        nonlocal expected
        with open(ws.prompts_path, "a", encoding="utf-8") as f:
            f.write(f"{text} --n {GEN_LINE}\n")
        expected += GEN_LINE

    if not gaps:  # calibration: one clean pass
        add_line("a calibration circle")
        rc, _ = run(cmd, logf)
        gaps += _batch_gaps(_created(root, "a calibration circle"))
        clean = check_store(root)
        if rc != 0 or clean:
            kind.problems += [f"generate calibration: exit {rc}"] * (rc != 0)
            kind.problems += [f"generate calibration: {p}" for p in clean]
    for k in range(trials):
        prompt = f"a square number {k}"
        add_line(prompt)
        mark = logf.stat().st_size if logf.exists() else 0
        proc = start(cmd, logf)
        writing = rng.random() < WRITE_SHARE  # aim at the few milliseconds a file is being written
        target = rng.randrange(nb)  # the batch to kill in: wait for the ones before it to be written
        if writing:
            wait_for(lambda: _writing(root / "generations"), 300, proc, poll=0.002)
            delay = rng.uniform(0, 0.004)
        elif target == 0:
            wait_for(lambda m=mark: b"generate unit" in logf.read_bytes()[m:], 300, proc)
            delay = rng.uniform(0, _recent(gaps))
        else:
            wait_for(lambda p=prompt, t=target: len(_created(root, p)) >= 2 * t, 300, proc)
            delay = rng.uniform(0, _recent(gaps))
        time.sleep(delay)
        killed = kill9(proc)
        kind.killed += killed
        at_kill = len(_created(root, prompt))
        lo: dict = {}
        crash = check_store(root, settled=False, leftovers=lo)
        before = snapshot(root)
        rc, out = run(cmd, logf)  # run again: it must finish the pass (if the kill came after the end: nothing to do)
        after = check_store(root)
        if rc != 0 or "done: made" not in out:
            after.append(f"re-run exited {rc}: {out.strip().splitlines()[-1:] if out.strip() else ''}")
        n = _count(root, "images")
        if n != expected:
            after.append(f"the pass is not complete after the re-run: {n} images, expected {expected}")
        lost = lost_images(root, before)
        after += [f"lost image {x}" for x in lost]
        kind.reruns_ok += rc == 0 and n == expected
        kind.record(k, crash, after, lost=len(lost))
        for key, v in lo.items():
            kind.notes[f"left_{key}"] = kind.notes.get(f"left_{key}", 0) + v
        gaps += _batch_gaps(_created(root, prompt)[at_kill - at_kill % 2 :])  # the re-run's batches
        _say(
            log,
            f"  generate {k:2d}: kill {'while a file is written' if writing else f'in batch {target + 1}/{nb}'} "
            f"at +{delay:5.3f}s "
            f"({'running' if killed else 'had finished'}, {at_kill}/{GEN_LINE} of the line made), "
            f"left {lo or 'nothing'}, re-run rc {rc}, problems {len(crash) + len(after)}",
        )
    kind.notes["batch_s"] = round(sorted(gaps)[len(gaps) // 2], 2) if gaps else 0  # the median
    kind.seconds = round(time.time() - t_start, 1)
    return kind


# -- crash trials: loop run --round (train phase) ---------------------------------------------------------
def round_template(base: Path, log=print) -> Path:
    """A workspace whose round 0 has generated, rated (scripted) and selected: the next step is training."""
    from loop.config import load_config
    from loop.round import run_round
    from loop.workspace import Workspace

    ws = Workspace.init(base / "template")
    ws.prompts_path.write_text("a circle\na square\n", encoding="utf-8")
    cfg = load_config(ws.root, GEN + TRAIN + RATE)
    run_round(ws, cfg, 0, auto_rate_=True, log=lambda m: None, stop_after="select")
    problems = check_store(ws.root)
    if problems:
        raise RuntimeError(f"the template workspace is inconsistent before any trial: {problems}")
    _say(log, f"  template: {ws.root} (round 0 generated, rated and selected)")
    return ws.root


def _train_where(root: Path) -> str:
    folder = root / "checkpoints" / "unit_001"
    if _phase(root, 0, "train") == "done":
        return "round closed"
    if (folder / "manifest.json").exists():
        return "saving (manifest written)"
    if (folder / WEIGHTS).exists():
        return "saving (weights written)"
    steps = sorted(p.name for p in (folder / ".training").glob("step_*")) if (folder / ".training").exists() else []
    return f"training ({steps[-1]})" if steps else "loading/encoding/first steps"


STEP = re.compile(rb"train unit_\d+:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/\d+")


def _recent(xs: list[float]) -> float:
    """The median of the last three measurements."""
    last = sorted(xs[-3:])
    return last[len(last) // 2]


def _train_step(logf: Path, mark: int) -> int:
    """The step the training's progress bar last showed (-1 before the bar)."""
    data = logf.read_bytes()[mark:]
    found = STEP.findall(data[data.rfind(b"train unit_") :]) if b"train unit_" in data else []
    return int(found[-1]) if found else -1


def crash_round(trials: int, seed: int, base: Path, template: Path, log=print, timing: dict | None = None) -> Kind:
    """Kill `loop run --round --auto-rate` at random moments of its train phase; run it again.

    The moment: one of the train phase's stretches drawn at random (loading and encoding up to the first
    step, each of the steps, with a checkpoint after every 4th, or the final save and exit), then a delay
    drawn uniformly over that stretch's length. A step's length is timed live (the step before it: the
    machine's speed changes with other work on it); loading comes from the last trials, saving from a first
    uninterrupted round scaled by the step time now, unless `timing` ({"load", "step", "save"}) gives them."""
    rng = random.Random(f"round-{seed}")
    kind = Kind("round")
    t_start = time.time()

    def cmd(root, *n: str):
        return loop_cmd("run", "--round", "--auto-rate", "-w", str(root), *n, *GEN, *TRAIN, *RATE)

    if timing is None:  # calibration: one uninterrupted train phase
        root = copy_workspace(template, base / "round-cal")
        logf = base / "round-cal.log"
        proc = start(cmd(root), logf)
        wait_for(lambda: _phase(root, 0, "train") is not None, 300, proc, poll=0.02)
        t_run = time.time()
        wait_for(lambda: _train_step(logf, 0) >= 1, 600, proc, poll=0.02)
        t_first = time.time()
        wait_for(lambda: _train_step(logf, 0) >= TRAIN_STEPS, 600, proc, poll=0.02)
        t_last = time.time()
        rc = proc.wait(timeout=600)
        timing = {
            "load": t_first - t_run,
            "step": (t_last - t_first) / (TRAIN_STEPS - 1),
            "save": time.time() - t_last,
        }
        clean = check_store(root)
        if rc != 0 or clean or _phase(root, 0, "train") != "done":
            kind.problems += [f"round calibration: exit {rc}, train {_phase(root, 0, 'train')}"] + clean
        shutil.rmtree(root, ignore_errors=True)
    kind.notes.update({f"{k}_s": round(v, 2) for k, v in timing.items()})
    loads, steps_s = [timing["load"]], [timing["step"]]
    resumed = 0
    wheres: dict[str, int] = {}
    for k in range(trials):
        root = copy_workspace(template, base / f"round-{k}")
        logf = base / f"round-{k}.log"
        proc = start(cmd(root), logf)
        stretch = rng.randint(0, TRAIN_STEPS)  # 0: loading and encoding; s: step s; TRAIN_STEPS: saving
        wait_for(lambda r=root: _phase(r, 0, "train") is not None, 300, proc, poll=0.02)
        t_run = time.time()
        if stretch == 0:
            delay = rng.uniform(0, _recent(loads))
        else:
            # the machine's speed changes (other work on it), so each stretch is timed as it happens: the
            # step before the aimed one gives the length of a step now
            marks = {}
            for at in sorted({0, 1, stretch - 1, stretch}):  # the bar shows "at/N" once step `at` starts
                wait_for(lambda f=logf, n=at: _train_step(f, 0) >= n, 600, proc, poll=0.02)
                marks[at] = time.time()
            loads.append(marks[1] - t_run)
            step = marks[stretch] - marks[stretch - 1]
            steps_s.append(step if step > 0.01 else _recent(steps_s))
            now = _recent(steps_s)
            delay = rng.uniform(0, timing["save"] * now / timing["step"] if stretch == TRAIN_STEPS else now)
        time.sleep(delay)
        killed = kill9(proc)
        kind.killed += killed
        where = _train_where(root) if killed else "had finished"
        wheres[where.split(" (")[0]] = wheres.get(where.split(" (")[0], 0) + 1
        closed = _phase(root, 0, "train") == "done"
        lo: dict = {}
        crash = check_store(root, settled=False, leftovers=lo)
        before = snapshot(root)
        # run again, as a person would (`loop run --round`, no number); if the kill came after round 0 was
        # closed, that command would rightly start round 1, so the explicit round only asks "is 0 done?"
        rc, out = run(cmd(root, "0") if closed else cmd(root), logf)
        after = check_store(root)
        resumed += "resuming training from step" in out
        if rc != 0 or not any(s in out for s in ("round 0 done", "round 0 was already done")):
            tail = out.strip().splitlines()[-1:] if out.strip() else ""
            after.append(f"re-run exited {rc} without finishing round 0: {tail}")
        phases = {p: _phase(root, 0, p) for p in ("generate", "rate", "select", "train")}
        if set(phases.values()) != {"done"}:
            after.append(f"round 0 is not closed after the re-run: {phases}")
        lost = lost_images(root, before)
        after += [f"lost image {x}" for x in lost]
        ok = rc == 0 and set(phases.values()) == {"done"}
        kind.reruns_ok += ok
        kind.record(k, crash, after, lost=len(lost))
        for key, v in lo.items():
            kind.notes[f"left_{key}"] = kind.notes.get(f"left_{key}", 0) + v
        aim = "loading" if stretch == 0 else ("saving" if stretch == TRAIN_STEPS else f"step {stretch}")
        _say(
            log,
            f"  round    {k:2d}: aimed at {aim:>8} +{delay:4.2f}s, killed in: {where}; left {lo or 'nothing'}, "
            f"re-run rc {rc}{' (resumed)' if 'resuming training' in out else ''}, problems {len(crash) + len(after)}",
        )
        if not (crash or after):
            shutil.rmtree(root, ignore_errors=True)
    kind.notes["resumed_from_checkpoint"] = resumed
    for w, n in wheres.items():
        kind.notes[f"killed_{w.replace('/', '_').replace(' ', '_')}"] = n
    kind.seconds = round(time.time() - t_start, 1)
    return kind


# -- crash trials: the rating server ----------------------------------------------------------------------
def crash_rate(trials: int, seed: int, base: Path, template: Path, log=print) -> Kind:
    """Kill `loop rate` while two clients post ratings; every acknowledged rating must be in the store.

    The trials share one workspace: trial k's re-run is the next server start, and the store must be settled
    (no leftover of the kill, golden/ in line) as soon as that server answers, before anyone rates again. The
    last re-run also rates once and stops cleanly."""
    rng = random.Random(f"rate-{seed}")
    kind = Kind("rate")
    t_start = time.time()
    root = copy_workspace(template, base / "rate")
    logf = base / "rate.log"
    acked = Acked()
    startups = []
    pending = None  # the last kill: judged once the next server answers
    for k in range(trials + 1):
        try:
            proc, port, up = start_server(root, logf)
        except RuntimeError as e:
            if pending:
                kind.record(pending[0], pending[1], [f"the server did not start again after the kill: {e}"])
            break
        startups.append(up)
        if pending is not None:  # the re-run of the previous trial: the store must be settled now
            pk, crash, lo, delay, n = pending
            after = check_store(root, acked.events)
            kind.reruns_ok += 1
            kind.record(pk, crash, after, lost_r=sum("acknowledged rating" in p for p in crash + after))
            _say(
                log,
                f"  rate     {pk:2d}: killed at +{delay:4.2f}s after {n} acknowledged ratings, left "
                f"{lo or 'nothing'}; restarted in {up:4.1f}s, problems {len(crash) + len(after)}",
            )
        if k == trials:  # the last re-run: rate once more, stop cleanly, and check again
            try:
                ids = json.loads(_get(port, "/loop/api/images")[1])["ids"]
                status, body = _post(
                    port, "/loop/api/rate", {"rater": "final", "ratings": [{"image_id": ids[0], "tier": "UR"}]}
                )
                if status == 200:
                    acked.add([(ids[0], "UR")], "final", json.loads(body))
                else:
                    acked.errors.append(f"final rating: HTTP {status}")
            except (OSError, ValueError, IndexError) as e:
                acked.errors.append(f"final rating: {e}")
            stop_process(proc, signal.SIGINT, 60)
            final = check_store(root, acked.events)
            if final:
                kind.inconsistent += 1
                kind.problems += [f"rate after the last clean stop: {p}" for p in final]
                kind.lost_ratings += sum("acknowledged rating" in p for p in final)
            break
        before = len(acked.events)
        stop = threading.Event()
        raters = [Rater(port, f"crash{k}{c}", acked, rng.randrange(1 << 30), stop) for c in "ab"]
        for r in raters:
            r.start()
        delay = rng.uniform(0.3, 3.0)
        time.sleep(delay)
        kind.killed += kill9(proc)
        stop.set()
        for r in raters:
            r.join(timeout=60)
        lo: dict = {}
        crash = check_store(root, acked.events, settled=False, leftovers=lo)
        for key, v in lo.items():
            kind.notes[f"left_{key}"] = kind.notes.get(f"left_{key}", 0) + v
        pending = (k, crash, lo, delay, len(acked.events) - before)
    kind.problems += [f"rate: error response {e}" for e in acked.errors]
    out = logf.read_text(encoding="utf-8", errors="replace")
    kind.notes["acknowledged_ratings"] = len(acked.events)
    kind.notes["error_responses"] = len(acked.errors)
    kind.notes["database_locked"] = out.lower().count("database is locked")
    kind.notes["server_start_s"] = round(sum(startups) / max(1, len(startups)), 2)
    kind.seconds = round(time.time() - t_start, 1)
    return kind


# -- concurrency ------------------------------------------------------------------------------------------
def concurrency(seconds: float, seed: int, base: Path, template: Path, log=print) -> Kind:
    """`loop generate --forever` and a `loop rate` server on one workspace, two raters rating as fast as they
    can, for `seconds`; then both processes are stopped gracefully and everything is counted."""
    kind = Kind("concurrency")
    t_start = time.time()
    root = copy_workspace(template, base / "concurrency")
    gen_log, srv_log = base / "concurrency-generate.log", base / "concurrency-rate.log"
    images_before = _count(root, "images")
    server, port, up = start_server(root, srv_log)
    gen = start(loop_cmd("generate", "--forever", "-w", str(root), *GEN), gen_log)
    if not wait_for(lambda: b"generate unit" in gen_log.read_bytes(), 300, gen):
        kill9(gen)
        kill9(server)
        raise RuntimeError(f"the generator did not start: {gen_log.read_text(errors='replace')[-1500:]}")
    acked = Acked()
    stop = threading.Event()
    rng = random.Random(f"concurrency-{seed}")
    raters = [Rater(port, f"conc-{c}", acked, rng.randrange(1 << 30), stop, refresh=0.5) for c in "ab"]
    for r in raters:
        r.start()
    time.sleep(seconds)
    # at least one image written while the raters rated (a loaded machine may not have made one yet)
    wait_for(lambda: _count(root, "images") > images_before, 300, gen, poll=0.2)
    stop.set()
    for r in raters:
        r.join(timeout=120)
    gen_rc = stop_process(gen, signal.SIGTERM, 180)
    stop_process(server, signal.SIGINT, 60)
    problems = check_store(root, acked.events)
    db = _connect(root)
    in_db = db.execute("SELECT COUNT(*) FROM ratings WHERE rater IN ('conc-a', 'conc-b')").fetchone()[0]
    images_after = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    db.close()
    texts = gen_log.read_text(errors="replace") + srv_log.read_text(errors="replace")
    locked = texts.lower().count("database is locked")
    tracebacks = texts.count("Traceback")
    lost_r = sum("acknowledged rating" in p for p in problems)
    if gen_rc != 0:
        problems.append(f"the generator did not stop cleanly on SIGTERM (exit {gen_rc})")
    if any(r.gone for r in raters):
        problems.append("a rater lost its connection to a running server")
    if in_db != len(acked.events):
        problems.append(f"{len(acked.events)} events acknowledged but {in_db} in the database")
    if locked:
        problems.append(f"'database is locked' {locked} time(s) in the output")
    if tracebacks:
        problems.append(f"{tracebacks} traceback(s) in the output")
    problems += [f"error response: {e}" for e in acked.errors]
    kind.record(0, [], problems, lost_r=lost_r)
    kind.reruns_ok = 1 if not problems else 0
    kind.notes.update(
        seconds=seconds,
        requests=acked.requests,
        events_posted=acked.posted,
        events_acknowledged=len(acked.events),
        events_in_db=in_db,
        error_responses=len(acked.errors),
        database_locked=locked,
        tracebacks=tracebacks,
        images_generated=images_after - images_before,
        ratings_per_s=round(len(acked.events) / seconds, 1),
        server_start_s=round(up, 2),
    )
    _say(
        log,
        f"  concurrency: {seconds:.0f}s, {acked.requests} requests, {acked.posted} events posted, "
        f"{len(acked.events)} acknowledged, {in_db} in the database, {images_after - images_before} images made, "
        f"{len(acked.errors)} error responses, {locked} 'database is locked', problems {len(problems)}",
    )
    kind.seconds = round(time.time() - t_start, 1)
    return kind


# -- the report -------------------------------------------------------------------------------------------
def table(kinds: list[Kind]) -> str:
    head = f"{'trial':<12} {'trials':>6} {'killed':>6} {'lost images':>11} {'lost acked ratings':>18} "
    head += f"{'inconsistent':>12} {'re-runs ok':>10} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for k in kinds:
        lines.append(
            f"{k.name:<12} {k.trials:>6} {k.killed:>6} {k.lost_images:>11} {k.lost_ratings:>18} "
            f"{k.inconsistent:>12} {k.reruns_ok:>10} {k.seconds:>8.0f}"
        )
    return "\n".join(lines)


def figures(kinds: list[Kind]) -> dict:
    """A flat object: per kind, then totals."""
    out: dict = {}
    for k in kinds:
        p = k.name
        out.update(
            {
                f"{p}_trials": k.trials,
                f"{p}_killed": k.killed,
                f"{p}_lost_images": k.lost_images,
                f"{p}_lost_acked_ratings": k.lost_ratings,
                f"{p}_inconsistent": k.inconsistent,
                f"{p}_reruns_ok": k.reruns_ok,
                f"{p}_seconds": k.seconds,
            }
        )
        out.update({f"{p}_{n}": v for n, v in k.notes.items()})
    return out


def write_figures(kinds: list[Kind], path: Path = OUT) -> dict:
    """Merge these kinds' figures into `path` (a crash-only run keeps the concurrency figures, and so on)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    new = figures(kinds)
    names = {k.name for k in kinds}
    old = {k: v for k, v in old.items() if k.split("_")[0] not in names and not k.startswith(("total_", "failure"))}
    merged = {**old, **new}
    kinds_in = sorted({k.split("_")[0] for k in merged if k.endswith("_trials")})
    for what in ("trials", "lost_images", "lost_acked_ratings", "inconsistent"):
        merged[f"total_{what}"] = sum(merged.get(f"{k}_{what}", 0) for k in kinds_in)
    problems = [p for k in kinds for p in k.problems]
    merged["failures_found"] = len(problems)
    merged["failures"] = "; ".join(problems)[:1000] or "none"
    merged.update(
        load_avg_1m=round(os.getloadavg()[0], 2),
        cpus=os.cpu_count(),
        machine=f"{os.uname().machine} {os.uname().sysname}",
        date=time.strftime("%Y-%m-%d"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv: list[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    ap = argparse.ArgumentParser(prog="python -m loop.trials", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "crash", "concurrency"])
    ap.add_argument("--trials", type=int, default=20, help="crash trials of each kind")
    ap.add_argument("--seconds", type=float, default=180, help="length of the concurrency trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="generate,round,rate", help="crash kinds to run (comma-separated)")
    ap.add_argument("--keep", action="store_true", help="keep the trial workspaces (their path is printed)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="loop-trials-"))
    print(f"trial workspaces in {base}", flush=True)
    kinds: list[Kind] = []
    try:
        template = round_template(base)
        if a.what in ("all", "crash"):
            chosen = a.kinds.split(",")
            if "generate" in chosen:
                kinds.append(crash_generate(a.trials, a.seed, base))
            if "round" in chosen:
                kinds.append(crash_round(a.trials, a.seed, base, template))
            if "rate" in chosen:
                kinds.append(crash_rate(a.trials, a.seed, base, template))
        if a.what in ("all", "concurrency"):
            kinds.append(concurrency(a.seconds, a.seed, base, template))
    finally:
        if kinds:
            print()
            print(table(kinds))
            merged = write_figures(kinds, a.out)
            print(
                f"\ntotal: {merged['total_trials']} trials, {merged['total_lost_images']} lost images, "
                f"{merged['total_lost_acked_ratings']} lost acknowledged ratings, "
                f"{merged['total_inconsistent']} inconsistent stores; figures in {a.out}"
            )
            for k in kinds:
                for p in k.problems:
                    print(f"  FAILURE {p}")
        if not a.keep and not any(k.problems for k in kinds):
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"workspaces kept in {base}")
    return 0 if kinds and not any(k.problems for k in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
