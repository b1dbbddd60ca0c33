"""Roll-ups and retention in the readings database: plain functions over one connection.

Every reading is rolled up, soon after it is stored, per minute and per hour into
``rollups_1m`` and ``rollups_1h``: one row per (device, metric, start of the minute
or hour) with the count, min, max, sum and last value (and the time of that last
value, so that a late reading merges in right). Raw rows older than
``store.keep_raw_days`` are then deleted; roll-ups are kept
``store.keep_rollups_days`` (or forever). ``rollup_state`` keeps the id of the last
row rolled up: rows are rolled in id order, each exactly once.

A row not yet published (``sent = 0``, the outbox's backlog) is never rolled up nor
deleted: a pass stops at the oldest unsent row, and goes on once it is published
(or given up by the backlog bound, ``sent = 2``).

Everything runs in small transactions (``CHUNK`` rows at most, a few milliseconds
each), so the gateway's own commits never wait long for the write lock. The
gateway runs a pass every minute in a child process of its own
(gateway/retention.py), started as ``python -I -S rollups.py PATH KEEP_RAW_MS
KEEP_ROLLUPS_MS MAX_SIZE_BYTES`` (-1: forever / no bound): standard library only,
it prints the pass's figures as one JSON line.

``pico-gateway readings --every`` reads the roll-ups, and computes those of the rows
not rolled up yet on the fly (gateway/stored.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable

CHUNK = 2000  # rows per transaction at most
LOOKAHEAD = 4  # chunks with nothing to delete before a deletion by age stops
CHECKPOINT_EVERY = 8  # transactions between two checkpoints of the WAL by the pass itself
# Pause after each transaction: at least PAUSE_MIN seconds, and as long as it took. SQLite's
# write lock is not fair: a commit that finds it taken sleeps 1, 2, 5, 10, 15 ms... between
# tries (its busy handler), and transactions back to back would hold it nearly all the time,
# starving the gateway's commits (measured: ingest fell to a fifth). With the pause its next
# try finds the lock free.
PAUSE_MIN = 0.02
SIZES = {"1m": 60_000, "1h": 3_600_000}  # roll-up interval name -> milliseconds
SIZE_START, SIZE_TARGET = 0.95, 0.90  # max_size_mb: start deleting above 95 %, down to 90 %
SCHEMA = [
    *(f'CREATE TABLE IF NOT EXISTS "rollups_{name}" ("device" TEXT NOT NULL, "metric" TEXT NOT NULL, '
      '"ts" INTEGER NOT NULL, "n" INTEGER NOT NULL, "lo" REAL NOT NULL, "hi" REAL NOT NULL, "total" REAL NOT NULL, '
      '"last" REAL NOT NULL, "last_ts" INTEGER NOT NULL, PRIMARY KEY ("device", "metric", "ts")) WITHOUT ROWID'
      for name in SIZES),
    'CREATE TABLE IF NOT EXISTS "rollup_state" ("name" TEXT PRIMARY KEY, "value" INTEGER NOT NULL) WITHOUT ROWID',
]
# One roll-up row per (device, metric, interval start) of the rows in an id range; the last
# value is the one with the latest ts (SQLite takes a bare column from the row max() picked).
_AGGREGATE = ("SELECT device, metric, ts - ts % {size} AS b, count(*), min(value), max(value), sum(value) "
              "FROM readings WHERE id > ? AND id <= ? GROUP BY device, metric, b")
_LAST = ("SELECT device, metric, ts - ts % {size} AS b, max(ts), value "
         "FROM readings WHERE id > ? AND id <= ? GROUP BY device, metric, b")
_MERGE = ('INSERT INTO "rollups_{name}" (device, metric, ts, n, lo, hi, total, last, last_ts) '
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, metric, ts) DO UPDATE SET "
          "n = n + excluded.n, lo = min(lo, excluded.lo), hi = max(hi, excluded.hi), "
          "total = total + excluded.total, "
          "last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END, "
          "last_ts = max(last_ts, excluded.last_ts)")

# (device, metric, interval start ms) -> [count, min, max, sum, last, last_ts]
Buckets = dict[tuple[str, str, int], list[float]]


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the roll-up tables when the database has none yet."""
    for statement in SCHEMA:
        conn.execute(statement)


def has_rollups(conn: sqlite3.Connection) -> bool:
    """Whether the database has the roll-up tables (a pass has run on it)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'rollup_state'").fetchone() is not None


def rolled_id(conn: sqlite3.Connection) -> int:
    """The id of the last raw row rolled up (0: none yet, or no roll-up tables)."""
    if not has_rollups(conn):
        return 0
    row = conn.execute("SELECT value FROM rollup_state WHERE name = 'rolled_id'").fetchone()
    return int(row[0]) if row else 0


def oldest_unsent(conn: sqlite3.Connection) -> int | None:
    """The id of the oldest row not yet published (the partial index readings_unsent finds it)."""
    row = conn.execute("SELECT id FROM readings WHERE sent = 0 ORDER BY id LIMIT 1").fetchone()
    return None if row is None else int(row[0])


def roll_bound(conn: sqlite3.Connection) -> int:
    """The highest id a pass may roll up: the newest row, or the one before the oldest unsent."""
    newest = conn.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
    unsent = oldest_unsent(conn)
    return newest if unsent is None else min(newest, unsent - 1)


def merge_into(buckets: Buckets, key: tuple[str, str, int], n: float, lo: float, hi: float, total: float,
               last: float, last_ts: float) -> None:
    """Add one aggregate to ``buckets[key]`` (count, min, max, sum, last by its time)."""
    b = buckets.get(key)
    if b is None:
        buckets[key] = [n, lo, hi, total, last, last_ts]
        return
    b[0] += n
    b[1] = min(b[1], lo)
    b[2] = max(b[2], hi)
    b[3] += total
    if last_ts >= b[5]:
        b[4], b[5] = last, last_ts


def aggregate(conn: sqlite3.Connection, after_id: int, until_id: int) -> Buckets:
    """The per-minute aggregates of the raw rows with ``after_id < id <= until_id``."""
    size = SIZES["1m"]
    buckets: Buckets = {}
    for device, metric, b, n, lo, hi, total in conn.execute(_AGGREGATE.format(size=size), (after_id, until_id)):
        buckets[(device, metric, b)] = [n, lo, hi, total, 0.0, -(1 << 62)]
    for device, metric, b, last_ts, last in conn.execute(_LAST.format(size=size), (after_id, until_id)):
        entry = buckets[(device, metric, b)]
        entry[4], entry[5] = last, last_ts
    return buckets


def coarser(buckets: Buckets, size_ms: int) -> Buckets:
    """Per-minute aggregates merged into intervals of ``size_ms`` (an hour)."""
    out: Buckets = {}
    for (device, metric, b), (n, lo, hi, total, last, last_ts) in buckets.items():
        merge_into(out, (device, metric, b - b % size_ms), n, lo, hi, total, last, last_ts)
    return out


def _rows(buckets: Buckets) -> Iterable[tuple]:
    return ((device, metric, b, *values) for (device, metric, b), values in buckets.items())


def roll_up(conn: sqlite3.Connection, chunk: int = CHUNK, should_stop: Callable[[], bool] = lambda: False,
            stats: dict[str, float] | None = None) -> int:
    """Roll up every raw row not rolled up yet, up to (not including) the oldest unsent
    one, ``chunk`` rows per transaction; returns how many rows it rolled up."""
    ensure_schema(conn)
    stats = stats if stats is not None else {}
    rolled = 0
    while not should_stop():
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")  # (the write lock first: the bound read below holds for this transaction)
        try:
            after = rolled_id(conn)
            bound = roll_bound(conn)
            if bound <= after:
                conn.execute("ROLLBACK")
                stats["held_by_unsent"] = int(oldest_unsent(conn) is not None)
                break
            # Ids may have gaps: the chunk's end is the chunk-th id after ``after``, not after + chunk.
            until = conn.execute("SELECT max(id) FROM (SELECT id FROM readings WHERE id > ? AND id <= ? "
                                 "ORDER BY id LIMIT ?)", (after, bound, chunk)).fetchone()[0] or bound
            minutes = aggregate(conn, after, until)
            conn.executemany(_MERGE.format(name="1m"), _rows(minutes))
            conn.executemany(_MERGE.format(name="1h"), _rows(coarser(minutes, SIZES["1h"])))
            conn.execute("INSERT OR REPLACE INTO rollup_state (name, value) VALUES ('rolled_id', ?)", (until,))
            rolled += int(sum(b[0] for b in minutes.values()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        _transaction(conn, stats, started)
    return rolled


def _transaction(conn: sqlite3.Connection, stats: dict[str, float], started: float) -> None:
    """Count a committed transaction and its time (the gateway's commits wait at most that
    long for the write lock); every CHECKPOINT_EVERY, checkpoint the WAL (see connect)."""
    took = time.perf_counter() - started
    stats["transactions"] = stats.get("transactions", 0) + 1
    stats["max_transaction_ms"] = max(stats.get("max_transaction_ms", 0.0), round(took * 1000, 2))
    if stats["transactions"] % CHECKPOINT_EVERY == 0:
        started = time.perf_counter()
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        ms = (time.perf_counter() - started) * 1000
        stats["max_checkpoint_ms"] = max(stats.get("max_checkpoint_ms", 0.0), round(ms, 2))
    pause_min = stats.get("pause_min", PAUSE_MIN)
    pause = max(pause_min, took) if pause_min else 0.0
    stats["paused_s"] = stats.get("paused_s", 0.0) + pause
    time.sleep(pause)


def delete_bound(conn: sqlite3.Connection) -> int:
    """The highest id that may be deleted: rolled up, published, and never the newest row
    (SQLite gives a new row the highest id + 1: an empty table would hand out ids again)."""
    newest = conn.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
    return min(rolled_id(conn), roll_bound(conn), newest - 1)


def delete_raw(conn: sqlite3.Connection, older_than_ms: int | None, chunk: int = CHUNK,
               should_stop: Callable[[], bool] = lambda: False, enough: Callable[[], bool] = lambda: False,
               stats: dict[str, float] | None = None) -> tuple[int, int | None, int | None]:
    """Delete rolled-up raw rows, oldest id first, ``chunk`` per transaction: those with a
    ts before ``older_than_ms``, or (None) any, until ``enough()``. Rows are stored
    roughly in time order: it stops after LOOKAHEAD chunks in a row with nothing to
    delete (a clock that was ahead for a while leaves rows that are not old yet among the
    oldest ids). Returns (rows deleted, oldest ts deleted, newest ts deleted)."""
    stats = stats if stats is not None else {}
    deleted, oldest, newest = 0, None, None
    after = 0
    empty = 0
    while not should_stop() and not enough():
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            bound = delete_bound(conn)
            window = conn.execute("SELECT min(id), max(id) FROM (SELECT id FROM readings WHERE id > ? AND id <= ? "
                                  "ORDER BY id LIMIT ?)", (after, bound, chunk)).fetchone()
            if window[0] is None:
                conn.execute("ROLLBACK")
                break
            cutoff = "" if older_than_ms is None else f" AND ts < {int(older_than_ms)}"
            where = f"id >= ? AND id <= ?{cutoff}"
            n, lo, hi = conn.execute(f"SELECT count(*), min(ts), max(ts) FROM readings WHERE {where}",
                                     window).fetchone()
            if n:
                conn.execute(f"DELETE FROM readings WHERE {where}", window)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        after = window[1]
        if not n:
            empty += 1
            if empty >= LOOKAHEAD:
                break
            continue  # (nothing written: no pause)
        empty = 0
        _transaction(conn, stats, started)
        deleted += n
        oldest = lo if oldest is None else min(oldest, lo)
        newest = hi if newest is None else max(newest, hi)
    return deleted, oldest, newest


def series(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """The (device, metric) pairs of a roll-up table, one index seek each (never a scan)."""
    found: list[tuple[str, str]] = []
    key = ("", "")
    while (row := conn.execute(f"SELECT device, metric FROM {table} WHERE (device, metric) > (?, ?) "
                               "ORDER BY device, metric LIMIT 1", key).fetchone()) is not None:
        key = (row[0], row[1])
        found.append(key)
    return found


def delete_rollups(conn: sqlite3.Connection, older_than_ms: int, chunk: int = CHUNK,
                   should_stop: Callable[[], bool] = lambda: False, stats: dict[str, float] | None = None) -> int:
    """Delete roll-ups of intervals that start before ``older_than_ms``, per series, ``chunk``
    per transaction; returns how many."""
    stats = stats if stats is not None else {}
    deleted = 0
    for name in SIZES:
        table = f"rollups_{name}"
        for device, metric in series(conn, table):
            while not should_stop():
                started = time.perf_counter()
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    n = conn.execute(f"DELETE FROM {table} WHERE device = ? AND metric = ? AND ts IN (SELECT ts FROM "
                                     f"{table} WHERE device = ? AND metric = ? AND ts < ? ORDER BY ts LIMIT ?)",
                                     (device, metric, device, metric, older_than_ms, chunk)).rowcount
                _transaction(conn, stats, started)
                deleted += n
                if n < chunk:
                    break
    return deleted


def used_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the database's pages hold: its size less its free pages (which SQLite
    reuses before it grows the file)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


def run_pass(conn: sqlite3.Connection, now_ms: int, keep_raw_ms: int, keep_rollups_ms: int | None,
             max_size_bytes: int | None, chunk: int = CHUNK,
             should_stop: Callable[[], bool] = lambda: False, pause_min: float = PAUSE_MIN) -> dict[str, float]:
    """One retention pass: roll up what is new, delete raw rows older than ``keep_raw_ms``
    and roll-ups older than ``keep_rollups_ms`` (None: forever), then, above 95 % of
    ``max_size_bytes`` (None: no bound), the oldest raw rows (rolled up) down to 90 %.
    Returns its figures (rows rolled and deleted, the span deleted for size, seconds).
    ``pause_min``: see PAUSE_MIN (0: no pauses, for tests of a database nothing else writes)."""
    started = time.perf_counter()
    stats: dict[str, float] = {"held_by_unsent": 0, "transactions": 0, "max_transaction_ms": 0.0,
                               "pause_min": pause_min}
    stats["rolled"] = roll_up(conn, chunk, should_stop, stats)
    stats["deleted_raw"] = delete_raw(conn, now_ms - keep_raw_ms, chunk, should_stop, stats=stats)[0]
    stats["deleted_rollups"] = 0 if keep_rollups_ms is None else delete_rollups(conn, now_ms - keep_rollups_ms,
                                                                                chunk, should_stop, stats)
    stats["deleted_for_size"] = 0
    if max_size_bytes is not None and used_bytes(conn) > SIZE_START * max_size_bytes:
        n, lo, hi = delete_raw(conn, None, chunk, should_stop,
                               enough=lambda: used_bytes(conn) <= SIZE_TARGET * max_size_bytes, stats=stats)
        stats["deleted_for_size"] = n
        if n:
            stats["size_deleted_from_ts"], stats["size_deleted_until_ts"] = lo or 0, hi or 0
    stats["used_bytes"] = used = used_bytes(conn)
    if max_size_bytes is not None:
        stats["over_size"] = int(used > SIZE_START * max_size_bytes)
    stats["rolled_id"] = rolled_id(conn)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


def connect(path: str) -> sqlite3.Connection:
    """A connection of its own for a pass: never creates the database (mode=rw), explicit
    transactions, and the writer's busy timeout; synchronous NORMAL (in WAL mode a power
    cut then loses at most the last roll-up transactions, which the next pass does again:
    ``rolled_id`` commits with its roll-ups). The pass checkpoints the WAL itself, passively
    (which does not hold up the gateway's commits), every CHECKPOINT_EVERY transactions,
    rather than at a commit that finds it past 1000 pages: otherwise the gateway's own
    commit after a pass's would often be the one that finds it there, and checkpoint on
    the ingest path."""
    conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=rw", uri=True, isolation_level=None, timeout=5)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def main(argv: list[str]) -> int:
    """The child process's entry: ``PATH KEEP_RAW_MS KEEP_ROLLUPS_MS MAX_SIZE_BYTES [NOW_MS
    [PAUSE_MIN]]`` (NOW_MS, the time the pass takes for now, and PAUSE_MIN, for the soak
    benchmark's accelerated time)."""
    path, keep_raw, keep_rollups, max_size = argv[:4]
    now_ms = int(argv[4]) if len(argv) > 4 else time.time_ns() // 1_000_000
    pause_min = float(argv[5]) if len(argv) > 5 else PAUSE_MIN
    try:
        conn = connect(path)
        try:
            result = run_pass(conn, now_ms, int(keep_raw),
                              None if int(keep_rollups) < 0 else int(keep_rollups),
                              None if int(max_size) < 0 else int(max_size), pause_min=pause_min)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
