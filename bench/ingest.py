"""Ingest: N virtual serial links flooding reading frames through the whole gateway.

Each link is a pseudo-terminal whose master side writes ``$R,<n>,seq=<n>*<crc>``
frames (one metric per frame, its value the frame's sequence number, so every
MQTT message says which reading it is). The gateway (``python -m gateway run``)
reads the slave side, stores each reading in SQLite and publishes it; a paho
subscriber counts what arrives. The feeder never has more than ``window`` frames
in flight (written but not yet received), so the rate is the one the gateway
sustains, not a buffer filling up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import Env, GatewayProcess, Subscriber, loss_report, others_cpu, wait_for, wait_online, write_config
from picos import Picos

GATEWAY_ID = "bench"


def run(env: Env, links: int, db_template: Path | None = None, profile: Path | None = None,
        acks: bool = False) -> dict:
    """One ingest run; ``db_template`` is copied in as the pre-existing database,
    ``profile`` (a path) records the measured interval with py-spy (speedscope); ``acks``:
    Picos that keep their frames until the gateway acknowledges them (bench/acks.py)."""
    work = env.tempdir(f"ingest-{links}")
    db = work / "readings.db"
    if db_template is not None:
        shutil.copyfile(db_template, db)
    picos = Picos(links, acks=acks)
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port, counter=picos.received)
        config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port), db, picos.peers, env.qos)
        gw = GatewayProcess(env.source, config)
        try:
            wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
            if acks:  # (frames before the gateway's resend request would be refused, and sent again)
                wait_for(picos.synced, 30, "every Pico's resend request answered", gw.check)
            since_ms = time.time_ns() // 1_000_000
            picos.feed(env.window)
            time.sleep(env.warmup)
            spy = _py_spy(gw.pid, env.duration, profile) if profile else None
            t0, cpu0, sent0, recv0 = time.monotonic(), gw.cpu_seconds(), picos.sent, sub.received
            acks0 = picos.acks_received()
            others0 = others_cpu(broker, picos.pid)
            while time.monotonic() < t0 + env.duration:
                gw.check()
                time.sleep(0.1)
            t1, cpu1, sent1, recv1 = time.monotonic(), gw.cpu_seconds(), picos.sent, sub.received
            acks_received = picos.acks_received() - acks0
            others1 = others_cpu(broker, picos.pid)
            picos.stop_feed()
            try:
                wait_for(lambda: sub.received >= picos.sent, 15, "the last readings", gw.check)
                drained = True
            except TimeoutError:
                drained = False
            memory = gw.memory_mb()
            if spy is not None:
                spy.wait(60)
            written = {device: c.seq for device, c in picos.counts().items()}
        finally:
            gw.stop()
            sub.close()
            picos.close()
    elapsed, delivered = t1 - t0, recv1 - recv0
    loss = loss_report(written, sub, db, since_ms)
    result = {
        "links": links,
        "prefilled_rows": _rows_before(db_template),
        "seconds": round(elapsed, 2),
        "offered_per_s": (sent1 - sent0) / elapsed,
        "delivered_per_s": delivered / elapsed,
        "cpu_s_per_1000": (cpu1 - cpu0) / delivered * 1000 if delivered else float("nan"),
        "cpu_cores": (cpu1 - cpu0) / elapsed,
        "broker_cores": (others1[0] - others0[0]) / elapsed,
        "subscriber_cores": (others1[1] - others0[1]) / elapsed,  # this process: the subscriber
        "picos_cores": (others1[2] - others0[2]) / elapsed,  # the virtual Picos and their feeder
        "peak_rss_mb": memory.get("VmHWM"),
        "rss_mb": memory.get("VmRSS"),
        "drained": drained,
        "acks_received": acks_received,  # K frames the Picos received while measured
        **loss,
    }
    result["zero_loss"] = drained and not any(result[k] for k in (
        "missing_on_mqtt", "duplicates_on_mqtt", "missing_in_db", "duplicates_in_db"))
    shutil.rmtree(work, ignore_errors=True)
    return result


def py_spy_path() -> str | None:
    """py-spy beside this Python (``.venv/bin/pip install py-spy``), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _py_spy(pid: int, duration: float, out: Path) -> subprocess.Popen:
    spy = py_spy_path()
    if spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
                             "--rate", "250", "--threads", "--nonblocking", "--format", "speedscope",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _rows_before(db_template: Path | None) -> int:
    if db_template is None:
        return 0
    import sqlite3

    with sqlite3.connect(f"file:{db_template}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT max(rowid) FROM readings").fetchone()[0] or 0
