import sqlite3

import pytest

from loop.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "loop.db")
    yield s
    s.close()


def _img(store, n):
    return store.add_image(sha256=f"{n:064x}", path=f"generations/unit_000/{n}.png", prompt="p", unit=0, round=0)


def test_wal_mode(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_image_is_idempotent_on_sha(store):
    a = _img(store, 1)
    assert _img(store, 1) == a
    assert len(store.images()) == 1


def test_ratings_are_append_only_and_last_decision_wins(store):
    i = _img(store, 1)
    store.rate(i, "SR", "alice")
    store.rate(i, "UR", "bob")
    assert store.tier_of(i) == "UR"
    rows = store.db.execute("SELECT tier, rater FROM ratings ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("SR", "alice"), ("UR", "bob")]


def test_undo_restores_previous_tier_and_keeps_history(store):
    i, j = _img(store, 1), _img(store, 2)
    store.rate(i, "R", "alice")
    store.rate(i, "SSR", "alice")
    store.rate(j, "N", "bob")
    assert store.undo("alice") == i
    assert store.tier_of(i) == "R"
    assert store.tier_of(j) == "N"  # bob's rating is untouched
    assert store.undo("alice") == i
    assert store.tier_of(i) is None
    assert store.undo("alice") is None
    assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 5  # 3 ratings + 2 undo events


def test_bad_tier_rejected(store):
    i = _img(store, 1)
    with pytest.raises(ValueError, match="SSS"):
        store.rate(i, "SSS", "alice")
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("INSERT INTO ratings (image_id, tier, rater, created_at) VALUES (?, 'X', 'a', 0)", (i,))


def test_phases(store):
    assert not store.phase_done(0, "generate")
    store.begin_phase(0, "generate")
    assert store.phase(0, "generate")["status"] == "running"
    store.finish_phase(0, "generate", {"made": 3})
    assert store.phase_done(0, "generate")


def test_units(store):
    store.ensure_base_unit("embedded")
    assert store.current_unit() == 0
    store.add_unit(
        1, parent=0, path="checkpoints/unit_001", base="embedded", method="lora", strategy="golden", manifest={}
    )
    assert store.current_unit() == 1
    assert store.unit(1)["parent"] == 0


def test_atomic_write_gives_files_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from loop.workspace import UMASK, atomic_write

    path = atomic_write(tmp_path / "a" / "b.png", b"data")
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~UMASK
    assert [p.name for p in path.parent.iterdir()] == ["b.png"]  # no temporary file left
