"""``pico-gateway readings``: what the gateway stored, as a table, CSV or JSON.

It reads the SQLite database at the config's ``store.path`` read-only
(gateway/stored.py), so it works next to a running gateway. ``pico-gateway status``
is gateway/status.py's; both commands are registered here.

    pico-gateway readings --config gateway.toml --device greenhouse          # the newest 1000
    pico-gateway readings --config gateway.toml --device greenhouse --metric temp --since 2h
    pico-gateway readings --config gateway.toml --device greenhouse --since 2025-11-25T08:00 --format csv
    pico-gateway readings --config gateway.toml --device greenhouse --since 1y --every 1h --format csv

Without ``--every`` it prints raw readings (kept ``store.keep_raw_days``); with
``--every 1m`` or ``1h``, per-interval roll-ups (count, min, max, mean, last), from
the roll-up tables and, for what is not rolled up yet, computed from the raw rows.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from gateway import payloads
from gateway.config import GatewayConfig
from gateway.rollups import SIZES, has_rollups
from gateway.status import cmd_status
from gateway.stored import (
    HistoryError,
    Reading,
    Rollup,
    device_metrics,
    format_value,
    has_readings,
    iso_utc,
    local_time,
    oldest_raw,
    open_readonly,
    query_readings,
    query_rollups,
    run_with_config,
)

__all__ = ["DEFAULT_LIMIT", "add_subcommands", "open_readonly", "parse_since", "query_readings", "readings"]

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w|y)\s*$", re.IGNORECASE)
DEFAULT_LIMIT = 1000  # readings shown when neither --since, --limit nor --all says how many
UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


# -- time ----------------------------------------------------------------------------------

def parse_since(text: str, now: float | None = None) -> int:
    """``30m``, ``1h``, ``2d``, ``1w``, ``1y`` (365 days) ago, or an ISO 8601 time (local time when it has no
    offset), as Unix milliseconds."""
    now = time.time() if now is None else now
    match = DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * UNIT_SECONDS[match.group(2).lower()]
        return int((now - seconds) * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(f"--since {text!r}: expected a duration like 30m, 1h, 2d, 1w or 1y, "
                           "or a time like 2025-11-25T08:00 (local) or 2025-11-25T07:00Z") from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: the local time zone
    return int(when.timestamp() * 1000)



# -- readings ---------------------------------------------------------------------------------

TABLE_HEADER = ("time (local)", "metric", "value", "seq")
TABLE_SAMPLE = 1000  # rows the table's column widths are taken from (a later, wider value widens them)


@functools.lru_cache(maxsize=256)  # (the metrics of one frame share their time)
def _local_time(ts_ms: int) -> str:
    return local_time(ts_ms)


@functools.lru_cache(maxsize=256)
def _iso_utc(ts_ms: int) -> str:
    return iso_utc(ts_ms)


def _cells(r: Reading) -> tuple[str, str, str, str]:
    return _local_time(r[0]), r[2], format_value(r[3]), "" if r[4] is None else str(r[4])


def write_readings(rows: Iterable[Reading], fmt: str, out: IO[str]) -> int:
    """Write ``rows`` as they come (a year of them never sits in memory); returns how many."""
    count = 0
    if fmt == "json":
        out.write("[")
        for count, (ts, _, metric, value, seq) in enumerate(rows, 1):
            row: payloads.ExportedReading = {"ts": _iso_utc(ts), "ts_ms": ts, "metric": metric, "value": value,
                                             "seq": seq}
            out.write(("\n" if count == 1 else ",\n") + json.dumps(row))
        out.write("\n]\n" if count else "]\n")
    elif fmt == "csv":
        count = _write_csv(rows, out)
    else:
        count = _write_table(map(_cells, rows), TABLE_HEADER, out)
    return count


def _write_table(lines: Iterable[tuple[str, ...]], header: tuple[str, ...], out: IO[str]) -> int:
    """Aligned columns (the first two to the left, numbers to the right), as the lines come;
    the widths from the first TABLE_SAMPLE lines, widened by any later one. Returns how many."""
    lines = iter(lines)
    sample = list(itertools.islice(lines, TABLE_SAMPLE))
    widths = [max(len(line[i]) for line in [header, *sample]) for i in range(len(header))]
    count = 0
    for line in itertools.chain([header], sample, lines):
        widths = [max(w, len(cell)) for w, cell in zip(widths, line, strict=True)]
        out.write("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                            for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip() + "\n")
        count += 1
    return count - 1  # (the header)


class _UtcStamps:
    """ISO 8601 UTC times with milliseconds, as iso_utc writes them, for rows in time order:
    the date, hour and minute are formatted once a minute (formatting each one costs
    more than the rest of a CSV line)."""

    def __init__(self) -> None:
        self.minute: int | None = None
        self.prefix = ""

    def __call__(self, ts: int) -> str:
        minute, rest = divmod(ts, 60_000)
        if minute != self.minute:
            self.minute = minute
            self.prefix = _minute_prefix(minute)
        return f"{self.prefix}{_SECONDS[rest // 1000]}{_MILLIS[rest % 1000]}"


def _minute_prefix(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:")


_SECONDS = [f"{i:02d}." for i in range(60)]
_MILLIS = [f"{i:03d}Z" for i in range(1000)]


@functools.lru_cache(maxsize=256)
def _csv_field(text: str) -> str:
    """A CSV field as the csv module writes it (quoted only when it must be)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


CSV_BUFFER = 2000  # lines written at once


def _write_csv(rows: Iterable[Reading], out: IO[str]) -> int:
    """Raw readings as CSV with the columns of payloads.ExportedReading, formatted by hand: a
    day of one metric is 86,400 lines, and csv.writer with a datetime for each took most of
    the command's time (the loop is inlined for the same reason)."""
    out.write(",".join(payloads.EXPORT_COLUMNS) + "\n")
    seconds, millis = _SECONDS, _MILLIS
    minute, prefix = None, ""
    names: dict[str, str] = {}
    lines: list[str] = []
    add = lines.append
    count = 0
    for ts, _, metric, value, seq in rows:
        m, rest = divmod(ts, 60_000)
        if m != minute:
            minute, prefix = m, _minute_prefix(m)
        name = names.get(metric)
        if name is None:
            name = names[metric] = _csv_field(metric)
        add(f"{prefix}{seconds[rest // 1000]}{millis[rest % 1000]},{ts},{name},{value!r},"
            f"{'' if seq is None else seq}\n")
        if len(lines) >= CSV_BUFFER:
            out.write("".join(lines))
            count += len(lines)
            lines.clear()
    out.write("".join(lines))
    return count + len(lines)


ROLLUP_TABLE_HEADER = ("time (local)", "metric", "count", "min", "max", "mean", "last")


def write_rollups(rows: Iterable[Rollup], fmt: str, out: IO[str]) -> int:
    """Write roll-up intervals as they come; returns how many."""
    count = 0
    stamp = _UtcStamps()
    if fmt == "json":
        out.write("[")
        for count, (ts, metric, n, lo, hi, mean, last) in enumerate(rows, 1):
            row: payloads.ExportedRollup = {"ts": stamp(ts), "ts_ms": ts, "metric": metric, "count": n, "min": lo,
                                            "max": hi, "mean": mean, "last": last}
            out.write(("\n" if count == 1 else ",\n") + json.dumps(row))
        out.write("\n]\n" if count else "]\n")
    elif fmt == "csv":
        out.write(",".join(payloads.ROLLUP_COLUMNS) + "\n")
        lines: list[str] = []
        for ts, metric, n, lo, hi, mean, last in rows:
            lines.append(f"{stamp(ts)},{ts},{_csv_field(metric)},{n},{lo!r},{hi!r},{mean!r},{last!r}\n")
            if len(lines) >= CSV_BUFFER:
                out.write("".join(lines))
                count += len(lines)
                lines.clear()
        out.write("".join(lines))
        count += len(lines)
    else:
        def cells(r: Rollup) -> tuple[str, ...]:
            return (_local_time(r[0]), r[1], str(r[2]), *(format_value(v) for v in r[3:]))
        count = _write_table(map(cells, rows), ROLLUP_TABLE_HEADER, out)
    return count


def readings(config: GatewayConfig, device: str, metric: str | None = None, since: str | None = None,
             fmt: str = "table", limit: int | None = None, everything: bool = False,
             out: IO[str] | None = None, every: str | None = None) -> int:
    """Print readings; with neither ``since`` nor ``limit`` nor ``everything``, the newest
    DEFAULT_LIMIT, saying on stderr how to get more when there are more. ``every``
    (``1m``, ``1h``): roll-ups per interval instead (by default the last DEFAULT_LIMIT
    intervals; ``limit``: the newest that many of the range)."""
    out = out or sys.stdout
    since_ms = parse_since(since) if since else None
    default = since is None and limit is None and not everything
    if every is not None:
        if default:
            since_ms = int(time.time() * 1000) - DEFAULT_LIMIT * SIZES[every]
        return _rollups(config, device, metric, since_ms, every, fmt, limit, out)
    if default:
        limit = DEFAULT_LIMIT
    conn = open_readonly(config.store.path)
    try:
        if config.device(device) is None and not has_readings(conn, device):
            ids = ", ".join(d.id for d in config.devices) or "none"
            raise HistoryError(f"unknown device {device!r}: not in the config (devices: {ids}) and no readings "
                               f"in {config.store.path}")
        metrics = device_metrics(conn, device)
        if metric and metric not in metrics:
            raise HistoryError(f"device {device!r} has no readings of metric {metric!r} "
                               f"(metrics: {', '.join(metrics) or 'none yet'})")
        rows, cut = query_readings(conn, device, [metric] if metric else metrics, since_ms, limit)
        count = write_readings(rows, fmt, out)
        if since_ms is not None and has_rollups(conn):
            oldest = oldest_raw(conn, device, [metric] if metric else metrics)
            rolled_before = conn.execute(  # (roll-ups of the range whose raw readings are gone)
                "SELECT 1 FROM rollups_1m WHERE device = ? AND ts >= ? AND ts < ? LIMIT 1",
                (device, since_ms - since_ms % 60_000, (oldest or 1 << 62) - 60_000)).fetchone()
            if rolled_before is not None:
                print(f"(raw readings are kept store.keep_raw_days = {config.store.keep_raw_days:g} days"
                      f"{'' if oldest is None else ', the oldest left is from ' + local_time(oldest)}: "
                      f"older ones are rolled up: ask with --every 1m or --every 1h)", file=sys.stderr)
    finally:
        conn.close()
    what = f"{device}{' ' + metric if metric else ''}"
    if fmt == "table" and not count:
        print(f"(no readings of {what}{' since ' + iso_utc(since_ms) if since_ms is not None else ''})",
              file=sys.stderr)
    if default and cut is not None:
        day_before = (datetime.fromtimestamp(cut / 1000) - timedelta(days=1)).strftime("%Y-%m-%dT00:00")
        print(f"(the newest {count} readings of {what}, from {local_time(cut)} on; older ones are left out: "
              f"ask for them with --since 7d, --since {day_before}, --limit {10 * DEFAULT_LIMIT} or --all)",
              file=sys.stderr)
    return 0


def _rollups(config: GatewayConfig, device: str, metric: str | None, since_ms: int | None, every: str, fmt: str,
             limit: int | None, out: IO[str]) -> int:
    conn = open_readonly(config.store.path)
    try:
        metrics = sorted(set(device_metrics(conn, device)) | set(rollups_metrics(conn, device)))
        if not metrics and config.device(device) is None:
            ids = ", ".join(d.id for d in config.devices) or "none"
            raise HistoryError(f"unknown device {device!r}: not in the config (devices: {ids}) and no readings "
                               f"in {config.store.path}")
        if metric:
            if metric not in metrics:
                raise HistoryError(f"device {device!r} has no readings of metric {metric!r} "
                                   f"(metrics: {', '.join(metrics) or 'none yet'})")
            metrics = [metric]
        rows: Iterable[Rollup] = query_rollups(conn, device, metrics, since_ms, every)
        if limit is not None:
            rows = deque(rows, maxlen=limit)
        count = write_rollups(rows, fmt, out)
    finally:
        conn.close()
    if fmt == "table" and not count:
        print(f"(no readings of {device}{' ' + metric if metric else ''} to roll up"
              f"{' since ' + iso_utc(since_ms) if since_ms is not None else ''})", file=sys.stderr)
    return 0


def rollups_metrics(conn: sqlite3.Connection, device: str) -> list[str]:
    """The metrics of ``device`` in the hourly roll-ups (raw rows of some may be gone)."""
    if not has_rollups(conn):
        return []
    found: list[str] = []
    while (row := conn.execute("SELECT metric FROM rollups_1h WHERE device = ? AND metric > ? ORDER BY metric "
                               "LIMIT 1", (device, found[-1] if found else "")).fetchone()) is not None:
        found.append(row[0])
    return found


# -- command line (wired into gateway.cli) ----------------------------------------------------------

def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("readings", help="print stored readings of one device (read-only, works while the gateway runs)")
    p.add_argument("--config", required=True, help="the TOML config file (for store.path)")
    p.add_argument("--device", required=True)
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--since", help="30m, 1h, 2d, 1w ago, or an ISO time (local unless it has an offset or Z); "
                                   "every reading since then")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--limit", type=_positive, help=f"only the newest N readings (default without --since: "
                                                      f"{DEFAULT_LIMIT})")
    many.add_argument("--all", action="store_true", help="every reading stored (with --since: every one since then)")
    p.add_argument("--every", choices=tuple(SIZES), help="per-minute or per-hour roll-ups (count, min, max, mean, "
                                                        "last) instead of raw readings; raw ones are kept "
                                                        "store.keep_raw_days, roll-ups store.keep_rollups_days")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_readings)

    p = sub.add_parser("status", help="each device's availability, LED, last reading and link counters")
    p.add_argument("--config", required=True)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker (default %(default)s)")
    p.set_defaults(func=cmd_status)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of readings, 1 or more (every one: --all), "
                                         f"not {text!r}")
    return value


def cmd_readings(args: argparse.Namespace) -> int:
    return run_with_config(args, lambda config: readings(config, args.device, args.metric, args.since, args.format,
                                                         args.limit, args.all, every=args.every))
