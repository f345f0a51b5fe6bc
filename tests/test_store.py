import sqlite3

import pytest

from loop.store import SCHEMA, Store


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


def test_a_rating_or_undo_resent_with_its_key_is_stored_once(store):
    i, j = _img(store, 1), _img(store, 2)
    first = store.rate_many([(i, "SR"), (j, "N")], "alice", keys=["k" * 10, "m" * 10])
    # the page did not see the answer and sends the batch again, with one new rating behind it
    again = store.rate_many([(i, "SR"), (j, "N"), (i, "UR")], "alice", keys=["k" * 10, "m" * 10, "n" * 10])
    assert again[:2] == first
    assert store.tier_of(i) == "UR"
    assert store.undo("alice", key="u" * 10) == i
    assert store.undo("alice", key="u" * 10) == i  # resent: nothing more is undone
    assert store.tier_of(i) == "SR" and store.tier_of(j) == "N"
    rows = store.db.execute("SELECT image_id, tier FROM ratings ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [(i, "SR"), (j, "N"), (i, "UR"), (i, None)]
    store.rate_many([(i, "R"), (j, "R")], "bob")  # no keys (loop rate --auto, scripts): every call stores
    store.rate_many([(i, "R")], "bob")
    assert store.db.execute("SELECT COUNT(*) FROM ratings WHERE rater = 'bob'").fetchone()[0] == 3


def test_a_database_from_before_rating_keys_gets_the_column_and_keeps_its_ratings(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    old_schema = "\n".join(line for line in SCHEMA.splitlines() if "client_key" not in line)
    db.executescript(old_schema)
    db.execute("INSERT INTO images (sha256, path, created_at) VALUES ('a', 'generations/unit_000/a.png', 0)")
    db.execute("INSERT INTO ratings (image_id, tier, rater, created_at) VALUES (1, 'SSR', 'alice', 0)")
    db.commit()
    db.close()
    with Store(path) as s:
        assert s.tier_of(1) == "SSR"
        s.rate_many([(1, "UR")], "alice", keys=["abcdefgh"])
        s.rate_many([(1, "UR")], "alice", keys=["abcdefgh"])
        assert s.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 2
    with Store(path) as s:  # opened again: nothing to add
        assert s.tier_of(1) == "UR"
