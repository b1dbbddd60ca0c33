"""Readings acknowledged end to end: the store refuses a reading a Pico sent again,
the gateway acknowledges what it stored, and a Pico resends what was not
acknowledged (docs/protocol.md, docs/reliability.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store import Row, Store


def rows_of(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, device, metric, value, seq, boot, ts_pico FROM readings ORDER BY id").fetchall()


def test_a_reading_sent_again_by_the_same_boot_is_stored_once(tmp_path: Path) -> None:
    """A Pico resends what it could not know was stored: the same (device, boot, seq,
    metric) is refused, counted and reported to the listener, and the ids of what is
    stored still follow the first one in order (the outbox publishes by them)."""
    db = tmp_path / "readings.db"
    store = Store(db)
    told: list[tuple[list[Row], list[Row]]] = []
    store.on_stored = lambda stored, refused: told.append((list(stored), list(refused)))
    try:
        first: list[Row] = [("a", "temp", 20.0, 1000, 5, 77, 0), ("a", "uptime", 1.0, 1000, 5, 77, 0),
                            ("a", "temp", 20.5, 2000, 6, 77, 0)]
        assert store.commit(list(first)) == 1
        again: list[Row] = [("a", "temp", 20.5, 2100, 6, 77, 1),   # stored already
                            ("b", "temp", 9.0, 2100, 6, 77, 0),    # another device
                            ("a", "temp", 21.0, 3000, 7, 77, 0),
                            ("a", "temp", 21.0, 3000, 7, 77, 0),   # twice in one commit
                            ("a", "temp", 30.0, 3000, 6, 78, 0),   # another boot of the same Pico
                            ("a", "temp", 1.0, 3000, 6)]           # no boot: never refused
        batch = list(again)
        assert store.commit(batch) == 4
        assert store.duplicates_refused == 2
        assert batch == [again[1], again[2], again[4], again[5]]
        assert told[-1] == (batch, [again[0], again[3]])
        assert [r[1:] for r in rows_of(db)] == [
            ("a", "temp", 20.0, 5, 77, 0), ("a", "uptime", 1.0, 5, 77, 0), ("a", "temp", 20.5, 6, 77, 0),
            ("b", "temp", 9.0, 6, 77, 0), ("a", "temp", 21.0, 7, 77, 0), ("a", "temp", 30.0, 6, 78, 0),
            ("a", "temp", 1.0, 6, None, 0)]
        assert [r[0] for r in store.unsent(0, 100)] == [1, 2, 3, 4, 5, 6, 7]
        assert store.commit([("a", "temp", 1.0, 3000, 6)]) == 8  # readings without a boot: as before
    finally:
        store.close()


def test_an_older_database_is_migrated_on_open(tmp_path: Path) -> None:
    """A database from before boots: its rows stay, have no boot, and are never taken for
    duplicates of a reading with the same sequence number."""
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as conn:
        conn.execute('CREATE TABLE "readings" ("id" INTEGER PRIMARY KEY, "device" TEXT NOT NULL, '
                     '"metric" TEXT NOT NULL, "value" REAL NOT NULL, "ts" INTEGER NOT NULL, "seq" INTEGER, '
                     '"sent" INTEGER NOT NULL DEFAULT 1)')
        conn.execute("INSERT INTO readings (device, metric, value, ts, seq, sent) VALUES ('a', 'temp', 1, 1, 5, 1)")
    store = Store(db)
    try:
        assert store.commit([("a", "temp", 2.0, 2, 5, 9, 1), ("a", "temp", 3.0, 3, 5)]) == 2
        assert store.commit([("a", "temp", 2.0, 2, 5, 9, 1)]) == 4  # (nothing stored: the id after the last one)
        assert store.duplicates_refused == 1
        assert [r[1:] for r in rows_of(db)] == [("a", "temp", 1.0, 5, None, 0), ("a", "temp", 2.0, 5, 9, 1),
                                                ("a", "temp", 3.0, 5, None, 0)]
    finally:
        store.close()
