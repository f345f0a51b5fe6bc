"""Blind A/B votes between units, and their Bradley-Terry ranking.

A pair is two images of different units made from the same prompt, negative prompt, seed, size, steps, CFG and
sampler (txt2img), so the unit is the only difference. The page shows them with the sides randomised and without
anything that tells the units apart: the pair has a random one-time token, its images are served under that
token (not by id: ids grow with the units) with their metadata stripped (the PNG text names the unit) and no
dates, and the ranking stays folded away while one votes (it would show whose wins just went up). A person
presses left, right, tie or skip. Votes are append-only rows in `ab_votes`, one per pair served (a token is
spent by its vote); the ranking is a Bradley-Terry fit over every vote, with bootstrap 95% intervals
(loop.metrics), shown with the votes behind it.
"""

from __future__ import annotations

import io
import random
import secrets
import threading
import time
from collections import OrderedDict

from loop.rate.handlers import BadRequest, NotFound, check_rater
from loop.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS ab_votes (
    id INTEGER PRIMARY KEY,
    left_id INTEGER NOT NULL REFERENCES images(id),
    right_id INTEGER NOT NULL REFERENCES images(id),
    left_unit INTEGER NOT NULL,
    right_unit INTEGER NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('left', 'right', 'tie')),
    rater TEXT NOT NULL,
    created_at REAL NOT NULL
);
-- a vote taken back (append-only, as ratings' undo events): it no longer counts, and its row stays
CREATE TABLE IF NOT EXISTS ab_undone (
    vote_id INTEGER PRIMARY KEY REFERENCES ab_votes(id),
    rater TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
COUNTED = "id NOT IN (SELECT vote_id FROM ab_undone)"

PAIR_JOIN = """
FROM images a JOIN images b
  ON a.prompt = b.prompt AND a.seed = b.seed AND a.unit < b.unit
 AND a.negative_prompt = b.negative_prompt
 AND a.width IS b.width AND a.height IS b.height
 AND a.steps IS b.steps AND a.cfg IS b.cfg AND a.sampler IS b.sampler
 AND a.parent_id IS NULL AND b.parent_id IS NULL
WHERE a.unit IS NOT NULL AND b.unit IS NOT NULL {units}
  AND COALESCE(json_extract(a.params, '$.exploration'), 0) = 0
  AND COALESCE(json_extract(b.params, '$.exploration'), 0) = 0
"""
PAIRS_SQL = (
    """
SELECT a.id AS a_id, b.id AS b_id, a.unit AS a_unit, b.unit AS b_unit,
       (SELECT COUNT(*) FROM ab_votes v WHERE ((v.left_id = a.id AND v.right_id = b.id)
                                           OR (v.left_id = b.id AND v.right_id = a.id))
                                          AND v.id NOT IN (SELECT vote_id FROM ab_undone)) AS votes"""
    + PAIR_JOIN
    + "ORDER BY random() LIMIT 64"
)
UNIT_PAIRS_SQL = "SELECT DISTINCT a.unit AS a_unit, b.unit AS b_unit" + PAIR_JOIN
SERVED_MAX = 512  # pairs handed out and not voted on yet, newest kept (an unanswered pair costs a few bytes)
STRIPPED_MAX = 64  # images kept re-encoded without metadata


class ABVotes:
    def __init__(self, store: Store, lock: threading.RLock | None = None, path_of=None):
        """`path_of(image id)`: the image's file, checked (RateHandlers.image_file); images are served only then."""
        self.store, self.db = store, store.db
        self.path_of = path_of
        self.lock = lock or threading.RLock()
        self.db.executescript(SCHEMA)
        self.rng = random.Random()
        self.served: OrderedDict[str, tuple[int, int]] = OrderedDict()  # token -> (left id, right id)
        self.stripped: OrderedDict[int, bytes] = OrderedDict()

    def units(self) -> list[int]:
        """The units that have at least one pair with another unit."""
        with self.lock:
            rows = self.db.execute(UNIT_PAIRS_SQL.format(units="")).fetchall()
        return sorted({r["a_unit"] for r in rows} | {r["b_unit"] for r in rows})

    def pair(self, a: int | None = None, b: int | None = None) -> dict:
        """A pair with the fewest votes so far (random among those), sides randomised, under a one-time token;
        nothing in it names a unit or an image. `a`, `b`: only these two units' pairs."""
        units, args = "", []
        if a is not None or b is not None:
            if a is None or b is None or a == b:
                raise BadRequest("name two different units (a and b), or neither for any two")
            units, args = "AND a.unit IN (?, ?) AND b.unit IN (?, ?)", [a, b, a, b]
        with self.lock:
            rows = self.db.execute(PAIRS_SQL.format(units=units), args).fetchall()
        if not rows:
            which = f" of unit {min(a, b)} and unit {max(a, b)}" if units else ""
            raise NotFound(
                f"no pairs{which} yet: A/B needs two units' images of the same prompt and seed, made with the same "
                "settings (e.g. `loop generate --unit 1` after round 0)"
            )
        least = min(r["votes"] for r in rows)
        r = self.rng.choice([r for r in rows if r["votes"] == least])
        return self._serve(r["a_id"], r["b_id"])

    def _serve(self, a: int, b: int) -> dict:
        """Hand out images a and b as a pair: sides drawn at random, under a new one-time token."""
        sides = [a, b]
        self.rng.shuffle(sides)
        token = secrets.token_urlsafe(12)
        with self.lock:
            self.served[token] = (sides[0], sides[1])
            while len(self.served) > SERVED_MAX:
                self.served.popitem(last=False)
        return {"pair": token, "left": {"url": f"/loop/ab/image/{token}/left"},
                "right": {"url": f"/loop/ab/image/{token}/right"}}  # fmt: skip

    def image(self, token: str, side: str) -> bytes:
        """One side of a served pair, as PNG without its text chunks (they name the unit)."""
        from PIL import Image

        with self.lock:
            ids = self.served.get(str(token))
        if ids is None or side not in ("left", "right"):
            raise NotFound("no such pair: it was voted on already, or the server restarted; a new one is shown")
        image_id = ids[0] if side == "left" else ids[1]
        with self.lock:
            data = self.stripped.get(image_id)
        if data is None:
            if self.path_of is None:
                raise NotFound("this A/B serves no images")
            try:
                with Image.open(self.path_of(image_id)) as im:
                    im.load()
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")  # pixels only: no pnginfo, no dates
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise NotFound(f"the pair's image cannot be read ({type(e).__name__}); skip this pair") from e
            data = buf.getvalue()
            with self.lock:
                self.stripped[image_id] = data
                while len(self.stripped) > STRIPPED_MAX:
                    self.stripped.popitem(last=False)
        return data

    def vote(self, body: dict) -> dict:
        """{pair: token, winner: left|right|tie|skip}: one vote for a pair this server served, once."""
        winner = body.get("winner")
        if winner not in ("left", "right", "tie", "skip"):
            raise BadRequest("winner must be left, right, tie or skip")
        rater = check_rater(body.get("rater", "anonymous"))
        with self.lock:
            ids = self.served.pop(str(body.get("pair")), None)
            if ids is None:
                raise NotFound("no such pair: it was voted on already, or the server restarted; a new one is shown")
            if winner == "skip":
                return {"id": None, "votes": self.count()}
            a, b = self.store.image(ids[0]), self.store.image(ids[1])
            if a is None or b is None:
                raise NotFound("the pair's image is gone from the database")
            with self.store.tx():
                cur = self.db.execute(
                    "INSERT INTO ab_votes (left_id, right_id, left_unit, right_unit, winner, rater, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (a["id"], b["id"], a["unit"], b["unit"], winner, rater, time.time()),
                )
        return {"id": cur.lastrowid, "votes": self.count()}

    def undo(self, rater: str) -> dict:
        """Take back this rater's newest vote that still counts, and serve its pair again (a new token, the sides
        drawn again) so it can be voted on anew; {"undone": None} when there is none."""
        rater = check_rater(rater)
        with self.lock:
            row = self.db.execute(
                f"SELECT id, left_id, right_id FROM ab_votes WHERE rater = ? AND {COUNTED} ORDER BY id DESC LIMIT 1",
                (rater,),
            ).fetchone()
            if row is None:
                return {"undone": None, "votes": self.count()}
            with self.store.tx():
                self.db.execute(
                    "INSERT INTO ab_undone (vote_id, rater, created_at) VALUES (?, ?, ?)",
                    (row["id"], rater, time.time()),
                )
            return {"undone": row["id"], "votes": self.count(), **self._serve(row["left_id"], row["right_id"])}

    def count(self) -> int:
        with self.lock:
            return self.db.execute(f"SELECT COUNT(*) FROM ab_votes WHERE {COUNTED}").fetchone()[0]

    def votes(self) -> list[tuple[str, str, str]]:
        """(left, right, winner) with units named "unit N"; winner is one of them or "tie"."""
        with self.lock:
            rows = self.db.execute(
                f"SELECT left_unit, right_unit, winner FROM ab_votes WHERE {COUNTED} ORDER BY id"
            ).fetchall()
        out = []
        for lu, ru, w in rows:
            left, right = f"unit {lu}", f"unit {ru}"
            out.append((left, right, left if w == "left" else right if w == "right" else "tie"))
        return out

    def ranking(self, n_boot: int = 300) -> dict:
        """Bradley-Terry log-strengths with bootstrap 95% intervals, best first, and the votes behind them."""
        from loop.metrics import bt_bootstrap

        votes = self.votes()
        if not votes:
            return {"votes": 0, "units": []}
        est = bt_bootstrap(votes, n_boot=n_boot, seed=0)
        record: dict[str, dict] = {u: {"wins": 0, "losses": 0, "ties": 0} for u in est}
        for left, right, w in votes:
            if w == "tie":
                record[left]["ties"] += 1
                record[right]["ties"] += 1
            else:
                loser = right if w == left else left
                record[w]["wins"] += 1
                record[loser]["losses"] += 1
        units = [
            {"unit": u, "strength": round(e, 3), "low": round(lo, 3), "high": round(hi, 3), **record[u]}
            for u, (e, lo, hi) in sorted(est.items(), key=lambda kv: -kv[1][0])
        ]
        return {"votes": len(votes), "units": units}


def ranking_html(r: dict) -> str:
    """The ranking as a small HTML table (unit names are ours, numbers only: nothing to escape)."""
    if not r["units"]:
        return "<p>No A/B votes yet.</p>"
    rows = "".join(
        f"<tr><td>{k}</td><td>{u['unit']}</td><td>{u['strength']:+.2f}</td>"
        f"<td>{u['low']:+.2f} … {u['high']:+.2f}</td>"
        f"<td>{u['wins']}</td><td>{u['losses']}</td><td>{u['ties']}</td></tr>"
        for k, u in enumerate(r["units"], 1)
    )
    return (
        f"<p>Bradley-Terry ranking from <b>{r['votes']}</b> blind votes (log-strength, 95% bootstrap interval):</p>"
        "<table class='ab-rank'><tr><th>rank</th><th>unit</th><th>strength</th><th>95% interval</th>"
        f"<th>wins</th><th>losses</th><th>ties</th></tr>{rows}</table>"
    )
