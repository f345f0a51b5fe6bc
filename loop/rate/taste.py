"""The rating page's taste model: fitted in the background, read by requests without waiting.

    loop rate     one TasteService per served workspace (page.build_app starts it, close_app stops it)

A daemon thread with its own Store connection (a SQLite connection belongs to one thread) looks at the
ratings every POLL_S; when they changed it refits loop.taste_model (at once on start, then at most once every
MIN_GAP_S, and never more often than its own fit time allows, so it never takes more than a small share of
the CPU from the page), then predicts every unrated image from the FeatureCache, in chunks, and predicts the
images that appear later as they come. A request only reads the last published `Snapshot`: one reference
swapped whole, never a lock held across a fit, so no request and no keypress waits on the model.

The predictions only order the page and draw a faint guess on unrated tiles; they are never ratings (see
loop/taste_model.py for what else it does, and why never more).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from loop.taste_model import MIN_RATINGS, FeatureCache, TasteModel, fit_workspace

POLL_S = 1.0  # how often the thread looks for new ratings and images (two MAX(id) queries)
MIN_GAP_S = 2.0  # at most one fit this often, whatever the pace of the ratings
CPU_SHARE = 0.25  # and at most this share of the time spent fitting: a fit of f seconds waits f / share
CHUNK = 256  # unrated images predicted per step (a vision model's features take a while: publish as they come)
ORDERS = {"": "unrated first", "likely_ur": "likely UR first", "uncertain": "least certain first"}


@dataclass(frozen=True)
class Snapshot:
    """What the page reads: the last model (None before the first fit ends), and its predictions for unrated
    images: image id -> (p_ur, uncertainty, tier). `version` changes with every new model or prediction."""

    model: TasteModel | None = None
    preds: dict = field(default_factory=dict)
    version: int = 0
    error: str = ""
    predicting: bool = False  # unrated images are still being predicted after the last fit

    @property
    def ready(self) -> bool:
        return self.model is not None and self.model.ready and not self.error

    def note(self) -> str:
        """One calm line on why the page cannot order by taste (empty when it can)."""
        if self.error:
            return f"the taste model could not be fitted ({self.error}); the default order for now"
        m = self.model
        if m is None:
            return "the taste model is learning from the ratings; the default order until it is ready"
        if m.ready:
            return ""
        if m.ratings < MIN_RATINGS:
            return (f"too few ratings to order by taste yet: {m.ratings} rated; it needs "
                    f"{MIN_RATINGS - m.ratings} more")  # fmt: skip
        return (f"too few ratings to order by taste yet: all {m.ratings} are in one tier; it needs ratings in at "
                "least two tiers")  # fmt: skip

    def status(self) -> dict:
        """The JSON the page and the Progress tab read."""
        return {
            "ready": self.ready,
            "note": self.note(),
            "version": self.version,
            "predicting": self.predicting,
            "predicted": len(self.preds),
            "model": self.model.summary() if self.model is not None else None,
            "error": self.error,
        }


class TasteService:
    """One per served workspace: `start()`, `snapshot()` (any thread, never waits), `stop()`.

    `ec`: the config's eval section (which image features); None reads configs/loop.yaml in the thread."""

    def __init__(self, ws, ec=None, poll_s: float = POLL_S, min_gap_s: float = MIN_GAP_S):
        self.ws, self.ec = ws, ec
        self.poll_s, self.min_gap_s = poll_s, min_gap_s
        self._snap = Snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fits = 0  # how many fits ran (tests: a change of ratings refits, no change does not)

    def snapshot(self) -> Snapshot:
        return self._snap

    def start(self) -> TasteService:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loop-taste", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop and wait for it (it stops between steps: a fit under way finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------------------
    def _publish(self, **changes) -> None:
        s = self._snap
        values = {"model": s.model, "preds": s.preds, "error": s.error, "predicting": s.predicting, **changes}
        self._snap = Snapshot(version=s.version + 1, **values)

    def _run(self) -> None:
        try:
            ec = self.ec
            if ec is None:
                from loop.config import load_config

                ec = load_config(self.ws.root).eval
            store = self.ws.store()
        except Exception as e:  # a broken config or database: the page works on, in the default order
            self._publish(error=_short(e))
            return
        try:
            self._loop(store, FeatureCache(self.ws, ec))
        finally:
            store.close()

    def _loop(self, store, cache: FeatureCache) -> None:
        fitted_at_event = None  # the newest rating event the last fit saw
        seen_image = 0  # the newest image predicted (or found rated) so far
        next_fit = 0.0  # monotonic time before which no fit starts (the debounce)
        while not self._stop.is_set():
            last_event, last_image = store.db.execute(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM ratings), (SELECT COALESCE(MAX(id), 0) FROM images)"
            ).fetchone()
            now = time.monotonic()
            if last_event != fitted_at_event and now >= next_fit:
                t0 = time.monotonic()
                try:
                    model = fit_workspace(self.ws, store, cache.ec, cache)
                except Exception as e:  # e.g. a vision model that cannot load: said on the page, tried again later
                    self._publish(model=None, preds={}, error=_short(e), predicting=False)
                    fitted_at_event = last_event
                    next_fit = time.monotonic() + max(self.min_gap_s, 30.0)
                    continue
                self.fits += 1
                fitted_at_event = last_event
                self._publish(model=model, error="", predicting=model.ready, preds={} if not model.ready else
                              self._snap.preds)  # fmt: skip
                if model.ready:
                    self._predict(store, cache, model, 0, last_image, fresh=True)
                seen_image = last_image
                spent = time.monotonic() - t0
                next_fit = time.monotonic() + max(self.min_gap_s, spent / CPU_SHARE - spent)
            elif last_image > seen_image:
                m = self._snap.model
                if m is not None and m.ready and not self._snap.error:
                    self._predict(store, cache, m, seen_image, last_image, fresh=False)
                seen_image = last_image
            self._stop.wait(self.poll_s)

    def _predict(self, store, cache: FeatureCache, model: TasteModel, after: int, upto: int, fresh: bool) -> None:
        """Predict the unrated images with id in (after, upto], CHUNK at a time, publishing each chunk. `fresh`:
        a new model, whose predictions replace the old ones as they come."""
        rows = store.db.execute(
            "SELECT i.id, i.sha256, i.path FROM images i LEFT JOIN current_tiers t ON t.image_id = i.id "
            "WHERE t.tier IS NULL AND i.id > ? AND i.id <= ? ORDER BY i.id",
            (after, upto),
        ).fetchall()
        preds = {} if fresh else dict(self._snap.preds)
        # a new model's predictions replace the last model's only once all are made (a page is never ordered half
        # by one model, half by the other); the first model's, and new images', are published chunk by chunk
        partial = not fresh or not self._snap.preds
        for k in range(0, len(rows), CHUNK):
            if self._stop.is_set():
                return
            X, kept = cache.get(rows[k : k + CHUNK])
            if kept:
                p = model.predict(X)
                for n, r in enumerate(kept):
                    preds[r["id"]] = (float(p["p_ur"][n]), float(p["uncertainty"][n]), p["tier"][n])
            done = k + CHUNK >= len(rows)
            if partial or done:
                self._publish(preds=dict(preds), predicting=not done)
        if not rows:
            self._publish(preds=preds if fresh else self._snap.preds, predicting=False)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return text[:200]


def order_index(ids: list, unrated: list, snap: Snapshot | None, order: str) -> list[int]:
    """The positions of `ids` (in the default order) in `order`: the unrated images with a prediction first, by
    p_ur ("likely_ur") or uncertainty ("uncertain"), highest first, ties in the default order; then the rest in
    the default order. `unrated[n]` tells whether ids[n] is unrated (a rated image's prediction is stale: here it
    has none). No model ready, or the default order (""): the default order."""
    if not order or snap is None or not snap.ready:
        return list(range(len(ids)))
    col = 0 if order == "likely_ur" else 1
    preds = snap.preds
    scored = [(n, preds[i][col]) for n, i in enumerate(ids) if unrated[n] and i in preds]
    scored.sort(key=lambda x: (-x[1], x[0]))
    first = {n for n, _ in scored}
    return [n for n, _ in scored] + [n for n in range(len(ids)) if n not in first]
