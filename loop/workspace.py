"""The workspace on disk: folders, naming, and atomic writes.

    loop init DIR        lays out DIR (configs/, generations/, checkpoints/, golden/, cache/, loop.db)

Every file is written to a temporary name in its destination folder and renamed into place, so a reader
never sees half a file. `Workspace.open()` also recovers from a crash: stray temporary files are removed
and a finished PNG whose database row never got written is adopted from its own metadata.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from loop.errors import LoopError

FOLDERS = ("configs", "generations", "checkpoints", "golden", "cache")
TMP_MARK = ".tmp-"

DEFAULT_PROMPTS = """\
# One prompt per line; blank lines and lines starting with '#' are skipped.
# `loop generate` and `loop run --round` make generate.images_per_prompt images of each line.
a circle
a square
a triangle
a ring
"""

DEFAULT_YAML = """\
# Your settings, merged over the built-in defaults (see `loop config` for every key).
# Any key can also be given on the command line, e.g. `loop run --round train.steps=500`.
model:
  base: embedded   # the shipped tiny model; or a local diffusers folder, or a hub id
"""


def unit_name(n: int) -> str:
    return f"unit_{n:03d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write to a temporary sibling, fsync, then rename over `path`.

    mkstemp creates the file 0600; it is given the mode a plain open() would (0666 less the umask), so a
    workspace shared by a group stays readable by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    # the writer's pid is in the name, so recovery never deletes a file another live process is writing
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.root / "loop.db"

    @property
    def prompts_path(self) -> Path:
        return self.root / "configs" / "prompts.txt"

    def generations(self, unit: int) -> Path:
        return self.root / "generations" / unit_name(unit)

    def checkpoint(self, unit: int) -> Path:
        return self.root / "checkpoints" / unit_name(unit)

    def cache(self, *parts: str) -> Path:
        return self.root.joinpath("cache", *parts)

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def inside(self, rel: str) -> Path:
        """Resolve a workspace-relative path, refusing anything that lands outside the workspace."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise LoopError(f"{rel!r} is outside the workspace {self.root}; use a path inside it")
        return p

    # -- lifecycle -----------------------------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path) -> Workspace:
        """Create the folders, a starter config and prompt file (never overwriting), and the database."""
        ws = cls(root)
        ws.root.mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            (ws.root / name).mkdir(exist_ok=True)
        if not (ws.root / "configs" / "loop.yaml").exists():
            atomic_write(ws.root / "configs" / "loop.yaml", DEFAULT_YAML)
        if not ws.prompts_path.exists():
            atomic_write(ws.prompts_path, DEFAULT_PROMPTS)
        from loop.store import Store

        Store(ws.db_path).close()
        return ws

    @classmethod
    def open(cls, root: Path) -> Workspace:
        """An existing workspace: it has loop.db, or at least configs/ (like the repository root)."""
        ws = cls(root)
        if ws.db_path.exists():
            for name in FOLDERS:
                (ws.root / name).mkdir(exist_ok=True)
            return ws
        if not (ws.root / "configs").is_dir():
            above = next((p for p in ws.root.parents if (p / "loop.db").is_file() and (p / "configs").is_dir()), None)
            if above is not None:  # inside a workspace's folder (generations/, say): `loop init .` would nest one
                raise LoopError(f"{ws.root} is inside the workspace {above}; run there, or add `-w {above}`")
            raise LoopError(
                f"{ws.root} is not a loop workspace (no loop.db, no configs/); run `loop init {root}` first"
            )
        return cls.init(root)  # a ready layout without its database yet, like the repository root

    def store(self):
        from loop.store import Store

        return Store(self.db_path)


def recover(ws: Workspace, store, log=print) -> dict:
    """Undo what a crash can leave: delete temporary files, adopt finished PNGs that have no row, and bring
    golden/ back in line with the current UR set.

    A PNG is renamed into place before its row is inserted, so a crash in between leaves a complete,
    self-describing file; its `loop` metadata chunk is enough to write the row it lacks.
    """
    from loop.images import read_meta
    from loop.store import IMAGE_COLUMNS

    removed = adopted = 0
    for folder in ("generations", "golden", "checkpoints", "cache"):
        for tmp in (ws.root / folder).rglob(f"*{TMP_MARK}*"):
            if writer_alive(tmp.name):  # another process (a generator running alongside) is writing it now
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    known = store.known_paths()
    for png in sorted((ws.root / "generations").rglob("*.png")):
        rel = ws.rel(png)
        if rel in known:
            continue
        meta = read_meta(png)
        if meta is None:
            log(f"warning: {rel} has no loop metadata; left as it is (move it out, or `loop import` it)")
            continue
        sha = sha256_file(png)
        if store.image_by_sha(sha):  # a copy of an image the store has at another path: nothing to adopt
            continue
        cols = {k: meta.get(k) for k in IMAGE_COLUMNS}
        cols["prompt"] = cols["prompt"] or ""
        if meta.get("parent"):
            found = store.image_by_sha(str(meta["parent"]))
            cols["parent_id"] = found[0]["id"] if found else None
        image_id = store.add_image(sha256=sha, path=rel, params=meta, source=meta.get("source", "generated"), **cols)
        if store.image(image_id)["path"] == rel:  # the insert is ignored when another process added it meanwhile
            adopted += 1
    removed += _drop_unrecorded_imports(ws, store, known, log)
    golden = resync_golden(ws, store)
    if removed or adopted or golden:
        log(
            f"recovered: removed {removed} temporary file(s), adopted {adopted} image(s) without a row"
            + (f", brought {golden} image(s) of golden/ in line with their tier" if golden else "")
        )
    return {"removed": removed, "adopted": adopted, "golden": golden}


IMPORT_PENDING = "import.pending."  # + the copy's path: `loop import` is between renaming a copy and its row


def _drop_unrecorded_imports(ws: Workspace, store, known: set, log=print) -> int:
    """Remove the copies in golden/ that an import renamed into place but was killed before recording.

    `loop import` names its copy by the first 16 hex digits of its sha256, notes it in the database's journal
    (state key IMPORT_PENDING + path) before the rename, and drops the note with the row. A kill in between leaves
    a copy no row knows, with nothing in it to rebuild the row from (tier and source were on the command line);
    the original is still where it was imported from, so the copy goes and the same import brings it back. Only
    a copy its note names, with the same sha256, whose import is not running: a file in golden/ that no note
    names (a UR image's link, a file someone put there, golden/ kept from an earlier loop.db) is never touched.
    """
    dropped = 0
    for key, note in store.states(IMPORT_PENDING):
        rel = key[len(IMPORT_PENDING) :]
        if pid_alive(note.get("pid")):
            continue  # an import running now keeps its own
        f = ws.root / rel
        if rel not in known and f.is_file() and not f.is_symlink() and sha256_file(f) == note.get("sha256"):
            if not store.image_by_sha(note["sha256"]):
                f.unlink()
                dropped += 1
                log(f"removed {rel}: an import was cut short before recording it; run that import again")
        store.drop_state(key)
    return dropped


# -- golden/: the current UR set, kept by the page, the scripted rater, imports and recovery alike -------------
def golden_path(ws: Workspace, sha256: str, rel: str) -> Path:
    return ws.root / "golden" / f"{sha256[:16]}{Path(rel).suffix or '.png'}"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst atomically (link to a temporary name, rename); copy where links are impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(dst, src.read_bytes())


def sync_golden(ws: Workspace, store, image_id: int) -> dict:
    """Bring golden/ in line with the image's current tier; returns that tier, who gave it, and golden."""
    row = store.image(image_id)
    cur = store.db.execute("SELECT tier, rater FROM current_tiers WHERE image_id = ?", (image_id,)).fetchone()
    tier, rater = (cur["tier"], cur["rater"]) if cur else ("", "")
    src = ws.root / row["path"]
    dst = golden_path(ws, row["sha256"], row["path"])
    if src.resolve() == dst.resolve():  # the image itself lives in golden/ (an import): never touch it
        return {"tier": tier, "rater": rater, "golden": True}
    if tier == "UR" and not dst.exists() and src.exists():
        link_or_copy(src, dst)
    elif tier != "UR" and dst.exists():
        dst.unlink()
    return {"tier": tier, "rater": rater, "golden": dst.exists()}


def resync_golden(ws: Workspace, store) -> int:
    """Make golden/ mirror the current UR set again; returns how many images needed it.

    A rating is committed before its image is linked into (or removed from) golden/, so a kill in between
    leaves a UR image outside golden/ (or a demoted one inside), and no later rating of other images fixes it.
    """
    ur = {r[0] for r in store.db.execute("SELECT image_id FROM current_tiers WHERE tier = 'UR'")}
    fixed = 0
    for row in store.db.execute("SELECT id, sha256, path FROM images").fetchall():
        dst = golden_path(ws, row["sha256"], row["path"])
        if (row["id"] in ur) != dst.exists() and dst != ws.root / row["path"]:
            sync_golden(ws, store, row["id"])
            fixed += 1
    return fixed


def writer_alive(name: str) -> bool:
    """True when the temporary file's name carries the pid of a running process other than this one."""
    pid = name.split(TMP_MARK, 1)[-1].split("-", 1)
    return len(pid) == 2 and pid[0].isdigit() and pid_alive(int(pid[0]))


def pid_alive(pid) -> bool:
    """True when `pid` is a running process other than this one."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


LOCK_FILE = ".loop.lock"
LAUNCHED_ENV = "LOOP_LAUNCHED"  # set in the workers `loop ... --processes N` starts (loop.cli._launch)


@contextmanager
def work_lock(ws: Workspace, what: str):
    """One `loop run --round` or `loop train` per workspace at a time: two would generate the same images twice
    and train the same unit into one checkpoint folder. An OS lock (flock) on LOCK_FILE, so a killed holder
    frees it at once; the file names the holder for the message. The workers of `--processes N` (and ranks
    above 0 of an `accelerate launch`) run under their launcher's lock."""
    import fcntl

    if os.environ.get(LAUNCHED_ENV) or os.environ.get("RANK", "0") != "0":
        yield
        return
    f = open(ws.root / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another loop command"
            raise LoopError(
                f"{who} is working on this workspace now; wait for it to end (or stop it), then run this again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"`loop {what}` (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def lock_holder(ws: Workspace) -> str | None:
    """Who holds work_lock now ("`loop run --round` (pid N)"), or None."""
    import fcntl

    path = ws.root / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another loop command"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None
