"""loop.db: the SQLite store (WAL) of images, rating events, rounds with their phases, and units.

    loop status      reads it;  every other command writes it

Ratings are append-only events. An undo is itself an event that points at the event it cancels. An image's
current tier is the newest event of any rater that is not an undo and has not been undone
(last decision wins), so "who rated what" and undo come for free and nothing is ever overwritten.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

from loop.config import TIERS
from loop.errors import LoopError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,              -- relative to the workspace
    unit INTEGER,                    -- the unit that generated it; NULL for imported images
    round INTEGER,                   -- the round it was generated in
    prompt TEXT NOT NULL DEFAULT '',
    negative_prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    steps INTEGER,
    cfg REAL,
    sampler TEXT,
    width INTEGER,
    height INTEGER,
    parent_id INTEGER REFERENCES images(id),
    source TEXT NOT NULL DEFAULT 'generated',
    params TEXT NOT NULL DEFAULT '{}', -- everything else, JSON
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_unit ON images(unit);
CREATE INDEX IF NOT EXISTS images_round ON images(round);
CREATE INDEX IF NOT EXISTS images_unit_prompt_seed ON images(unit, prompt, seed);  -- "made already?" per batch
CREATE INDEX IF NOT EXISTS images_parent ON images(parent_id);

CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    tier TEXT CHECK (tier IN ('UR', 'SSR', 'SR', 'R', 'N')),  -- NULL only for an undo event
    rater TEXT NOT NULL,
    undoes INTEGER REFERENCES ratings(id),                    -- set on undo events
    created_at REAL NOT NULL,
    client_key TEXT,  -- the page's key for this event: a resent event (same key) is stored once; see _migrate
    CHECK ((tier IS NULL) = (undoes IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS ratings_image ON ratings(image_id);
CREATE INDEX IF NOT EXISTS ratings_undoes ON ratings(undoes);  -- the views' NOT EXISTS needs it (10k: 17 s -> 34 ms)

CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,       -- round N turns unit N into unit N+1
    started_at REAL NOT NULL,
    closed_at REAL
);

CREATE TABLE IF NOT EXISTS phases (
    round INTEGER NOT NULL REFERENCES rounds(round),
    phase TEXT NOT NULL CHECK (phase IN ('generate', 'rate', 'select', 'train')),
    status TEXT NOT NULL CHECK (status IN ('running', 'done')),
    started_at REAL NOT NULL,
    finished_at REAL,
    detail TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round, phase)
);

CREATE TABLE IF NOT EXISTS units (
    unit INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES units(unit),
    path TEXT,                       -- checkpoints/unit_NNN, NULL for the base model
    base TEXT NOT NULL,
    method TEXT,
    strategy TEXT,
    created_at REAL NOT NULL,
    manifest TEXT NOT NULL DEFAULT '{}',
    promoted INTEGER,                -- the promotion gate: NULL not checked yet, 1 generates, 0 refused
    gate TEXT                        -- the gate's figures and reasons (JSON), and any `loop promote` override
);

-- small named states, JSON: the prompt ring's position per generator process
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);

-- effective rating events: not undo events, and not undone
CREATE VIEW IF NOT EXISTS effective_ratings AS
    SELECT r.* FROM ratings r
    WHERE r.undoes IS NULL AND NOT EXISTS (SELECT 1 FROM ratings u WHERE u.undoes = r.id);

-- the current tier of each rated image: its newest effective event
CREATE VIEW IF NOT EXISTS current_tiers AS
    SELECT e.image_id, e.tier, e.rater, e.created_at FROM effective_ratings e
    WHERE e.id = (SELECT MAX(e2.id) FROM effective_ratings e2 WHERE e2.image_id = e.image_id);
"""

PHASES = ("generate", "rate", "select", "train")
# the images columns a PNG's `loop` metadata fills in (everything else stays in `params`)
IMAGE_COLUMNS = ("prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "width", "height", "unit", "round")


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        # autocommit mode; writes group themselves with `with self.tx():`
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            if isinstance(e, sqlite3.OperationalError):  # locked, read-only, a folder in its place: not corruption
                raise
            raise LoopError(
                f"{self.path} is not a loop database ({e}); move it aside (for example "
                f"`mv {self.path} {self.path}.bad`), then `loop init {self.path.parent}` starts a new one"
            ) from e

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to SCHEMA (columns added since; nothing removed).

        units.promoted and units.gate: the promotion gate's verdict on each unit; the units of a database made
        before the gate were all generating, so they count as promoted.

        ratings.client_key: the rating page sends each rating and undo with a key it makes, and keeps its queue
        in the browser until the server answers, so a page reloaded or closed before the answer sends the same
        events again; the unique key makes that resend a no-op instead of a second event."""

        def has_column(table: str = "ratings", column: str = "client_key") -> bool:
            return any(r[1] == column for r in self.db.execute(f"PRAGMA table_info({table})"))

        if not has_column():  # checked first: opening a current database takes no write lock
            with self.tx():  # BEGIN IMMEDIATE: of two processes opening an old database, one adds the column
                if not has_column():
                    self.db.execute("ALTER TABLE ratings ADD COLUMN client_key TEXT")
        if not has_column("units", "promoted"):
            with self.tx():  # units.promoted and units.gate: the units of a database from before the gate generate
                if not has_column("units", "promoted"):
                    self.db.execute("ALTER TABLE units ADD COLUMN promoted INTEGER")
                    self.db.execute("ALTER TABLE units ADD COLUMN gate TEXT")
                    self.db.execute("UPDATE units SET promoted = 1")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'ratings_client_key'").fetchone():
            self.db.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS ratings_client_key ON ratings(client_key) "
                "WHERE client_key IS NOT NULL"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tx(self):
        return _Tx(self.db)

    # -- images --------------------------------------------------------------------------------------------
    def add_image(self, *, sha256: str, path: str, prompt: str = "", params: dict | None = None, **cols) -> int:
        """Insert an image row (idempotent on sha256) and return its id."""
        fields = dict(sha256=sha256, path=path, prompt=prompt, params=json.dumps(params or {}), created_at=time.time())
        fields.update({k: v for k, v in cols.items() if v is not None})
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.tx():
            self.db.execute(f"INSERT OR IGNORE INTO images ({names}) VALUES ({marks})", tuple(fields.values()))
            return self.db.execute("SELECT id FROM images WHERE sha256 = ?", (sha256,)).fetchone()[0]

    def image(self, image_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()

    def images(self, *, unit: int | None = None, round: int | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT i.*, t.tier FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id WHERE 1", []
        if unit is not None:
            sql += " AND i.unit = ?"
            args.append(unit)
        if round is not None:
            sql += " AND i.round = ?"
            args.append(round)
        return self.db.execute(sql + " ORDER BY i.id", args).fetchall()

    def made_seeds(self, unit: int, prompt: str, seeds: list[int]) -> set[int]:
        """Which of `seeds` this unit already made for `prompt` (txt2img; variations have a parent)."""
        if not seeds:
            return set()
        marks = ",".join("?" for _ in seeds)
        rows = self.db.execute(
            f"SELECT seed FROM images WHERE unit = ? AND prompt = ? AND parent_id IS NULL AND seed IN ({marks})",
            (unit, prompt, *seeds),
        )
        return {r[0] for r in rows}

    def children(self, parent_id: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM images WHERE parent_id = ? ORDER BY id", (parent_id,)).fetchall()

    def image_by_sha(self, sha_or_prefix: str) -> list[sqlite3.Row]:
        """Images whose sha256 starts with the given hex (a full hash gives at most one)."""
        return self.db.execute(
            "SELECT * FROM images WHERE sha256 >= ? AND sha256 < ? ORDER BY id LIMIT 2",
            (sha_or_prefix.lower(), sha_or_prefix.lower() + "g"),
        ).fetchall()

    # -- small states ----------------------------------------------------------------------------------------
    def get_state(self, key: str) -> dict | None:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def latest_state(self, prefix: str) -> dict | None:
        row = self.db.execute(
            "SELECT value FROM state WHERE key >= ? AND key < ? ORDER BY updated_at DESC LIMIT 1",
            (prefix, prefix + "\uffff"),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def set_state(self, key: str, value: dict) -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR REPLACE INTO state (key, value, updated_at) VALUES (?, ?, ?)",
                (key, json.dumps(value), time.time()),
            )

    def states(self, prefix: str) -> list[tuple[str, dict]]:
        rows = self.db.execute(
            "SELECT key, value FROM state WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\uffff")
        ).fetchall()
        return [(k, json.loads(v)) for k, v in rows]

    def drop_state(self, key: str) -> None:
        with self.tx():
            self.db.execute("DELETE FROM state WHERE key = ?", (key,))

    def known_paths(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT path FROM images")}

    # -- ratings -------------------------------------------------------------------------------------------
    def rate(self, image_id: int, tier: str, rater: str) -> int:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO ratings (image_id, tier, rater, created_at) VALUES (?, ?, ?, ?)",
                (image_id, tier, rater, time.time()),
            )
            return cur.lastrowid

    def rate_many(self, items: list[tuple[int, str]], rater: str, keys: list[str | None] | None = None) -> list[int]:
        """Append one event per (image id, tier), in order, in one transaction; returns the event ids.

        `keys`: one client key (or None) per item; an item whose key is stored already is not stored again (a
        page resending what it could not see committed) and its existing event's id is returned."""
        now = time.time()
        keys = keys if keys is not None else [None] * len(items)
        out = []
        with self.tx():
            for (i, t), key in zip(items, keys, strict=True):
                old = self._event_with_key(key)
                if old is not None:
                    out.append(old["id"])
                    continue
                out.append(
                    self.db.execute(
                        "INSERT INTO ratings (image_id, tier, rater, created_at, client_key) VALUES (?, ?, ?, ?, ?)",
                        (i, t, rater, now, key),
                    ).lastrowid
                )
        return out

    def _event_with_key(self, key: str | None) -> sqlite3.Row | None:
        if key is None:
            return None
        return self.db.execute("SELECT id, image_id FROM ratings WHERE client_key = ?", (key,)).fetchone()

    def undo(self, rater: str, key: str | None = None) -> int | None:
        """Cancel this rater's newest effective rating; returns the image id it applied to, or None. `key`: as
        in rate_many (an undo resent with a stored key undoes nothing more and returns its image id)."""
        with self.tx():
            old = self._event_with_key(key)
            if old is not None:
                return old["image_id"]
            row = self.db.execute(
                "SELECT id, image_id FROM effective_ratings WHERE rater = ? ORDER BY id DESC LIMIT 1", (rater,)
            ).fetchone()
            if row is None:
                return None
            self.db.execute(
                "INSERT INTO ratings (image_id, tier, rater, undoes, created_at, client_key) "
                "VALUES (?, NULL, ?, ?, ?, ?)",
                (row["image_id"], rater, row["id"], time.time(), key),
            )
            return row["image_id"]

    def tier_of(self, image_id: int) -> str | None:
        row = self.db.execute("SELECT tier FROM current_tiers WHERE image_id = ?", (image_id,)).fetchone()
        return row[0] if row else None

    def tier_counts(self, *, unit: int | None = None, round: int | None = None) -> Counter:
        """Counter of current tiers (None for unrated) over the chosen images."""
        return Counter(r["tier"] for r in self.images(unit=unit, round=round))

    # -- rounds and phases ---------------------------------------------------------------------------------
    def start_round(self, n: int) -> None:
        with self.tx():
            self.db.execute("INSERT OR IGNORE INTO rounds (round, started_at) VALUES (?, ?)", (n, time.time()))

    def phase(self, n: int, phase: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM phases WHERE round = ? AND phase = ?", (n, phase)).fetchone()

    def phase_done(self, n: int, phase: str) -> bool:
        row = self.phase(n, phase)
        return row is not None and row["status"] == "done"

    def begin_phase(self, n: int, phase: str) -> None:
        self.start_round(n)
        with self.tx():
            self.db.execute(
                "INSERT OR IGNORE INTO phases (round, phase, status, started_at) VALUES (?, ?, 'running', ?)",
                (n, phase, time.time()),
            )

    def finish_phase(self, n: int, phase: str, detail: dict | None = None) -> None:
        self.begin_phase(n, phase)
        with self.tx():
            self.db.execute(
                "UPDATE phases SET status = 'done', finished_at = ?, detail = ? WHERE round = ? AND phase = ?",
                (time.time(), json.dumps(detail or {}), n, phase),
            )
            if phase == PHASES[-1]:
                self.db.execute("UPDATE rounds SET closed_at = ? WHERE round = ?", (time.time(), n))

    def phases(self, n: int) -> dict[str, sqlite3.Row]:
        return {r["phase"]: r for r in self.db.execute("SELECT * FROM phases WHERE round = ?", (n,))}

    # -- units ---------------------------------------------------------------------------------------------
    def ensure_base_unit(self, base: str) -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR IGNORE INTO units (unit, parent, path, base, created_at, promoted) "
                "VALUES (0, NULL, NULL, ?, ?, 1)",
                (base, time.time()),
            )

    def add_unit(
        self, unit: int, *, parent: int, path: str, base: str, method: str, strategy: str, manifest: dict
    ) -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR REPLACE INTO units (unit, parent, path, base, method, strategy, created_at, manifest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (unit, parent, path, base, method, strategy, time.time(), json.dumps(manifest)),
            )

    def units(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM units ORDER BY unit").fetchall()

    def unit(self, n: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM units WHERE unit = ?", (n,)).fetchone()

    def current_unit(self) -> int:
        """The newest unit, promoted or not: round N is the one that trains unit N+1."""
        row = self.db.execute("SELECT MAX(unit) FROM units").fetchone()
        return row[0] if row and row[0] is not None else 0

    def generating_unit(self, upto: int | None = None) -> int:
        """The unit that generates: the newest one (at most `upto`) that the promotion gate passed or `loop
        promote` promoted. Unit 0, the base model, always counts; a refused or not yet checked unit never does."""
        sql = "SELECT MAX(unit) FROM units WHERE (unit = 0 OR promoted = 1)"
        row = self.db.execute(sql + (" AND unit <= ?" if upto is not None else ""), (() if upto is None else (upto,)))
        row = row.fetchone()
        return row[0] if row and row[0] is not None else 0

    def set_gate(self, unit: int, result: dict, promoted: bool) -> None:
        """Record the promotion gate's verdict on a unit: its figures (JSON) and whether it generates."""
        with self.tx():
            self.db.execute(
                "UPDATE units SET promoted = ?, gate = ? WHERE unit = ?",
                (int(bool(promoted)), json.dumps(result), unit),
            )

    def promote(self, unit: int, by: str) -> dict:
        """`loop promote`: the unit generates whatever the gate said; the override (who, when) is kept in its gate
        JSON beside the gate's own figures. Returns that JSON."""
        with self.tx():
            row = self.unit(unit)
            if row is None:
                raise ValueError(f"unit {unit} does not exist")
            gate = json.loads(row["gate"] or "{}")
            gate.update(overridden=True, by=by, at=time.time())
            self.db.execute("UPDATE units SET promoted = 1, gate = ? WHERE unit = ?", (json.dumps(gate), unit))
        return gate

    def gate(self, unit: int) -> dict | None:
        """The unit's gate JSON, or None when the gate has not looked at it."""
        row = self.unit(unit)
        return json.loads(row["gate"]) if row is not None and row["gate"] else None


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error); nests as a no-op inside an open transaction."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.db

    def __exit__(self, exc_type, *exc):
        if self.outer:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")


# -- what the phase records allow (the round, the page, the gate and training all ask) -------------------------
def rating_summary(store: Store, n: int) -> str:
    counts = store.tier_counts(round=n)
    total = sum(counts.values())
    rated = total - counts.get(None, 0)
    return f"{rated}/{total} rated (" + ", ".join(f"{t} {counts.get(t, 0)}" for t in TIERS) + ")"


def check_can_finish_rating(store: Store, n: int) -> None:
    """LoopError if round n's ratings cannot be closed yet: while `loop run --round` is generating it (or was
    killed doing so), or while the round has no image at all. Closing them then would let the next `loop run
    --round` make images and go straight on to select and train, past images nobody has seen. (Images of the
    round made by `loop generate` outside the round's own generate phase, the ring buffer, count.)"""
    started = store.phase(n, "generate")
    if started is not None and started["status"] != "done":
        # `loop run --round` began generating this round and has not finished (killed, or running now): closing
        # the ratings now would let it make the rest and train on them unseen
        made = sum(store.tier_counts(round=n).values())
        raise LoopError(
            f"round {n} is still generating ({made} image(s) so far; its generate phase has not finished); run "
            f"`loop run --round` to finish it (it then waits for your ratings), and finish rating after that"
        )
    if not store.phase_done(n, "generate") and not sum(store.tier_counts(round=n).values()):
        raise LoopError(
            f"round {n} has no images yet, so there is nothing to finish rating; run `loop run --round` (it "
            f"generates, then waits for your ratings) or `loop generate`"
        )


def finish_rating(store: Store, n: int) -> None:
    """Close round n's rate phase (see check_can_finish_rating for when that is refused)."""
    check_can_finish_rating(store, n)
    store.finish_phase(n, "rate", {"summary": rating_summary(store, n), "by": "person"})


def raise_missing_unit(store: Store, n: int):
    """LoopError naming the units there are and how to make the next one."""
    have = [r["unit"] for r in store.units()]
    if not have:  # not even unit 0: no round has started in this workspace
        raise LoopError(
            f"unit {n} does not exist: no round has started here yet; `loop run --round` generates with the base "
            "model (unit 0), waits for your ratings, then selects and trains unit 1"
        )
    raise LoopError(
        f"unit {n} does not exist (units: {', '.join(map(str, have))}); "
        f"run `loop run --round {max(have)}` to make the next one"
    )
