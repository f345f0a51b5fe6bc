"""The rating page's taste service (loop/rate/taste.py) without a browser: it refits when the ratings change and
only then, predicts new images without a refit, never makes a request wait, says why it cannot order, and
stops with the page."""

import threading
import time

import pytest

from loop.config import EvalConfig
from loop.rate import taste as taste_mod
from loop.rate.handlers import BadRequest, RateHandlers
from loop.rate.taste import Snapshot, TasteService, order_index
from loop.rate.taste_demo import coloured_images, rate_by_colour, wait_ready
from loop.taste_model import TasteModel
from loop.workspace import Workspace


def until(cond, timeout=120.0, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout:.0f} s")


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
    return ws


def test_it_refits_when_the_ratings_change_and_predicts_new_images_without_a_refit(ws):
    with ws.store() as store:
        images = coloured_images(ws, store, 44, round=1)
        rate_by_colour(ws, store, images[:12])
    svc = TasteService(ws, EvalConfig(), poll_s=0.05, min_gap_s=0.1).start()
    try:
        until(lambda: svc.snapshot().model is not None, what="the first fit")  # at once on start
        snap = svc.snapshot()
        assert not snap.ready and snap.preds == {}
        assert snap.note() == "too few ratings to order by taste yet: 12 rated; it needs 18 more"
        assert snap.status()["model"]["ratings"] == 12
        time.sleep(0.5)
        assert svc.fits == 1  # nothing changed: no refit
        with ws.store() as store:
            rate_by_colour(ws, store, images[12:36])
        snap = wait_ready(svc, 8)
        assert svc.fits == 2 and snap.note() == ""
        assert set(snap.preds) == {i for i, _ in images[36:]}  # every unrated image, and only those
        m = snap.model
        assert m.ratings == 36 and m.raters == {"alice": 36} and m.agreement is not None and m.pairs > 0
        with ws.store() as store:
            new = coloured_images(ws, store, 3, round=1, seed=5)
        until(lambda: all(i in svc.snapshot().preds for i, _ in new), what="the new images' predictions")
        assert svc.fits == 2  # predicted by the same model
        p_ur, unc, tier = svc.snapshot().preds[new[0][0]]
        assert 0 <= p_ur <= 1 and 0 <= unc <= 1 and tier in ("UR", "SSR", "SR", "R", "N")
    finally:
        svc.stop()
    assert not svc.alive


def test_a_request_never_waits_for_a_fit(ws, monkeypatch):
    with ws.store() as store:
        coloured_images(ws, store, 6, round=1)
    started, release = threading.Event(), threading.Event()

    def slow_fit(*args, **kwargs):
        started.set()
        release.wait(60)
        raise RuntimeError("no model today")

    monkeypatch.setattr(taste_mod, "fit_workspace", slow_fit)
    h = RateHandlers(ws, ws.store())
    h.taste = TasteService(ws, EvalConfig(), poll_s=0.05).start()
    try:
        assert started.wait(60)
        out = {}
        t = threading.Thread(target=lambda: out.update(h.images(round=1, order="likely_ur")))
        t.start()
        t.join(30)  # a fit under way: the list comes all the same, in the default order
        assert not t.is_alive()
        assert out["ids"] == sorted(out["ids"]) and out["pred"] == [""] * 6
        assert out["taste"]["order"] == "" and "learning" in out["taste"]["note"]
        release.set()
        until(lambda: h.taste.snapshot().error, what="the failed fit's note")
        note = h.images(round=1, order="likely_ur")["taste"]["note"]
        assert note == "the taste model could not be fitted (no model today); the default order for now"
    finally:
        release.set()
        h.taste.stop()
        h.store.close()


def test_orders_put_predicted_unrated_images_first_and_the_rest_in_the_default_order():
    model = TasteModel(True)
    # ids in the default order (unrated first, then by id); 5 is rated (its stale prediction is ignored), 3 has none
    ids, unrated = [1, 2, 3, 4, 5], [True, True, True, True, False]
    preds = {1: (0.1, 0.9, "N"), 2: (0.8, 0.2, "UR"), 4: (0.8, 0.5, "UR"), 5: (0.99, 0.99, "UR")}
    snap = Snapshot(model=model, preds=preds)
    pick = lambda order: [ids[n] for n in order_index(ids, unrated, snap, order)]  # noqa: E731
    assert pick("likely_ur") == [2, 4, 1, 3, 5]  # a tie keeps the default order
    assert pick("uncertain") == [1, 4, 2, 3, 5]
    assert pick("") == ids
    assert [ids[n] for n in order_index(ids, unrated, Snapshot(), "likely_ur")] == ids  # no model: default
    not_ready = Snapshot(model=TasteModel(False, ratings=3), preds=preds)
    assert [ids[n] for n in order_index(ids, unrated, not_ready, "uncertain")] == ids


def test_predictions_are_never_ratings_and_a_bad_order_is_refused(ws):
    with ws.store() as store:
        images = coloured_images(ws, store, 40, round=1)
        rate_by_colour(ws, store, images[:32])
    h = RateHandlers(ws, ws.store())
    h.taste = TasteService(ws, EvalConfig(), poll_s=0.05).start()
    try:
        snap = wait_ready(h.taste, 8)
        listed = h.images(round=1, order="likely_ur")
        assert listed["taste"] == {"ready": True, "note": "", "version": snap.version, "order": "likely_ur"}
        assert listed["unrated"] == 8 and listed["tiers"][:8] == [""] * 8  # guessed, still unrated
        assert all(listed["pred"][:8]) and listed["pred"][8:] == [""] * 32  # a guess on unrated images only
        assert [p[0] for p in snap.preds.values()] and listed["ids"][0] == max(
            snap.preds, key=lambda i: snap.preds[i][0]
        )
        c = h.counters(round=1)
        assert c["rated"] == 32 and sum(c["tiers"].values()) == 32
        assert {i for i, _ in h.predictions(round=1)["pred"]} == set(snap.preds)
        with pytest.raises(BadRequest):
            h.images(round=1, order="best")
        from loop.rate.page import progress_markdown

        text = progress_markdown(h)
        assert "### Taste model" in text and "**Learnt from:** 32 ratings" in text and "alice 32" in text
        assert f"over {snap.model.pairs:,} held-out pairs" in text
    finally:
        h.taste.stop()
        h.store.close()
