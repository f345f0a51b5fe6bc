"""Blind A/B votes between units, and their Bradley-Terry ranking.

A pair is two images of different units made from the same prompt and seed (txt2img, same size). The page
shows them with the sides randomised and without saying which unit made which; a person presses left,
right or tie. Votes are append-only rows in `ab_votes`; the ranking is a Bradley-Terry fit over every vote,
with bootstrap 95% intervals (loop.metrics), shown with the votes behind it.
"""

from __future__ import annotations

import random
import threading
import time

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
"""

PAIRS_SQL = """
SELECT a.id AS a_id, b.id AS b_id, a.unit AS a_unit, b.unit AS b_unit, a.path AS a_path, b.path AS b_path,
       (SELECT COUNT(*) FROM ab_votes v WHERE (v.left_id = a.id AND v.right_id = b.id)
                                          OR (v.left_id = b.id AND v.right_id = a.id)) AS votes
FROM images a JOIN images b
  ON a.prompt = b.prompt AND a.seed = b.seed AND a.unit < b.unit
 AND a.width IS b.width AND a.height IS b.height
 AND a.parent_id IS NULL AND b.parent_id IS NULL
WHERE a.unit IS NOT NULL AND b.unit IS NOT NULL
  AND COALESCE(json_extract(a.params, '$.exploration'), 0) = 0
  AND COALESCE(json_extract(b.params, '$.exploration'), 0) = 0
ORDER BY random() LIMIT 64
"""


class ABVotes:
    def __init__(self, store: Store, lock: threading.RLock | None = None):
        self.store, self.db = store, store.db
        self.lock = lock or threading.RLock()
        self.db.executescript(SCHEMA)
        self.rng = random.Random()

    def pair(self) -> dict:
        """A pair with the fewest votes so far (random among those), sides randomised; units not revealed."""
        with self.lock:
            rows = self.db.execute(PAIRS_SQL).fetchall()
        if not rows:
            raise NotFound(
                "no pairs yet: A/B needs two units' images of the same prompt and seed "
                "(e.g. `loop generate --unit 1` after round 0)"
            )
        least = min(r["votes"] for r in rows)
        r = self.rng.choice([r for r in rows if r["votes"] == least])
        sides = [(r["a_id"], r["a_path"]), (r["b_id"], r["b_path"])]
        self.rng.shuffle(sides)
        # by id, not by path: /loop/files/generations/unit_001/... would show the unit on a hover or in a new tab
        return {"left": {"id": sides[0][0], "url": f"/loop/image/{sides[0][0]}"},
                "right": {"id": sides[1][0], "url": f"/loop/image/{sides[1][0]}"}}  # fmt: skip

    def vote(self, body: dict) -> dict:
        try:
            left, right = int(body.get("left")), int(body.get("right"))
        except (TypeError, ValueError):
            raise BadRequest("give the left and right image ids") from None
        winner = body.get("winner")
        if winner not in ("left", "right", "tie"):
            raise BadRequest("winner must be left, right or tie")
        rater = check_rater(body.get("rater", "anonymous"))
        with self.lock:
            a, b = self.store.image(left), self.store.image(right)
            if a is None or b is None:
                raise NotFound("no such image")
            if a["unit"] is None or b["unit"] is None or a["unit"] == b["unit"]:
                raise BadRequest("an A/B pair is two images of different units")
            if (a["prompt"], a["seed"]) != (b["prompt"], b["seed"]):
                raise BadRequest("an A/B pair shares its prompt and seed")
            with self.store.tx():
                cur = self.db.execute(
                    "INSERT INTO ab_votes (left_id, right_id, left_unit, right_unit, winner, rater, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (left, right, a["unit"], b["unit"], winner, rater, time.time()),
                )
        return {"id": cur.lastrowid, "votes": self.count()}

    def count(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM ab_votes").fetchone()[0]

    def votes(self) -> list[tuple[str, str, str]]:
        """(left, right, winner) with units named "unit N"; winner is one of them or "tie"."""
        with self.lock:
            rows = self.db.execute("SELECT left_unit, right_unit, winner FROM ab_votes ORDER BY id").fetchall()
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
