"""Every reading, in SQLite (through sqlite-utils), and the outbox of what MQTT has not yet taken.

    >>> store = Store("/tmp/readings.db")
    >>> first_id = store.commit([("greenhouse", "temp", 21.5, 1764070000000, 7)])
    >>> store.unsent(first_id - 1, 10)[0][1:4]
    ('greenhouse', 'temp', 21.5)

(History is read by ``pico-gateway readings``, gateway/history.py, over its own
read-only connection.)

Table ``readings(id, device, metric, value REAL, ts INTEGER, seq INTEGER, sent)``:
``ts`` in Unix milliseconds (UTC), indexed on (device, metric, ts) for "one
device's metric over a time range". ``sent`` is the outbox: 0 until the broker
acknowledged the reading's message, then 1; 2 when the backlog bound made the
gateway give up publishing it (the reading stays here). A partial index keeps
the unsent rows cheap to find however big the table grows.

``commit`` returns only after the transaction is durable at the configured
``synchronous`` level (FULL by default): a reading is on disk before it is
published. See docs/reliability.md for what a power cut can cost.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import sqlite_utils

Row = tuple[str, str, float, int, "int | None"]  # device, metric, value, ts_ms, seq
StoredRow = tuple[int, str, str, float, int, "int | None"]  # id + Row

UNSENT, SENT, EXPIRED = 0, 1, 2
_INSERT = "INSERT INTO readings (device, metric, value, ts, seq, sent) VALUES (?, ?, ?, ?, ?, 0)"
_INSERT_SENT = _INSERT.replace("?, 0)", f"?, {SENT})")


def id_ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """[3, 1, 2, 7] -> [(1, 3), (7, 7)]: acknowledgements mostly come in runs."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        elif not out or i != out[-1][1]:
            out.append((i, i))
    return out


class Store:
    def __init__(self, path: str | Path, synchronous: Literal["full", "normal"] = "full") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used under a lock: the outbox thread writes, others read.
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(self._conn)
        self.db.enable_wal()
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA busy_timeout=5000")
        readings = self.db.table("readings")
        readings.create(
            {"id": int, "device": str, "metric": str, "value": float, "ts": int, "seq": int},
            pk="id",
            not_null={"device", "metric", "value", "ts"},
            if_not_exists=True,
        )
        if "sent" not in readings.columns_dict:
            # Rows from before the outbox existed count as sent: never replay history.
            readings.add_column("sent", int, not_null_default=SENT)
        readings.create_index(["device", "metric", "ts"], if_not_exists=True)
        self._conn.execute("CREATE INDEX IF NOT EXISTS readings_unsent ON readings(id) WHERE sent = 0")
        self._conn.commit()

    def commit(self, rows: Sequence[Row], sent_ids: Iterable[int] = ()) -> int:
        """Insert ``rows`` as unsent and mark ``sent_ids`` sent, in one transaction.

        Returns the id of the first inserted row (the others follow it, in order:
        this connection is the only writer). Raises sqlite3.Error (disk full,
        read-only file) with nothing changed.
        """
        # executemany on the connection, not table.insert_all: this is the hot path,
        # and insert_all's per-row dict handling costs several times more.
        with self._lock, self._conn:
            self._conn.executemany(_INSERT, rows)
            last = self._conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            ranges = id_ranges(sent_ids)
            if ranges:
                self._conn.executemany("UPDATE readings SET sent = 1 WHERE id BETWEEN ? AND ?", ranges)
        return last - len(rows) + 1

    def record(self, rows: Sequence[Row]) -> None:
        """Insert rows that need no publishing (a recorder's: the broker has them), as sent."""
        with self._lock, self._conn:
            self._conn.executemany(_INSERT_SENT, rows)

    def unsent(self, after_id: int, limit: int) -> list[StoredRow]:
        """The oldest unsent readings with ``id > after_id``, in id order."""
        with self._lock:
            return self._conn.execute(
                "SELECT id, device, metric, value, ts, seq FROM readings WHERE sent = 0 AND id > ? "
                "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def count_unsent_by_device(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT device, count(*) FROM readings WHERE sent = 0 GROUP BY device"))

    def expire_unsent(self, keep_rows: int, older_than_ms: int) -> int:
        """Give up publishing the oldest unsent readings beyond ``keep_rows``, and any
        older than ``older_than_ms``; they stay in the table (sent = 2). Returns how many."""
        with self._lock, self._conn:
            cur = self._conn.execute(
                "UPDATE readings SET sent = 2 WHERE sent = 0 AND (ts < ? OR id <= "
                "(SELECT id FROM readings WHERE sent = 0 ORDER BY id DESC LIMIT 1 OFFSET ?))",
                (older_than_ms, keep_rows))
            return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()
