"""The readings database as ``readings`` and ``status`` read it: read-only, and its times in words.

The SQLite database at the config's ``store.path`` is opened read-only (an
``file:...?mode=ro`` URI), so both work next to a running gateway and never create
or change the database; every query is a seek on the (device, metric, ts) index.

Roll-ups (``--every 1m`` or ``1h``) come from the tables ``rollups_1m`` and
``rollups_1h`` (gateway/rollups.py), merged with those of the raw rows not rolled
up yet, computed here on the fly: the newest minute or so, and the readings not
yet published. A database no retention pass has run on yet is all raw: its
roll-ups are all computed here.
"""

from __future__ import annotations

import argparse
import heapq
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import rollups
from gateway.config import GatewayConfig, load_config_or_report


class HistoryError(Exception):
    """A problem the user can fix; the message says which and how."""


def run_with_config(args: argparse.Namespace, action: Callable[[GatewayConfig], int]) -> int:
    """A command's ``action`` on the config ``--config`` names: 2 when it cannot be read,
    1 with the message when the action raises HistoryError."""
    config = load_config_or_report(args.config)
    if config is None:
        return 2
    try:
        return action(config)
    except HistoryError as exc:
        print(f"pico-gateway: {exc}", file=sys.stderr)
        return 1


# -- time ----------------------------------------------------------------------------------

def iso_utc(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def local_time(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(ts_ms: int, now: float | None = None) -> str:
    seconds = max(0, (time.time() if now is None else now) - ts_ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def format_value(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


# -- the database, read-only ----------------------------------------------------------------

def open_readonly(path: Path) -> sqlite3.Connection:
    """The readings database, read-only; HistoryError when there is none yet."""
    path = Path(path)
    if not path.exists():
        raise HistoryError(f"no database at {path} yet: the gateway creates it when it first runs "
                           "(store.path in the config)")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
        conn.execute("PRAGMA busy_timeout=5000")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the database {path}: {exc}") from None
    if "readings" not in tables:
        conn.close()
        raise HistoryError(f"{path} has no readings table: is it the gateway's database (store.path)?")
    conn.row_factory = sqlite3.Row
    return conn


# After a year a device has millions of readings. Every query below is a seek on the
# (device, metric, ts) index, never a walk over all of a device's rows: distinct values
# are found one index seek each, and readings are read per metric in index order and
# merged, in chunks.

def known_devices(conn: sqlite3.Connection) -> list[str]:
    return _distinct(conn, "SELECT device FROM readings WHERE device > ? ORDER BY device LIMIT 1", ())


def device_metrics(conn: sqlite3.Connection, device: str) -> list[str]:
    return _distinct(conn, "SELECT metric FROM readings WHERE device = ? AND metric > ? ORDER BY metric LIMIT 1",
                     (device,))


def _distinct(conn: sqlite3.Connection, next_sql: str, args: tuple[Any, ...]) -> list[str]:
    found: list[str] = []
    while (row := conn.execute(next_sql, (*args, found[-1] if found else "")).fetchone()) is not None:
        found.append(row[0])
    return found


def has_readings(conn: sqlite3.Connection, device: str) -> bool:
    return conn.execute("SELECT 1 FROM readings WHERE device = ? LIMIT 1", (device,)).fetchone() is not None


Key = tuple[int, int]  # (ts, id): the order readings are printed in, oldest first
Reading = tuple[int, int, str, float, "int | None"]  # ts, id, metric, value, seq: compared as tuples, by (ts, id)
_LOWEST: Key = (-(1 << 62), -(1 << 62))
_HIGHEST: Key = (1 << 62, 1 << 62)
_COLUMNS = "SELECT ts, id, metric, value, seq FROM readings WHERE device = ? AND metric = ? AND "
_AFTER = _COLUMNS + "(ts, id) > (?, ?) ORDER BY ts, id LIMIT ?"
_BEFORE = _COLUMNS + "(ts, id) < (?, ?) ORDER BY ts DESC, id DESC LIMIT ?"
CHUNK = 5000  # rows per query while streaming


def _walk(conn: sqlite3.Connection, sql: str, device: str, metric: str, start: Key,
          chunk: int = CHUNK) -> Iterator[Reading]:
    """One metric's readings beyond ``start``, in ``sql``'s order, ``chunk`` rows per query.
    Each query is its own short read transaction: an export of a year never holds one
    snapshot for minutes, which would keep the gateway's WAL from being checkpointed."""
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples: merged by comparison, fast
    while True:
        rows = cursor.execute(sql, (device, metric, *start, chunk)).fetchall()
        yield from rows
        if len(rows) < chunk:
            return
        start = rows[-1][:2]


def _merged(walks: list[Iterator[Reading]], reverse: bool = False) -> Iterator[Reading]:
    return walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=reverse)


def query_readings(conn: sqlite3.Connection, device: str, metrics: list[str], since_ms: int | None,
                   limit: int | None = None) -> tuple[Iterator[Reading], int | None]:
    """The readings of ``metrics`` of ``device`` from ``since_ms`` on (all when None), only
    the newest ``limit`` when given, oldest first, read as they are consumed; and, when
    ``limit`` left older readings out, the time of the oldest one returned (else None)."""
    start: Key = _LOWEST if since_ms is None else (since_ms, _LOWEST[1])
    cut: int | None = None
    if not metrics:
        return iter(()), None
    if limit is not None:
        # Walk back from the newest to the limit-th newest: the rows are then read forward from it.
        chunk = min(CHUNK, limit + 1)
        oldest: Key | None = None
        for n, row in enumerate(_merged([_walk(conn, _BEFORE, device, m, _HIGHEST, chunk) for m in metrics], True)):
            if row[:2] < start:
                break
            if n == limit:
                cut = oldest[0] if oldest else None
                break
            oldest = row[:2]
        if oldest is None:
            return iter(()), None
        start = oldest
    start = (start[0], start[1] - 1)  # _AFTER is exclusive, and ids are integers
    return _merged([_walk(conn, _AFTER, device, m, start) for m in metrics]), cut


def latest(conn: sqlite3.Connection, device: str) -> dict[str, tuple[float, int]]:
    """metric -> (value, ts) of the newest reading of each metric of ``device``."""
    out: dict[str, tuple[float, int]] = {}
    for metric in device_metrics(conn, device):
        row = conn.execute("SELECT value, ts FROM readings WHERE device = ? AND metric = ? ORDER BY ts DESC, id DESC "
                           "LIMIT 1", (device, metric)).fetchone()
        if row is not None:
            out[metric] = (row[0], row[1])
    return out


# -- roll-ups -------------------------------------------------------------------------------

Rollup = tuple[int, str, int, float, float, float, float]  # start ts, metric, count, min, max, mean, last


def query_rollups(conn: sqlite3.Connection, device: str, metrics: list[str], since_ms: int | None,
                  every: str) -> Iterator[Rollup]:
    """The ``every`` (``1m``, ``1h``) intervals of ``metrics`` of ``device`` from the one
    ``since_ms`` falls in on, oldest first (then by metric), read as they are consumed."""
    size = rollups.SIZES[every]
    start = -(1 << 62) if since_ms is None else since_ms - since_ms % size
    stored = rollups.has_rollups(conn)
    rolled = rollups.rolled_id(conn) if stored else 0
    walks = [_rollup_walk(conn, device, m, start, size, every if stored else None, rolled) for m in metrics]
    return walks[0] if len(walks) == 1 else heapq.merge(*walks)


def _rollup_walk(conn: sqlite3.Connection, device: str, metric: str, start: int, size: int, table: str | None,
                 rolled: int) -> Iterator[Rollup]:
    tail = _unrolled(conn, device, metric, start, size, rolled if table else None)
    pending = sorted(tail)
    i = 0
    if table is not None:
        cursor = conn.cursor()
        cursor.row_factory = None
        sql = (f"SELECT ts, n, lo, hi, total, last, last_ts FROM rollups_{table} WHERE device = ? AND metric = ? "
               f"AND ts >= ? ORDER BY ts LIMIT {CHUNK}")
        after = start
        while True:
            rows = cursor.execute(sql, (device, metric, after)).fetchall()
            for b, n, lo, hi, total, last, last_ts in rows:
                while i < len(pending) and pending[i] < b:
                    yield _interval(pending[i], metric, tail[pending[i]])
                    i += 1
                if i < len(pending) and pending[i] == b:
                    tn, tlo, thi, ttotal, tlast, tlast_ts = tail[b]  # (late rows of a rolled interval)
                    n, lo, hi, total = n + tn, min(lo, tlo), max(hi, thi), total + ttotal
                    last = tlast if tlast_ts >= last_ts else last
                    i += 1
                yield b, metric, int(n), lo, hi, total / n, last
            if len(rows) < CHUNK:
                break
            after = rows[-1][0] + 1
    for b in pending[i:]:
        yield _interval(b, metric, tail[b])


def _interval(b: int, metric: str, v: list[float]) -> Rollup:
    return b, metric, int(v[0]), v[1], v[2], v[3] / v[0], v[4]


def _unrolled(conn: sqlite3.Connection, device: str, metric: str, start: int, size: int,
              rolled: int | None) -> dict[int, list[float]]:
    """Interval start -> [count, min, max, sum, last, last_ts] of the raw rows not rolled up:
    those after ``rolled`` (found by id: few), or all (None: no roll-ups, found by the index)."""
    args: tuple[object, ...]
    if rolled is None:
        where, args = "FROM readings WHERE device = ? AND metric = ? AND ts >= ?", (device, metric, start)
    else:  # (NOT INDEXED: the rowid range, not the device's whole history in the index)
        where, args = ("FROM readings NOT INDEXED WHERE id > ? AND device = ? AND metric = ? AND ts >= ?",
                       (rolled, device, metric, start))
    out: dict[int, list[float]] = {}
    cursor = conn.cursor()
    cursor.row_factory = None
    for b, n, lo, hi, total in cursor.execute(
            f"SELECT ts - ts % {size} AS b, count(*), min(value), max(value), sum(value) {where} GROUP BY b", args):
        out[b] = [n, lo, hi, total, 0.0, -(1 << 62)]
    for b, last_ts, last in cursor.execute(f"SELECT ts - ts % {size} AS b, max(ts), value {where} GROUP BY b", args):
        out[b][4], out[b][5] = last, last_ts
    return out


def oldest_raw(conn: sqlite3.Connection, device: str, metrics: list[str]) -> int | None:
    """The time of the oldest raw reading of these metrics of ``device`` (one seek each)."""
    found = [row[0] for m in metrics if (row := conn.execute(
        "SELECT ts FROM readings WHERE device = ? AND metric = ? ORDER BY ts LIMIT 1", (device, m)).fetchone())]
    return min(found, default=None)
