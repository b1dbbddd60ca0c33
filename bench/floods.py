"""Floods: what anyone who can publish to the broker can send the gateway,
and what it costs the gateway meanwhile.

Four floods, each against a fresh gateway with two uart Picos (``d00``, the
flooded one, and ``d01``, which a second client commands throughout) and one
Wi-Fi Pico (``w00``, which never publishes itself):

* ``owner``: 3,000 distinct claims ``intruder-1`` ... on ``pico/d00/owner``;
* ``ha_status``: ``online`` x 5,000 on ``homeassistant/status``;
* ``cmd_led``: ``on``/``off`` on ``pico/d00/cmd/led`` at 10,000/s for 30 s;
* ``metric_names``: ``1`` on ``pico/w00/sensor/<name>``, every 25th name 60,000
  characters long, the others short, distinct and invalid (``Bad-Name.<n>``).

The flood's publisher is a paho client in its own process doing its own I/O (no
network thread): as fast as it goes, or paced to a rate. Its rate is taken up
to the broker's PUBACK of a QoS 1 message sent after the flood's last QoS 0
one, i.e. as the broker received it. Throughout, ``bench/commands.py``'s
command client times ``cmd/led`` round trips to ``d01``, one at a time. The
flood counts as over for the gateway ("caught up") once two of those answers
have arrived after that PUBACK: the broker hands the gateway its messages in
order, so one of them was sent after the flood's last message and answered
after it (within ``CATCH_UP``, or the commands fail). Then the gateway is left alone for a few
seconds (``settle``) to see what memory and threads it gives back.

A sampler reads ``/proc/<pid>/status`` every 20 ms: RSS and threads of the
gateway's main process, and of it with every process it started (a child for
SQLite counts as the gateway). Idle = the same figures over 1 s before the
flood, once both uart workers have run a command and the start-up timers have
ended. Targets: RSS < 60 MB (main and children together), threads <= idle + 2,
every command to ``d01`` answered within ``commands.TIMEOUT``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import commands
from common import (
    Env,
    GatewayProcess,
    Subscriber,
    descendants,
    percentile,
    rss_threads,
    wait_for,
    wait_online,
    write_config,
)
from picos import Picos

GATEWAY_ID = "bench"
TARGET, PROBE, WIFI = "d00", "d01", "w00"  # the flooded Pico, the commanded one, the Wi-Fi Pico
INTERVAL = 0.02  # seconds between /proc samples
RESCAN = 0.5  # seconds between looks for the gateway's child processes
IDLE = 1.0  # seconds sampled at idle
STARTUP_TIMERS = 3.5  # seconds after connecting before the start-up timers (the stale-config scan) are gone
RSS_LIMIT_MB = 60.0
THREADS_OVER_IDLE = 2
CATCH_UP = 120.0  # seconds after the flood the gateway may take to handle it, before it counts as failed
SETTLE = 6.0  # seconds the gateway is left alone after a flood (discovery's republish timers wait up to 5 s)
LONG_NAME = 60_000  # characters
LONG_EVERY = 25  # every 25th metric name is a long one
END_TOPIC = "bench/flood/end"


@dataclass(frozen=True)
class Flood:
    name: str
    what: str  # for the table
    count: int
    rate: float | None = None  # messages/s; None: as fast as the publisher goes


NAMES = ("owner", "ha_status", "cmd_led", "metric_names")


def floods(quick: bool, names: Iterable[str] = NAMES) -> list[Flood]:
    """The floods (those in ``names``); ``quick`` shortens the command flood (30 -> 5 s)
    and the metric one."""
    cmd_seconds = 5 if quick else 30
    count = 3_000 if quick else 10_000
    every = [
        Flood("owner", f"3,000 distinct claims on pico/{TARGET}/owner", 3_000),
        Flood("ha_status", "homeassistant/status = online x 5,000", 5_000),
        Flood("cmd_led", f"cmd/led to {TARGET} at 10,000/s for {cmd_seconds} s", 10_000 * cmd_seconds, 10_000.0),
        Flood("metric_names", f"{count:,} distinct metric names on pico/{WIFI}/sensor/+, "
                              f"every {LONG_EVERY}th {LONG_NAME:,} chars", count),
    ]
    return [f for f in every if f.name in set(names)]


def message(kind: str, i: int) -> tuple[str, bytes]:
    """The ``i``-th message of a flood: (topic, payload)."""
    if kind == "owner":
        return f"pico/{TARGET}/owner", b"intruder-%d" % (i + 1)
    if kind == "ha_status":
        return "homeassistant/status", b"online"
    if kind == "cmd_led":
        return f"pico/{TARGET}/cmd/led", b"on" if i % 2 == 0 else b"off"
    if kind == "metric_names":
        if i % LONG_EVERY == 0:
            name = f"{i:08d}".ljust(LONG_NAME, "x")
        else:
            name = f"Bad-Name.{i}"
        return f"pico/{WIFI}/sensor/{name}", b"1"
    raise ValueError(kind)


# -- sampling the gateway ----------------------------------------------------------------
@dataclass
class Sample:
    t: float  # monotonic
    rss_mb: float  # the main process
    threads: int
    total_rss_mb: float  # with its child processes
    total_threads: int
    children: int


@dataclass
class Sampler:
    """The gateway's RSS and threads every INTERVAL, in a thread of the bench's process."""

    pid: int
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        children: list[int] = []
        rescanned = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - rescanned >= RESCAN:
                children, rescanned = descendants(self.pid), now
            try:
                rss, threads = rss_threads(self.pid)
            except OSError:
                return  # the gateway is gone: gw.check() says why
            total_rss, total_threads = rss, threads
            for child in children:
                try:
                    c_rss, c_threads = rss_threads(child)
                except OSError:
                    continue  # ended since the last scan
                total_rss += c_rss
                total_threads += c_threads
            self.samples.append(Sample(now, rss, threads, total_rss, total_threads, len(children)))
            self._stop.wait(INTERVAL)

    def between(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in list(self.samples) if t0 <= s.t <= t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _peaks(samples: list[Sample], prefix: str) -> dict[str, float]:
    if not samples:
        return {f"{prefix}_{k}": float("nan") for k in ("rss_mb", "total_rss_mb", "threads", "total_threads")}
    return {f"{prefix}_rss_mb": max(s.rss_mb for s in samples),
            f"{prefix}_total_rss_mb": max(s.total_rss_mb for s in samples),
            f"{prefix}_threads": max(s.threads for s in samples),
            f"{prefix}_total_threads": max(s.total_threads for s in samples)}


# -- one flood ------------------------------------------------------------------------------
def run(env: Env, flood: Flood, settle: float = SETTLE) -> dict:
    work = env.tempdir(f"flood-{flood.name}")
    picos = Picos(2)
    db = work / "readings.db"
    ctx = mp.get_context("spawn")
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port)
        config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port), db, picos.peers,
                              env.qos)
        with open(config, "a") as f:
            f.write(f'[[devices]]\nid = "{WIFI}"\ntransport = "wifi"\n')
        gw = GatewayProcess(env.source, config)
        sampler = Sampler(gw.pid)
        flooder = probe = None
        stop_probe = ctx.Event()
        try:
            online = wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
            if flood.name == "ha_status":  # what the flood makes the gateway publish
                sub.client.subscribe("homeassistant/device/+/config", 0)
            # Each uart device's command worker starts with its first command: start them now,
            # so that they count in the idle threads and not as the flood's.
            for device in picos.devices:
                sub.client.publish(f"pico/{device}/cmd/led", "off")
                wait_for(partial(_answers, sub, device, online), 10, f"{device}'s first answer", gw.check)
            wait_for(lambda: time.monotonic() >= online + STARTUP_TIMERS, STARTUP_TIMERS + 1, "the start-up timers")
            idle0 = time.monotonic()
            time.sleep(IDLE)
            idle = _peaks(sampler.between(idle0, time.monotonic()), "idle")
            log0 = _log_size(gw)

            ready, go = ctx.Event(), ctx.Event()
            flood_conn, flood_child = ctx.Pipe()
            flooder = ctx.Process(target=_publish_flood, name=f"flood-{flood.name}",
                                  args=(broker.host, broker.port, flood.name, flood.count, flood.rate, ready, go,
                                        flood_child))
            flooder.start()
            if not ready.wait(30):
                raise RuntimeError("the flood's publisher did not connect")
            # Started last, so that few of its commands come before the flood's first message.
            probe_conn, probe_child = ctx.Pipe()
            probe_start = time.monotonic()
            probe = ctx.Process(target=commands.command_client, name="flood-probe",
                                args=(broker.host, broker.port, PROBE, 10_000_000, probe_child, stop_probe))
            probe.start()
            wait_for(lambda: _answers(sub, PROBE, probe_start), 30, "the command client's first answer", gw.check)
            cpu0, t0 = gw.cpu_seconds(), time.monotonic()
            go.set()
            if not flood_conn.poll(flood.count / (flood.rate or 1000) * 3 + 120):
                raise RuntimeError("the flood's publisher did not finish")
            published = flood_conn.recv()
            acked = time.monotonic()  # the broker had every message of the flood (within a poll)
            try:
                wait_for(lambda: _answers(sub, PROBE, acked) >= 2, CATCH_UP, "the gateway to catch up", gw.check)
                caught_up = time.monotonic()
            except TimeoutError:
                caught_up = float("nan")
            t1 = time.monotonic()
            cpu1 = gw.cpu_seconds()
            stop_probe.set()
            timings = probe_conn.recv() if probe_conn.poll(commands.TIMEOUT + 30) else None
            probe.join(10)
            time.sleep(settle)
            gw.check()
            t2 = time.monotonic()
            final = sampler.samples[-1:]
            during = sampler.between(t0, t2)
            log1 = _log_size(gw)
            log_sample = _log_sample(gw, log0[1])
            effects = _effects(flood.name, sub, db, t0)
            hwm = gw.memory_mb().get("VmHWM", float("nan"))
        finally:
            stop_probe.set()
            for process in (flooder, probe):
                if process is not None and process.is_alive():
                    process.terminate()
            sampler.stop()
            picos.close()
            gw.stop()
            sub.close()
    shutil.rmtree(work, ignore_errors=True)
    if timings is None:
        raise RuntimeError("the command client gave no answer")
    ok_ms = [r for r, _ in timings["ok"]]
    peak = _peaks(during, "peak")
    last = final[0] if final else None
    result = {
        "flood": flood.name, "messages": published["count"], "bytes": published["bytes"],
        "target_per_s": flood.rate or float("nan"),
        "achieved_per_s": published["count"] / published["seconds"], "publish_s": published["seconds"],
        "caught_up_s": caught_up - t0,  # from the first message until the gateway had handled the last
        "gateway_cores": (cpu1 - cpu0) / (t1 - t0),
        **idle, **peak, "vm_hwm_mb": hwm,
        "final_rss_mb": last.rss_mb if last else float("nan"),
        "final_total_rss_mb": last.total_rss_mb if last else float("nan"),
        "final_threads": last.threads if last else float("nan"),
        "final_total_threads": last.total_threads if last else float("nan"),
        "children_max": max((s.children for s in during), default=0),
        "probe_commands": len(ok_ms) + timings["failed"], "probe_failed": timings["failed"],
        "probe_p50_ms": percentile(ok_ms, 50), "probe_p99_ms": percentile(ok_ms, 99),
        "probe_max_ms": max(ok_ms, default=float("nan")),
        "log_lines": log1[0] - log0[0], "log_kb": (log1[1] - log0[1]) / 1024, "log_first": log_sample,
        **effects,
    }
    result["rss_ok"] = max(result["peak_total_rss_mb"], result["peak_rss_mb"]) < RSS_LIMIT_MB
    result["threads_ok"] = result["peak_total_threads"] <= result["idle_total_threads"] + THREADS_OVER_IDLE
    result["commands_ok"] = bool(ok_ms) and not timings["failed"] and not math.isnan(caught_up)
    return result


def _answers(sub: Subscriber, device: str, after: float) -> int:
    topic = f"pico/{device}/result/led"
    return sum(1 for t, top, _ in list(sub.events) if t >= after and top == topic)


def _log_size(gw: GatewayProcess) -> tuple[int, int]:
    data = gw.log_path.read_bytes()
    return data.count(b"\n"), len(data)


def _log_sample(gw: GatewayProcess, since: int, lines: int = 5) -> list[str]:
    """The first ``lines`` log lines written after byte ``since``, shortened: what the flood made it say."""
    with open(gw.log_path, "rb") as f:
        f.seek(since)
        return [f.readline().decode("utf-8", "replace").rstrip()[:300] for _ in range(lines) if f.peek(1)]


def _effects(kind: str, sub: Subscriber, db: Path, t0: float) -> dict[str, float]:
    """What the flood made the gateway do that a subscriber or the database sees."""
    events = [(top, pay) for t, top, pay in list(sub.events) if t >= t0]
    if kind == "owner":
        conflicts = [pay for top, pay in events if top == f"pico/bridge/{GATEWAY_ID}/conflicts"]
        return {"conflicts_messages": len(conflicts),
                "conflicts_last_kb": len(conflicts[-1]) / 1024 if conflicts else 0}
    if kind == "ha_status":
        return {"discovery_messages": sum(1 for top, _ in events if top.startswith("homeassistant/device/"))}
    if kind == "cmd_led":
        return {"target_answers": sum(1 for top, _ in events if top == f"pico/{TARGET}/result/led")}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows, names, longest = conn.execute(
            "SELECT count(*), count(DISTINCT metric), coalesce(max(length(metric)), 0) FROM readings "
            "WHERE device = ?", [WIFI]).fetchone()
    return {"rows_stored": rows, "names_stored": names, "longest_name_stored": longest}


def _publish_flood(host: str, port: int, kind: str, count: int, rate: float | None, ready, go, conn) -> None:
    """Child process: once ``go`` is set, ``count`` QoS 0 messages of ``kind``, paced to
    ``rate``; then a QoS 1 one, whose PUBACK says the broker has them all."""
    import select

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(host, port)
    sock = client.socket()
    assert sock is not None  # connected
    # This thread does all the I/O (as the paho ceiling's single-threaded publisher): each
    # publish writes at once, and no network thread shares the GIL. Not client.loop(): it
    # would create the wake-up socketpair that publish() writes to.
    deadline = time.monotonic() + 10
    while not connected.is_set() and time.monotonic() < deadline:
        select.select([sock], [], [], 0.1)
        client.loop_read()
    ready.set()
    go.wait(120)
    sent = size = 0
    start = time.perf_counter()
    while sent < count:
        due = count if rate is None else min(count, int((time.perf_counter() - start) * rate) + 1)
        if sent >= due:
            time.sleep(0.0005)
        for i in range(sent, min(due, sent + 200)):  # a turn of the loop below every 200 at most
            topic, payload = message(kind, i)
            client.publish(topic, payload, qos=0)
            size += len(topic) + len(payload)
            sent += 1
        client.loop_read()
        client.loop_write()
        client.loop_misc()
    info = client.publish(END_TOPIC, b"", qos=1)
    deadline = time.monotonic() + 120
    while not info.is_published() and time.monotonic() < deadline:
        select.select([sock], [], [], 0.01)
        client.loop_read()
        client.loop_write()
    seconds = time.perf_counter() - start
    client.disconnect()
    conn.send({"count": sent, "bytes": size, "seconds": seconds, "acked": info.is_published()})
