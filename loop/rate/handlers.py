"""What the rating page does, as plain functions over the Store: list, rate, undo, detail, counters, files.

    loop rate            serves these through loop/rate/page.py (JSON routes under /loop/api/)

Every method takes and returns plain values, so the tests call them without a server. One lock serialises
database work: the page runs handlers on many threads but the Store holds one SQLite connection, and an undo
must read "this rater's newest rating" and cancel it in one step.

UR images are collected into golden/ (a hard link, or a copy where links are impossible) and leave it again
when their tier stops being UR, so golden/ always mirrors the current UR set; the original stays in
generations/ so lineage holds. Thumbnails are WebP files under cache/thumbs/, named by the image's sha256.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from PIL import Image

from loop.config import TIERS
from loop.errors import LoopError
from loop.store import Store, finish_rating, rating_summary
from loop.workspace import Workspace, atomic_write, golden_path, sync_golden  # noqa: F401 (golden_path re-exported)

SERVED = ("generations", "golden", "cache")  # the only workspace folders the page serves files from
THUMB_SIDE = 256
THUMB_MEMORY = 64 << 20  # thumbnail bytes kept in memory (tens of thousands of small WebP files)
PACE_WINDOW_S = 300.0  # pace = ratings per minute over the last five minutes
MAX_RATER = 40
CLAIM_TTL_S = 10.0  # a page renews its claim with every poll (2 s); a closed page's claim lapses after this
# a page keeps the image it moved away from for this long: its rating of it may still be on the way to the
# server, and another page must not be sent there meanwhile
CLAIM_GRACE_S = 3.0
MAX_TAB = 64


class BadRequest(ValueError):
    """Input the page should not have sent; the message says what was wrong (HTTP 400)."""


class NotFound(LookupError):
    """No such image or file (HTTP 404)."""


class Forbidden(PermissionError):
    """A path outside generations/, golden/ and cache/ (HTTP 403)."""


def check_tier(tier) -> str:
    if tier not in TIERS:
        raise BadRequest(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    return tier


def check_key(key) -> str | None:
    """A rating's or undo's client key (see Store.rate_many): absent, or a short ASCII token."""
    if key is None:
        return None
    if not isinstance(key, str) or not 8 <= len(key) <= 64 or not key.isascii() or not key.isalnum():
        raise BadRequest(f"key must be 8 to 64 letters and digits, got {str(key)[:70]!r}")
    return key


def check_order(order) -> str:
    """The grid's order: "" (unrated first, then by id), likely_ur or uncertain (see loop/rate/taste.py)."""
    from loop.rate.taste import ORDERS

    if order in (None, "", "default"):
        return ""
    if order not in ORDERS:
        raise BadRequest(f"order must be default, likely_ur or uncertain, got {str(order)[:40]!r}")
    return order


def check_rater(rater) -> str:
    name = str(rater or "").strip()
    if not name or len(name) > MAX_RATER or any(ord(c) < 32 for c in name):
        raise BadRequest(f"rater must be a name of 1 to {MAX_RATER} printable characters, got {rater!r}")
    return name


def safe_file(ws: Workspace, rel: str) -> Path:
    """The file at workspace-relative `rel` if it lies inside generations/, golden/ or cache/; else Forbidden.

    Checks the parts before touching the disk (no '..', no absolute path, no dotfile such as a half-written
    temporary, first folder exactly one of SERVED so `generations2/` fails), then resolves symlinks and checks
    again, so a link that points out of its folder is refused too.
    """
    shown = repr(rel[:200])  # the message never carries a whole hostile path
    if not rel or "\\" in rel or "\x00" in rel:
        raise Forbidden(f"path not served: {shown}")
    parts = rel.split("/")
    if len(parts) < 2 or parts[0] not in SERVED or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise Forbidden(f"path not served: {shown}")
    try:
        base = (ws.root / parts[0]).resolve()
        path = (ws.root / rel).resolve()
        inside = path.is_relative_to(base)
        found = inside and path.is_file()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long: nothing to serve, and no 500
        raise NotFound(f"no such file: {shown}") from None
    if not inside:
        raise Forbidden(f"path not served: {shown}")
    if not found:
        raise NotFound(f"no such file: {shown}")
    return path


def thumb_path(ws: Workspace, sha256: str) -> Path:
    return ws.cache("thumbs", sha256[:2], f"{sha256}-{THUMB_SIDE}.webp")


def make_thumb(ws: Workspace, sha256: str, rel: str) -> Path:
    """The cached WebP thumbnail (at most THUMB_SIDE px, never enlarged), written atomically on first use."""
    out = thumb_path(ws, sha256)
    if out.exists():
        return out
    with Image.open(ws.root / rel) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="WEBP", quality=85, method=2)
    return atomic_write(out, buf.getvalue())


class Claims:
    """Which image each open page has its focus on, so two raters' pages never put it on the same unrated image.

    Each page (a `tab`: a random token it makes when it opens, so one rater's two pages are two tabs) holds at
    most one claim: the image its focus is on. `claim` is atomic: it answers the name of the rater whose page
    already holds the image, or None when the claim is taken. A page renews its claim with every poll; a closed
    page's claim lapses after CLAIM_TTL_S. The image a page moves away from stays its own for CLAIM_GRACE_S
    more (its rating of it may still be on the way). Kept in memory only: a claim is a few seconds of intent,
    not data, and a restarted server starts with none (the pages claim again at their next focus or poll).
    """

    def __init__(self, ttl: float = CLAIM_TTL_S, clock=time.monotonic, grace: float = CLAIM_GRACE_S):
        self.ttl, self.clock, self.grace = ttl, clock, grace
        self._lock = threading.Lock()
        self._tabs: dict[str, tuple[int, str, float]] = {}  # tab -> (image id, rater, expiry)
        self._left: dict[int, tuple[str, str, float]] = {}  # image id -> (tab, rater, until): just moved away

    @staticmethod
    def check_tab(tab) -> str:
        if not isinstance(tab, str) or not tab or len(tab) > MAX_TAB or not tab.isascii() or not tab.isprintable():
            raise BadRequest(f"tab must be a short ASCII token, got {str(tab)[:40]!r}")
        return tab

    def _expire(self, now: float) -> None:
        for tab in [t for t, (_, _, until) in self._tabs.items() if until <= now]:
            del self._tabs[tab]
        for image_id in [i for i, (_, _, until) in self._left.items() if until <= now]:
            del self._left[image_id]

    def _holder(self, image_id: int, tab: str) -> str | None:
        """Who holds image_id, if a page other than `tab` does (now, or just moved away from it)."""
        for other, (held, who, _) in self._tabs.items():
            if held == image_id and other != tab:
                return who
        left = self._left.get(image_id)
        return left[1] if left and left[0] != tab else None

    def claim(self, tab: str, image_id: int | None, rater: str = "") -> str | None:
        """Move `tab`'s claim to `image_id` (None: release it). Returns who holds the image when another page
        does (the claim is then not taken and the tab keeps none), else None."""
        tab = self.check_tab(tab)
        with self._lock:
            now = self.clock()
            self._expire(now)
            before = self._tabs.get(tab)
            if before is not None and before[0] != image_id:
                self._left[before[0]] = (tab, before[1], now + self.grace)
            holder = None if image_id is None else self._holder(image_id, tab)
            if image_id is None or holder is not None:
                self._tabs.pop(tab, None)
            else:
                self._tabs[tab] = (image_id, rater or "another rater", now + self.ttl)
                self._left.pop(image_id, None)
            return holder

    def renew(self, tab: str) -> None:
        with self._lock:
            if tab in self._tabs:
                image_id, rater, _ = self._tabs[tab]
                self._tabs[tab] = (image_id, rater, self.clock() + self.ttl)

    def held(self, tab: str) -> int | None:
        with self._lock:
            self._expire(self.clock())
            found = self._tabs.get(tab)
            return found[0] if found else None

    def others(self, tab: str | None = None) -> dict[int, str]:
        """{image id: rater} of every live claim but `tab`'s (images just moved away from included)."""
        with self._lock:
            self._expire(self.clock())
            out = {i: who for i, (t, who, _) in self._left.items() if t != tab}
            out.update({i: who for t, (i, who, _) in self._tabs.items() if t != tab})
            return out


def workspace_token(ws: Workspace, store: Store) -> str:
    """Names this workspace's database, in thumbnail URLs: they are cached by the browser for a year, and keyed
    by image id only they would show another workspace's pictures when it is served on the same port (7860 is
    everyone's default), or after loop.db is rebuilt. A random id kept in the database (a rebuilt one gets a new
    one), with the workspace's path (a copied workspace diverges from its original)."""
    import hashlib
    import uuid

    got = store.get_state("workspace")
    if not got or not isinstance(got.get("id"), str):
        got = {"id": uuid.uuid4().hex}
        store.set_state("workspace", got)
    return hashlib.sha256(f"{got['id']}:{ws.root.resolve()}".encode()).hexdigest()[:16]


class RateHandlers:
    """The page's operations over one workspace; safe to call from many threads."""

    def __init__(self, ws: Workspace, store: Store):
        self.ws = ws
        self.store = store
        self.db = store.db
        self.token = workspace_token(ws, store)
        self.lock = threading.RLock()
        self._counters: dict[tuple, dict] = {}
        self._thumbs: dict[int, bytes] = {}
        self._thumb_size = 0
        self.claims = Claims()
        self.taste = None  # the page's TasteService (page.build_app): orders and predicted tiers, read only

    # -- reading ---------------------------------------------------------------------------------------------
    def current_round(self) -> int:
        with self.lock:
            return self.store.current_unit()

    def meta(self) -> dict:
        """What the filter menus offer, and the round that "Finish rating" closes."""
        with self.lock:
            n = self.store.current_unit()
            rounds = [r[0] for r in self.db.execute("SELECT DISTINCT round FROM images WHERE round IS NOT NULL")]
            units = [r[0] for r in self.db.execute("SELECT DISTINCT unit FROM images WHERE unit IS NOT NULL")]
            closed = self.store.phase_done(n, "rate")
        return {
            "current_round": n,
            "rate_closed": closed,
            "rounds": sorted(set(rounds) | {n}),
            "units": sorted(units),
            "tiers": list(TIERS),
            "w": self.token,  # the page keeps unsent ratings under it (see rate.js, saveQueue)
        }

    @staticmethod
    def _where(round=None, unit=None, tier=None, unrated=False, q="") -> tuple[str, list]:
        sql, args = "", []
        if round is not None:
            sql += " AND i.round = ?"
            args.append(int(round))
        if unit is not None:
            sql += " AND i.unit = ?"
            args.append(int(unit))
        if unrated:
            sql += " AND t.tier IS NULL"
        elif tier:
            sql += " AND t.tier = ?"
            args.append(check_tier(tier))
        if q and q.strip():
            sql += " AND i.prompt LIKE ? ESCAPE '\\'"
            esc = q.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{esc}%")
        return sql, args

    def _last_ids(self) -> tuple[int, int]:
        ev = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM ratings").fetchone()[0]
        im = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
        return ev, im

    def images(self, round=None, unit=None, tier=None, unrated=False, q="", tab=None, order="") -> dict:
        """The filtered images, unrated first, then by id; as parallel arrays so 10,000 stay small. `claims`:
        [image id, rater] of the images other pages have their focus on (see Claims). `order` likely_ur or
        uncertain puts the unrated images the taste model has predicted first (see taste.order_index); `pred`:
        each image's predicted tier where it is unrated and predicted (never a rating), `taste`: the model's
        state (note: why the order is the default one)."""
        where, args = self._where(round, unit, tier, unrated, q)
        with self.lock:
            last_event, last_image = self._last_ids()
            rows = self.db.execute(
                "SELECT i.id, t.tier, t.rater FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
                f"WHERE i.id <= ?{where} ORDER BY (t.tier IS NOT NULL), i.id",
                [last_image, *args],
            ).fetchall()
        rows, taste = self._taste_order(rows, check_order(order))
        return {
            "ids": [r[0] for r in rows],
            "tiers": [r[1] or "" for r in rows],
            "raters": [r[2] or "" for r in rows],
            "unrated": sum(1 for r in rows if r[1] is None),
            "last_event": last_event,
            "last_image": last_image,
            "claims": self._claims(tab),
            "w": self.token,  # for the thumbnail URLs (see workspace_token)
            **taste,
        }

    def _taste_order(self, rows: list, order: str) -> tuple[list, dict]:
        """rows (id, tier, rater) in `order`, and what the page shows of the taste model for them."""
        from loop.rate.taste import order_index

        snap = self.taste.snapshot() if self.taste is not None else None
        unrated = [r[1] is None for r in rows]
        rows = [rows[n] for n in order_index([r[0] for r in rows], unrated, snap, order)]
        preds = snap.preds if snap is not None and snap.ready else {}
        return rows, {
            "pred": [preds[r[0]][2] if r[1] is None and r[0] in preds else "" for r in rows],
            "taste": self.taste_state(order),
        }

    def taste_state(self, order: str = "") -> dict:
        """The model's state for the page: ready, note (one line: why it cannot order yet), version (changes
        with each fit and prediction), and the order applied ("" when it falls back to the default)."""
        if self.taste is None:
            return {"ready": False, "note": "no taste model on this page", "version": 0, "order": ""}
        s = self.taste.snapshot()
        return {"ready": s.ready, "note": s.note(), "version": s.version, "order": order if s.ready else ""}

    def predictions(self, round=None, unit=None, tier=None, unrated=False, q="", tab=None) -> dict:
        """The predicted tiers of the filtered unrated images ([[id, tier], ...]): the page asks when the
        model's version moved, to redraw its faint guesses (the order stays until the list is loaded again)."""
        where, args = self._where(round, unit, tier, unrated, q)
        with self.lock:
            rows = self.db.execute(
                "SELECT i.id FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
                f"WHERE t.tier IS NULL{where}",
                args,
            ).fetchall()
        ids = [r[0] for r in rows]
        s = self.taste.snapshot() if self.taste is not None else None
        preds = s.preds if s is not None and s.ready else {}
        return {"pred": [[i, preds[i][2]] for i in ids if i in preds], "taste": self.taste_state()}

    def _claims(self, tab: str | None) -> list[list]:
        return [[i, who] for i, who in sorted(self.claims.others(tab).items())]

    def claim(self, tab: str, image_id: int | None, rater: str = "") -> dict:
        """Put `tab`'s claim on `image_id` (None: release it). ok is false when another page has its focus
        there (`by` names its rater) or the image is rated (`rated`: [tier, rater]); `claims` lists the other
        pages' claims either way."""
        if image_id is not None:
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                raise BadRequest(f"image_id must be an integer or null, got {image_id!r}"[:200])
            # rated since the page last looked: nobody is sent to a rated image
            with self.lock:
                row = self.db.execute(
                    "SELECT tier, rater FROM current_tiers WHERE image_id = ?", (image_id,)
                ).fetchone()
            if row is not None:
                self.claims.claim(tab, None)  # the page holds nothing now
                return {"ok": False, "by": None, "rated": [row[0], row[1]], "claims": self._claims(tab)}
        by = self.claims.claim(tab, image_id, rater[:MAX_RATER] if isinstance(rater, str) else "")
        return {"ok": by is None, "by": by, "claims": self._claims(tab)}

    def changes(
        self, after_event: int, after_image: int, round=None, unit=None, tier=None, unrated=False, q="", tab=None
    ):
        """What happened since the client's last look: current tiers of images rated or undone since event
        `after_event` (within round/unit), new images matching the filters (id above `after_image`), and the
        other pages' claims. A poll with a `tab` renews that page's claim."""
        if tab is not None:
            self.claims.renew(tab)
        where, args = self._where(round, unit, tier, unrated, q)
        scope, scope_args = self._where(round, unit)
        with self.lock:
            last_event, last_image = self._last_ids()
            changed = self.db.execute(
                "SELECT i.id, t.tier, t.rater FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
                f"WHERE i.id IN (SELECT image_id FROM ratings WHERE id > ? AND id <= ?){scope} ORDER BY i.id",
                [int(after_event), last_event, *scope_args],
            ).fetchall()
            new = self.db.execute(
                "SELECT i.id, t.tier, t.rater FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
                f"WHERE i.id > ? AND i.id <= ?{where} ORDER BY i.id",
                [int(after_image), last_image, *args],
            ).fetchall()
        return {
            "changed": [[r[0], r[1] or "", r[2] or ""] for r in changed],
            "new": [[r[0], r[1] or "", r[2] or ""] for r in new],
            "last_event": last_event,
            "last_image": last_image,
            "counters": self.counters(round=round, unit=unit),
            "claims": self._claims(tab),
            "mine": None if tab is None else self.claims.held(tab),  # the image this page holds, if any
            "taste": self.taste.snapshot().version if self.taste is not None else 0,  # new predictions to fetch
        }

    def counters(self, round=None, unit=None) -> dict:
        """Rated/total, per tier, per rater (who gave the current tiers), and the pace in images per minute."""
        scope, args = self._where(round, unit)
        with self.lock:
            key = (round, unit, *self._last_ids(), int(time.time() / 5))  # pace and phases move with time
            if key in self._counters:
                return self._counters[key]
            tiers = dict(
                self.db.execute(
                    "SELECT COALESCE(t.tier, ''), COUNT(*) FROM images i "
                    f"LEFT JOIN current_tiers t ON t.image_id = i.id WHERE 1{scope} GROUP BY 1",
                    args,
                ).fetchall()
            )
            raters = dict(
                self.db.execute(
                    "SELECT t.rater, COUNT(*) FROM images i JOIN current_tiers t ON t.image_id = i.id "
                    f"WHERE 1{scope} GROUP BY t.rater ORDER BY 2 DESC",
                    args,
                ).fetchall()
            )
            now = time.time()
            recent = self.db.execute(
                "SELECT r.rater, r.created_at FROM ratings r JOIN images i ON i.id = r.image_id "
                # ratings, not undos, and not undone since: a rating taken back is no work done
                f"WHERE r.undoes IS NULL AND r.created_at > ?{scope} "
                "AND NOT EXISTS (SELECT 1 FROM ratings u WHERE u.undoes = r.id)",
                [now - PACE_WINDOW_S, *args],
            ).fetchall()
            current = self.store.current_unit()
            phase_closed = self.store.phase_done(current, "rate")
        total = sum(tiers.values())
        out = {
            "total": total,
            "rated": total - tiers.get("", 0),
            "tiers": {t: tiers.get(t, 0) for t in TIERS},
            "raters": raters,
            "pace": _pace([r[1] for r in recent], now),
            "pace_by_rater": {
                name: _pace([r[1] for r in recent if r[0] == name], now) for name in sorted({r[0] for r in recent})
            },
            "current_round": current,  # the round "Finish rating" closes (a new unit starts the next one)
            "rate_closed": phase_closed,
        }
        with self.lock:
            if len(self._counters) > 64:
                self._counters.clear()
            self._counters[key] = out
        return out

    def detail(self, image_id: int) -> dict:
        """Everything the detail view shows: metadata, lineage (images and units), tier, history, golden."""
        with self.lock:
            row = self.store.image(int(image_id))
            if row is None:
                raise NotFound(f"no image with id {image_id}")
            params = json.loads(row["params"] or "{}")
            cur = self.db.execute(
                "SELECT tier, rater, created_at FROM current_tiers WHERE image_id = ?", (row["id"],)
            ).fetchone()
            history = self.db.execute(
                "SELECT r.id, r.tier, r.rater, r.created_at, r.undoes, "
                "EXISTS (SELECT 1 FROM ratings u WHERE u.undoes = r.id) AS undone "
                "FROM ratings r WHERE r.image_id = ? ORDER BY r.id DESC LIMIT 50",
                (row["id"],),
            ).fetchall()
            lineage, seen, parent = [], {row["id"]}, self._parent(row, params)
            while parent is not None and parent["id"] not in seen and len(lineage) < 20:
                seen.add(parent["id"])
                lineage.append({"id": parent["id"], "prompt": parent["prompt"], "path": parent["path"]})
                parent = self._parent(parent, json.loads(parent["params"] or "{}"))
            units, u = [], row["unit"]
            while u is not None and len(units) < 100:
                urow = self.store.unit(u)
                if urow is None:
                    units.append({"unit": u, "method": "not recorded", "base": None})
                    break
                units.append({"unit": u, "method": urow["method"] or "base", "base": urow["base"]})
                u = urow["parent"]
        known = set(row.keys()) | {"parent"}
        return {
            "id": row["id"],
            "sha256": row["sha256"],
            "path": row["path"],
            "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"],
            "seed": row["seed"],
            "steps": row["steps"],
            "cfg": row["cfg"],
            "sampler": row["sampler"],
            "width": row["width"],
            "height": row["height"],
            "unit": row["unit"],
            "round": row["round"],
            "source": row["source"],
            "model": params.get("model"),
            "extra": {k: v for k, v in params.items() if k not in known and k != "model"},
            "tier": cur["tier"] if cur else "",
            "rater": cur["rater"] if cur else "",
            "rated_at": cur["created_at"] if cur else None,
            "history": [
                {
                    "tier": h["tier"],
                    "rater": h["rater"],
                    "at": h["created_at"],
                    "undo": h["undoes"] is not None,
                    "undone": bool(h["undone"]),
                }
                for h in history
            ],
            "parent": lineage[0] if lineage else None,
            "lineage": lineage,
            "units": units,
            "golden": golden_path(self.ws, row["sha256"], row["path"]).exists(),
        }

    def _parent(self, row, params: dict):
        """The image this one was made from: the parent_id column, else the `parent` of its PNG metadata."""
        if row["parent_id"] is not None:
            return self.store.image(row["parent_id"])
        ref = params.get("parent")
        if isinstance(ref, int):
            return self.store.image(ref)
        if isinstance(ref, str) and ref:
            return self.db.execute("SELECT * FROM images WHERE sha256 = ?", (ref,)).fetchone()
        return None

    # -- writing ---------------------------------------------------------------------------------------------
    def rate(self, items: list[tuple], rater: str) -> dict:
        """Append one rating event per (image id, tier[, key]), in order, in one transaction; then sync golden/.

        A batch is what the page queued over a few seconds: an id that no longer exists is reported under
        `missing` and the rest are stored, rather than one stale id costing the others. A rating whose key is
        stored already (the page sent it before and did not see the answer) is not stored again."""
        rater = check_rater(rater)
        items = [(int(it[0]), check_tier(it[1]), check_key(it[2] if len(it) > 2 else None)) for it in items]
        if not items:
            raise BadRequest("no ratings given; send at least one {image_id, tier}")
        with self.lock:
            ids = {i for i, _, _ in items}
            marks = ",".join("?" * len(ids))
            found = {r[0] for r in self.db.execute(f"SELECT id FROM images WHERE id IN ({marks})", list(ids))}
            missing = sorted(ids - found)
            if not found:
                raise NotFound(f"no image with id {missing[0]}")
            items = [it for it in items if it[0] in found]
            events = self.store.rate_many([(i, t) for i, t, _ in items], rater, keys=[k for _, _, k in items])
            states = {i: sync_golden(self.ws, self.store, i) for i in dict.fromkeys(i for i, _, _ in items)}
        return {"events": events, "images": states, **({"missing": missing} if missing else {})}

    def undo(self, rater: str, key: str | None = None, tab: str | None = None) -> dict:
        """Cancel this rater's newest effective rating (other raters' ratings are untouched). `key`: as for
        ratings; an undo resent with its key undoes nothing more. `tab`: the page whose focus is on the image
        it undoes; when that image is unrated again, the page's claim moves to it in the same step (`claimed`
        says whether it did), so no other page's poll sees it unrated and free and sends its focus there."""
        rater = check_rater(rater)
        key = check_key(key)
        tab = None if tab is None else Claims.check_tab(tab)
        with self.lock:
            image_id = self.store.undo(rater, key)
            if image_id is None:
                return {"image_id": None}
            out = {"image_id": image_id, **sync_golden(self.ws, self.store, image_id)}
            if tab is not None:
                # under self.lock, as the undo: a poll that sees the image unrated sees this claim too
                out["claimed"] = not out["tier"] and self.claims.claim(tab, image_id, rater) is None
            return out

    def finish(self, round: int | None = None) -> dict:
        """Close the rate phase of the current round, so `loop run --round` goes on to select and train.
        `round`: the round the page's button named; refused if the current round has moved on since (a page
        open since before a new unit must not close a round nobody has seen)."""
        if round is not None and (not isinstance(round, int) or isinstance(round, bool)):
            raise BadRequest(f"round must be an integer, got {round!r}"[:200])
        with self.lock:
            n = self.store.current_unit()
            if round is not None and round != n:
                raise BadRequest(
                    f"nothing closed: round {round} is over (unit {n} exists), round {n} is the one being rated "
                    f"now; look at its images, then finish round {n}"
                )
            already = self.store.phase_done(n, "rate")
            if not already:
                try:
                    finish_rating(self.store, n)
                except LoopError as e:
                    raise BadRequest(str(e)) from None
            summary = rating_summary(self.store, n)
            self._counters.clear()
        return {"round": n, "already": already, "summary": summary}

    # -- files -----------------------------------------------------------------------------------------------
    def thumb(self, image_id: int) -> Path:
        with self.lock:
            row = self.store.image(int(image_id))
        if row is None:
            raise NotFound(f"no image with id {image_id}")
        safe_file(self.ws, row["path"])  # the image itself must be a served file
        try:
            out = make_thumb(self.ws, row["sha256"], row["path"])
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # gone, or not an image (or a pixel
            # bomb) since it was listed: a 404, not a 500, and never a page that cannot start (warm_thumbs)
            raise NotFound(f"no thumbnail for image {image_id}: {e.__class__.__name__}") from None
        return safe_file(self.ws, out.relative_to(self.ws.root).as_posix())  # and so must the thumbnail: no link out

    def image_file(self, image_id: int) -> Path:
        with self.lock:
            row = self.store.image(int(image_id))
        if row is None:
            raise NotFound(f"no image with id {image_id}")
        return safe_file(self.ws, row["path"])

    def cached_thumb(self, image_id: int) -> bytes | None:
        return self._thumbs.get(image_id)

    def thumb_bytes(self, image_id: int) -> bytes:
        """The thumbnail's bytes, kept in memory after the first read: a screen of tiles is 50+ requests."""
        data = self._thumbs.get(image_id)
        if data is None:
            data = self.thumb(image_id).read_bytes()
            with self.lock:
                if self._thumb_size + len(data) > THUMB_MEMORY:
                    self._thumbs.clear()
                    self._thumb_size = 0
                self._thumbs[image_id] = data
                self._thumb_size += len(data)
        return data

    def file(self, rel: str) -> Path:
        return safe_file(self.ws, rel)

    def warm_thumbs(self, limit: int = 120) -> int:
        """Make the thumbnails of the current round's first screens (unrated first), so the first grid a
        person opens does not wait for them. Returns how many were made."""
        with self.lock:
            ids = self.images(round=self.store.current_unit())["ids"][:limit]
            rows = [self.store.image(i) for i in ids]
        made = 0
        for row in rows:
            try:
                new = not thumb_path(self.ws, row["sha256"]).exists()
                self.thumb_bytes(row["id"])
                made += new
            except (OSError, Forbidden, NotFound):
                pass  # a missing or unreadable file: the page shows the gap, the route says why
        return made


def _pace(times: list[float], now: float) -> float:
    """Ratings per minute from the first of `times` (within the window) to now; 10 s at least."""
    if not times:
        return 0.0
    return round(len(times) * 60.0 / max(now - min(times), 10.0), 1)
