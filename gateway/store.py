"""Every reading, in SQLite (through sqlite-utils).

    >>> store = Store("/tmp/readings.db")
    >>> store.add([("greenhouse", "temp", 21.5, 1764070000000, 7)])
    >>> store.readings("greenhouse", "temp")[-1]["value"]
    21.5

Table ``readings(id, device, metric, value REAL, ts INTEGER, seq INTEGER)``,
``ts`` in Unix milliseconds (UTC), indexed on (device, metric, ts) for "one
device's metric over a time range". ``add`` returns only after the rows are
committed with ``synchronous=FULL``: a reading is on disk before it is published.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlite_utils

Row = tuple[str, str, float, int, int | None]  # device, metric, value, ts_ms, seq

_INSERT = "INSERT INTO readings (device, metric, value, ts, seq) VALUES (?, ?, ?, ?, ?)"


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used under a lock: the writer thread adds, the CLI reads.
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        self.db = sqlite_utils.Database(self._conn)
        self.db.enable_wal()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        readings = self.db.table("readings")
        readings.create(
            {"id": int, "device": str, "metric": str, "value": float, "ts": int, "seq": int},
            pk="id",
            not_null={"device", "metric", "value", "ts"},
            if_not_exists=True,
        )
        readings.create_index(["device", "metric", "ts"], if_not_exists=True)

    def add(self, rows: Iterable[Row]) -> None:
        """Commit rows in one transaction. Raises sqlite3.Error (disk full, read-only)."""
        # executemany on the connection, not table.insert_all: the hot path of every
        # reading, and insert_all's per-row dict handling costs several times more.
        with self._lock, self._conn:
            self._conn.executemany(_INSERT, rows)

    def readings(self, device: str, metric: str | None = None, since_ms: int = 0) -> list[dict[str, Any]]:
        where = "device = ? AND ts >= ?" + (" AND metric = ?" if metric else "")
        args: list[Any] = [device, since_ms] + ([metric] if metric else [])
        with self._lock:
            return list(self.db.table("readings").rows_where(where, args, order_by="ts, id"))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
