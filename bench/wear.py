"""Wear: what the gateway writes to its disk per stored reading.

N bench Picos (picos.py) each send one reading a second, spread evenly over the
second, as real sensors would; the gateway (``python -m gateway run``, the
default QoS 1) stores and publishes them. What it writes is the kernel's
``write_bytes`` (/proc/<pid>/io: bytes of file pages it dirtied, what the disk
is eventually asked to write) of the gateway and of its database writer process
(gateway/store_writer.py: the WAL, the checkpoints into the database, the -shm
index). The count starts once readings flow and ends after the gateway has
stopped: the writer's last checkpoint is included (the gateway has waited for the
writer then, which adds its count to the gateway's, read while the gateway is a
zombie, before it is reaped).

``write_bytes`` of a file on tmpfs is 0: the database goes in a directory on a
real disk (``--wear-dir``, /var/tmp by default), and the result names its
filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

from common import Env, GatewayProcess, Subscriber, _children, wait_for, wait_online, write_config
from picos import Picos

GATEWAY_ID = "wear"
SECONDS_PER_YEAR = 365 * 86400
RATE = 1.0  # readings per second per device
SETTINGS = {  # name -> [store] keys
    "default": {},
    "batched": {"commit_interval": 1.0},  # (what the interval saves alone, a committed reading still synced)
    "low-wear": {"commit_interval": 1.0, "synchronous": "normal"},
    "lowest-wear": {"commit_interval": 10.0, "synchronous": "normal"},  # with acks a power cut still loses nothing
}
WARMUP = 3.0  # seconds of readings before the count starts: start-up's writes (the schema) are not ingest's


def io_counts(pid: int) -> dict[str, int]:
    """write_bytes and cancelled_write_bytes of a process (its threads and the children it has
    waited for), from /proc/<pid>/io."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("write_bytes", "cancelled_write_bytes"):
            out[key] = int(value)
    return out


def gateway_io(pid: int) -> dict[str, int]:
    """The gateway's counts and its live children's (the database writer) added up."""
    total = io_counts(pid)
    for child in _children(pid):
        try:
            for key, value in io_counts(child).items():
                total[key] += value
        except FileNotFoundError:
            pass
    return total


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fstype
    return kind


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def run(env: Env, devices: int, setting: str, duration: float, directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    fstype = filesystem(directory)
    if fstype in ("tmpfs", "ramfs"):
        raise RuntimeError(f"{directory} is on {fstype}, where write_bytes is always 0: choose a directory on a disk "
                           "(--wear-dir)")
    work = Path(tempfile.mkdtemp(prefix=f"wear-{devices}-", dir=directory))
    db = work / "readings.db"
    picos = Picos(devices)
    try:
        with env.broker(work) as broker:
            sub = Subscriber(broker.host, broker.port, counter=picos.received)
            config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port), db, picos.peers,
                                  env.qos)
            keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in SETTINGS[setting].items())
            config.write_text(config.read_text().replace("[store]\n", "[store]\n" + keys, 1))
            gw = GatewayProcess(env.source, config)
            try:
                wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
                picos.feed(window=1 << 40, rate=RATE, chunk=1)
                time.sleep(WARMUP)
                commits0 = _commits(sub, gw)
                io0 = gateway_io(gw.pid)
                t0, t0_ms = time.monotonic(), time.time_ns() // 1_000_000
                while time.monotonic() < t0 + duration:
                    gw.check()
                    time.sleep(0.2)
                commits1 = _commits(sub, gw)
                picos.stop_feed()
                elapsed = time.monotonic() - t0
                os.kill(gw.pid, signal.SIGTERM)
                wait_for(lambda: state(gw.pid) == "Z", 30, "the gateway's exit")
                io1 = io_counts(gw.pid)  # (a zombie: its own counts and its reaped writer's)
            finally:
                gw.stop()
                sub.close()
    finally:
        picos.close()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        readings = conn.execute("SELECT count(*) FROM readings WHERE ts >= ?", (t0_ms,)).fetchone()[0]
    written = io1["write_bytes"] - io0["write_bytes"]
    cancelled = io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
    per_reading = written / readings if readings else float("nan")
    result = {
        "devices": devices,
        "setting": setting,
        "store": SETTINGS[setting],
        "directory": str(directory),
        "filesystem": fstype,
        "seconds": round(elapsed, 1),
        "readings": readings,
        "readings_per_s": readings / elapsed,
        "write_bytes": written,
        "cancelled_write_bytes": cancelled,
        "bytes_per_reading": per_reading,
        "commits_per_s": (commits1 - commits0) / elapsed if commits0 is not None and commits1 is not None
        else float("nan"),
        # at RATE readings a second per device, all year
        "gb_per_year_per_device": per_reading * RATE * SECONDS_PER_YEAR / 1e9,
        "gb_per_year": per_reading * RATE * devices * SECONDS_PER_YEAR / 1e9,
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def _commits(sub: Subscriber, gw: GatewayProcess) -> int | None:
    """The gateway's commit count now (outbox/commits), from fresh bridge diagnostics."""
    topic = f"pico/bridge/{GATEWAY_ID}/diagnostics"
    asked = time.monotonic()
    sub.client.publish(f"{topic}/refresh", b"", qos=1)
    try:
        wait_for(lambda: any(t >= asked and top == topic for t, top, _ in list(sub.events)), 5, "fresh diagnostics",
                 gw.check)
    except TimeoutError:
        return None
    payload = next(pay for t, top, pay in reversed(list(sub.events)) if top == topic)
    return json.loads(payload)["outbox"].get("commits")


def measure(env: Env, args, res: dict, repeated) -> None:
    for setting in args.wear_settings:
        for devices in args.wear_devices:
            res[f"wear_{setting}_{devices}"] = repeated(
                1, f"wear {setting} {devices} device(s)",
                lambda devices=devices, setting=setting: run(env, devices, setting, args.wear_duration,
                                                             Path(args.wear_dir)),
                "{bytes_per_reading:,.0f} bytes/reading, {commits_per_s:.1f} commits/s, {gb_per_year:,.1f} GB/year "
                "({readings} readings on {filesystem})")


def fill(t, res: dict, args, n) -> None:
    keys = [k for k in res if k.startswith("wear_")]
    if not keys:
        return
    some = res[keys[0]]["runs"][0]
    t.section(f"wear: bytes written per stored reading at {RATE:g} reading/s per device ({args.wear_duration:g} s, "
              f"database on {some['filesystem']} in {some['directory']})")
    for key in keys:
        m = res[key]["median"]
        run0 = res[key]["runs"][0]
        store = ", ".join(f"{k} {v}" for k, v in run0["store"].items()) or "commit_interval 0.01, synchronous full"
        t.add(f"{run0['setting']} ({store}), {run0['devices']} device(s)",
              f"{n(m['bytes_per_reading'])} bytes/reading, {n(m['commits_per_s'], 1)} commits/s; "
              f"{n(m['gb_per_year_per_device'], 1)} GB/year per device, {n(m['gb_per_year'], 1)} GB/year in all")
