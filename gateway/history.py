"""``pico-gateway readings`` and ``pico-gateway status``: what the gateway stored and sees.

Both read the SQLite database at the config's ``store.path`` read-only (an
``file:...?mode=ro`` URI), so they work next to a running gateway and never
create or change the database. ``status`` also asks the broker, briefly, for
the retained ``status``, ``state/led`` and ``diagnostics`` of each device, and
asks a gateway that is online for fresh diagnostics (each shown with its age);
when the broker cannot be reached it says so and shows what the database knows.

    pico-gateway readings --config gateway.toml --device greenhouse          # the newest 1000
    pico-gateway readings --config gateway.toml --device greenhouse --metric temp --since 2h
    pico-gateway readings --config gateway.toml --device greenhouse --since 2025-11-25T08:00 --format csv
    pico-gateway status --config gateway.toml
"""

from __future__ import annotations

import argparse
import csv
import functools
import heapq
import itertools
import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from gateway import payloads
from gateway.config import GatewayConfig, MqttConfig, SecretError, load_config_or_report
from gateway.topics import Topics

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
DEFAULT_LIMIT = 1000  # readings shown when neither --since, --limit nor --all says how many
UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class HistoryError(Exception):
    """A problem the user can fix; the message says which and how."""


# -- time --------------------------------------------------------------------------------

def parse_since(text: str, now: float | None = None) -> int:
    """``30m``, ``1h``, ``2d``, ``1w`` ago, or an ISO 8601 time (local time when it has no
    offset), as Unix milliseconds."""
    now = time.time() if now is None else now
    match = DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * UNIT_SECONDS[match.group(2).lower()]
        return int((now - seconds) * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(f"--since {text!r}: expected a duration like 30m, 1h, 2d or 1w, "
                           "or a time like 2025-11-25T08:00 (local) or 2025-11-25T07:00Z") from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: the local time zone
    return int(when.timestamp() * 1000)


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
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(payloads.EXPORT_COLUMNS)
        for count, (ts, _, metric, value, seq) in enumerate(rows, 1):
            writer.writerow([_iso_utc(ts), ts, metric, value, "" if seq is None else seq])
    else:
        rows = iter(rows)
        sample = [_cells(r) for r in itertools.islice(rows, TABLE_SAMPLE)]
        widths = [max(len(row[i]) for row in [TABLE_HEADER, *sample]) for i in range(4)]
        for row in itertools.chain([TABLE_HEADER], sample, map(_cells, rows)):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
            out.write("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n")
            count += 1
        count -= 1  # (the header)
    return count


def readings(config: GatewayConfig, device: str, metric: str | None = None, since: str | None = None,
             fmt: str = "table", limit: int | None = None, everything: bool = False,
             out: IO[str] | None = None) -> int:
    """Print readings; with neither ``since`` nor ``limit`` nor ``everything``, the newest
    DEFAULT_LIMIT, saying on stderr how to get more when there are more."""
    out = out or sys.stdout
    since_ms = parse_since(since) if since else None
    default = since is None and limit is None and not everything
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


# -- status: the broker's retained messages ------------------------------------------------------

REFRESH_WAIT = 2.0  # seconds status waits for the gateway's fresh diagnostics (its spacing is 1 s)


@dataclass
class Refresh:
    """Ask for fresh messages: publish on ``request`` when ``gate`` says ``online`` (a gateway
    that is offline answers nothing), then wait for a live message on ``answer``."""
    gate: str
    request: str
    answer: str


@dataclass
class BrokerView:
    reachable: bool
    error: str = ""
    messages: dict[str, bytes] = field(default_factory=dict)  # topic -> the latest payload
    refreshed: bool | None = None  # None: not asked; False: asked, no answer in time


def fetch_retained(mqtt: MqttConfig, topics: list[str], timeout: float = 3.0, quiet: float = 0.3,
                   refresh: Refresh | None = None) -> BrokerView:
    """The retained messages on ``topics`` (exact topics), or why the broker could not be asked.

    Retained messages come right after the subscription is acknowledged; we stop
    ``quiet`` seconds after the last one (or once every topic answered). With
    ``refresh``, we then ask for fresh ones and wait up to REFRESH_WAIT seconds
    more (within ``timeout``) for the answer; messages published meanwhile replace
    the retained ones."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.mqtt import apply_security

    got: dict[str, bytes] = {}
    lock = threading.Lock()
    subscribed = threading.Event()
    connected = threading.Event()
    refused: list[str] = []
    last = [time.monotonic()]
    live: set[str] = set()  # topics with a message published since we subscribed

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"pico-gateway-status-{os.getpid()}-{int(time.time() * 1000) % 100000}",
                         protocol=paho.MQTTv5)

    def on_connect(c, userdata, flags, reason, props):
        if reason.is_failure:
            refused.append(str(reason))
            connected.set()
            return
        connected.set()
        c.subscribe([(t, 0) for t in topics])

    def on_subscribe(c, userdata, mid, reasons, props):
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(c, userdata, msg):
        with lock:
            got[msg.topic] = msg.payload
            last[0] = time.monotonic()
            if not msg.retain:  # (a message published while we listen comes without the retain flag)
                live.add(msg.topic)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        apply_security(client, mqtt)  # the same login and TLS as the gateway's
        client.connect(mqtt.host, mqtt.port, keepalive=10)
    except SecretError as exc:
        return BrokerView(False, str(exc))
    except (OSError, ValueError) as exc:
        return BrokerView(False, f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc))
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        if not connected.wait(timeout):
            return BrokerView(False, f"no answer within {timeout:g} s")
        if refused:
            return BrokerView(False, f"the broker refused the connection: {refused[0]}")
        if not subscribed.wait(max(0.0, deadline - time.monotonic())):
            return BrokerView(False, f"no subscription acknowledgement within {timeout:g} s")
        while time.monotonic() < deadline:
            with lock:
                if len(got) >= len(topics) or time.monotonic() - last[0] >= quiet:
                    break
            time.sleep(0.02)
        refreshed = None
        if refresh is not None and got.get(refresh.gate, b"").strip() == b"online":
            with lock:
                live.discard(refresh.answer)
            client.publish(refresh.request, b"", qos=1)
            until = min(deadline, time.monotonic() + REFRESH_WAIT)
            while time.monotonic() < until and refresh.answer not in live:
                time.sleep(0.02)
            refreshed = refresh.answer in live
        with lock:
            return BrokerView(True, messages=dict(got), refreshed=refreshed)
    finally:
        client.disconnect()  # first: it wakes the network thread, which loop_stop would wait up to 1 s for
        client.loop_stop()


def health_line(raw: bytes | None) -> str:
    """The gateway's own health from its retained bridge diagnostics (gateway/diagnostics.py):
    ``healthy``, ``unhealthy: the outbox loop has not turned for 42.0 s (bound 30.0 s)``,
    ``stopped``, each with when it was published; "" when there is nothing to show."""
    health = payloads.decode_health(raw)
    if health is None:
        return ""
    text = health["state"]
    if health.get("problem"):
        text += f": {health['problem']}"
    if isinstance(health.get("at_ms"), (int, float)):
        text += f" (as of {local_time(int(health['at_ms']))})"
    return text


def status(config: GatewayConfig, timeout: float = 3.0, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    base = config.mqtt.base_topic
    bridge_topic = f"{base}/bridge/{config.gateway_id}/status"
    health_topic = f"{base}/bridge/{config.gateway_id}/diagnostics"
    topics = [bridge_topic, health_topic]
    for d in config.devices:
        topics += [f"{base}/{d.id}/status", f"{base}/{d.id}/state/led", f"{base}/{d.id}/diagnostics"]
    # The retained counters are up to diagnostics_interval old: ask the gateway for fresh ones.
    refresh = Refresh(bridge_topic, Topics(base).bridge_refresh(config.gateway_id), health_topic)
    view = fetch_retained(config.mqtt, topics, timeout, refresh=refresh)

    conn: sqlite3.Connection | None = None
    db_note = ""
    try:
        conn = open_readonly(config.store.path)
    except HistoryError as exc:
        db_note = str(exc)

    broker = f"{config.mqtt.host}:{config.mqtt.port}"
    if view.reachable:
        gw = view.messages.get(bridge_topic, b"").decode(errors="replace") or "unknown (nothing retained)"
        out.write(f"gateway {config.gateway_id}: {gw} (broker {broker})\n")
        health = health_line(view.messages.get(health_topic))
        if health:
            out.write(f"health: {health}\n")
        if view.refreshed is False:
            out.write(f"diagnostics: the gateway did not answer a refresh request within {REFRESH_WAIT:g} s; "
                      "the link counters below are the retained ones, as old as each says\n")
    else:
        out.write(f"gateway {config.gateway_id}: broker {broker} not reachable ({view.error}); "
                  "showing the database only\n")
    if db_note:
        out.write(f"database: {db_note}\n")
    else:
        out.write(f"database: {config.store.path}\n")
    if not config.devices:
        out.write("no devices in the config\n")

    try:
        for d in config.devices:
            out.write(f"\n{d.id}  ({d.transport}, {d.protocol})\n")
            if view.reachable:
                avail = view.messages.get(f"{base}/{d.id}/status", b"").decode(errors="replace") or "unknown"
                led = view.messages.get(f"{base}/{d.id}/state/led", b"").decode(errors="replace") or "unknown"
                out.write(f"  status   {avail}\n  led      {led}\n")
            if conn is not None:
                values = latest(conn, d.id)
                if values:
                    newest = max(ts for _, ts in values.values())
                    out.write(f"  last     {local_time(newest)} ({ago(newest)})\n")
                    out.write("  values   " + "  ".join(f"{m}={format_value(v)}" for m, (v, _) in sorted(values.items()))
                              + "\n")
                else:
                    out.write("  last     no readings stored\n")
            raw = view.messages.get(f"{base}/{d.id}/diagnostics") if view.reachable else None
            if raw:
                diag = payloads.decode_device_diagnostics(raw)
                if diag is not None:
                    parts = [f"{k}={diag[k]}" for k in payloads.DIAGNOSTIC_KEYS if k in diag and k != "last_seen_ms"]
                    if isinstance(diag.get("last_seen_ms"), (int, float)):
                        parts.append(f"last_seen={local_time(int(diag['last_seen_ms']))}")
                    at = diag.get("at_ms")
                    when = f"as of {local_time(int(at))}, {ago(int(at))}" if isinstance(at, (int, float)) else \
                        "age unknown"
                    out.write("  link     " + " ".join(parts) + f" ({when})\n")
    finally:
        if conn is not None:
            conn.close()
    return 0


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
        raise argparse.ArgumentTypeError(f"expected a whole number of readings, 1 or more (every one: --all), not {text!r}")
    return value


def _run(args: argparse.Namespace, action: Any) -> int:
    config = load_config_or_report(args.config)
    if config is None:
        return 2
    try:
        return action(config)
    except HistoryError as exc:
        print(f"pico-gateway: {exc}", file=sys.stderr)
        return 1


def cmd_readings(args: argparse.Namespace) -> int:
    return _run(args, lambda config: readings(config, args.device, args.metric, args.since, args.format, args.limit,
                                              args.all))


def cmd_status(args: argparse.Namespace) -> int:
    return _run(args, lambda config: status(config, args.timeout))
