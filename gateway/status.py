"""``pico-gateway status``: each device as the broker and the database show it now.

It asks the broker, briefly, for the retained ``status``, ``state/led`` and
``diagnostics`` of each device, and asks a gateway that is online for fresh
diagnostics (each shown with its age); when the broker cannot be reached it says
so and shows what the database knows (read-only, gateway/stored.py).

    pico-gateway status --config gateway.toml
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from gateway import payloads
from gateway.config import GatewayConfig, MqttConfig, SecretError
from gateway.stored import HistoryError, ago, format_value, latest, local_time, open_readonly, run_with_config
from gateway.topics import Topics

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


def size_words(n: float) -> str:
    """``1536`` -> ``"1.5 kB"``: decimal units, as disks are sold."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def days_words(days: float) -> str:
    """How long ``days`` is, for "in about ...": ``"3 hours"``, ``"55 days"``, ``"2.5 years"``."""
    if days >= 365:
        return f"{days / 365:.1f} years"
    if days >= 2:
        return f"{days:.0f} days"
    return span_words(days * 86400)


def span_words(seconds: float) -> str:
    """``"42 s"``, ``"12 minutes"``, ``"5 hours"``, ``"3 days"``."""
    for unit, scale in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.0f} {unit}"
    return f"{seconds:.0f} s"


def disk_line(raw: bytes | None) -> str:
    """The database's size, writes and room from the retained bridge diagnostics
    (gateway/disk_budget.py), in words; "" when there is nothing to show. E.g.
    ``database 52.4 MB (56.6 MB on disk with its WAL), 20.4 GB free; the gateway writes
    1.2 GB a day and the database grows 8.6 MB a day: store.max_size_mb (524.3 MB) is
    reached in about 55 days, then the oldest raw readings go (measured over the
    last 60 minutes)``."""
    disk = payloads.decode_disk_budget(raw)
    if disk is None or not isinstance(disk.get("db_bytes"), int):
        return ""
    number = lambda key: disk.get(key) if isinstance(disk.get(key), (int, float)) else None  # noqa: E731
    text = f"database {size_words(disk['db_bytes'])}"
    files, free = number("file_bytes"), number("free_bytes")
    if files is not None:
        text += f" ({size_words(files)} on disk with its WAL)"
    if free is not None:
        text += f", {size_words(free)} free"
    written, growth, days = number("written_per_day"), number("growth_per_day"), number("days_until_full")
    if written is None and growth is None:
        return text + "; write and growth rates not measured yet"
    rates = []
    if written is not None:
        rates.append(f"the gateway writes {size_words(written)} a day")
    if growth is not None:
        rates.append(f"the database grows {size_words(growth)} a day" if growth > 0 else "the database is not growing")
    text += "; " + " and ".join(rates)
    max_bytes = number("max_bytes")
    if days is not None and disk.get("full_at") == "max_size_mb" and max_bytes is not None:
        text += (f": store.max_size_mb ({size_words(max_bytes)}) is reached in about {days_words(days)}, "
                 "then the oldest raw readings go")
    elif days is not None and disk.get("full_at") == "disk":
        text += f": the disk is full in about {days_words(days)}"
    window = number("window_s")
    if window is not None:
        text += f" (measured over the last {span_words(window)})"
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
        disk = disk_line(view.messages.get(health_topic))
        if disk:
            out.write(f"disk: {disk}\n")
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
                    shown = "  ".join(f"{m}={format_value(v)}" for m, (v, _) in sorted(values.items()))
                    out.write(f"  values   {shown}\n")
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



def cmd_status(args: argparse.Namespace) -> int:
    return run_with_config(args, lambda config: status(config, args.timeout))
