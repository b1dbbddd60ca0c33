"""Soak: a year of readings in accelerated time, under the default retention.

``devices`` devices x 1 reading a second (one metric), generated straight into
SQLite (the gateway's schema, not through MQTT) a month at a time, from a year
ago up to now; after each month the retention pass runs over it as the gateway
runs it (``python -I -S gateway/rollups.py``, with "now" the end of that month):
roll-ups of the month, raw readings older than 30 days deleted. Measured: each
month's pass, the database's size at the end, and ``pico-gateway readings`` for one
day of one device (raw, CSV) and for a year of it per hour (roll-ups, CSV).

The last month's pass runs under load: a gateway on the same database with
``live_links`` virtual Picos flooding readings (as the ingest measurement does)
and a command client (as the command measurement does); ingest throughput and
command round trips are measured before the pass (baseline) and while it runs.

A full year of 16 devices is 504 M rows: about an hour here. ``--soak-devices``
and ``--soak-months`` run it short (the per-month figures scale with devices;
the queries depend on the months kept, not on the other devices).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from commands import command_client
from common import Env, GatewayProcess, Subscriber, percentile, wait_online, write_config
from picos import Picos

DAY_MS = 86_400_000
MONTH_MS = 365 * DAY_MS // 12
KEEP_RAW_MS, KEEP_ROLLUPS_MS = 30 * DAY_MS, 3650 * DAY_MS  # the defaults (gateway/config.py StoreConfig)
GATEWAY_ID = "soak"
LOAD_PHASE_MAX = 60.0  # seconds each phase of the under-load measurement lasts at most
BASELINE = 15.0  # seconds of the baseline phase


def progress(message: str) -> None:
    print(f"bench: soak: {message}", flush=True)


def generate(db: Path, devices: int, start_ms: int, end_ms: int) -> int:
    """Readings of ``devices`` devices every second from ``start_ms`` to ``end_ms``, stored
    interleaved as a gateway stores them (published: sent = 1), a day per transaction."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    rows = 0
    for day in range(start_ms, end_ms, DAY_MS):
        seconds = (min(day + DAY_MS, end_ms) - day) // 1000
        n = seconds * devices
        conn.execute(
            "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
            "INSERT INTO readings (device, metric, value, ts, seq, sent) "
            f"SELECT printf('d%02d', i % {devices}), 'temp', ((i / {devices} * 7919 + i % {devices} * 104729) % 4000) "
            f"/ 100.0, {day} + (i / {devices}) * 1000, ({day // 1000} + i / {devices}) % 1000000, 1 FROM c", (n - 1,))
        rows += n
    conn.close()
    return rows


def pass_command(env: Env, db: Path, now_ms: int, pause: bool) -> list[str]:
    """The gateway's retention pass (gateway/retention.py) over ``db``, at ``now_ms``;
    without its pauses between transactions unless ``pause`` (nothing else writes)."""
    return [sys.executable, "-I", "-S", str(env.source.root / "gateway" / "rollups.py"), str(db), str(KEEP_RAW_MS),
            str(KEEP_ROLLUPS_MS), "-1", str(now_ms), *([] if pause else ["0"])]


def retention_pass(env: Env, db: Path, now_ms: int) -> dict:
    started = time.monotonic()
    done = subprocess.run(pass_command(env, db, now_ms, pause=False), capture_output=True, text=True, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise RuntimeError(f"the retention pass failed: {result['error']}")
    result["wall_s"] = time.monotonic() - started
    return result


def db_figures(db: Path) -> dict:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        count = lambda table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: E731
        try:  # (what each table and index takes; dbstat reads every page: seconds)
            tables = {name: size / 1e6 for name, size in conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")}
        except sqlite3.Error:
            tables = {}
        return {"file_mb": db.stat().st_size / 1e6, "used_mb": (pages - free) * page / 1e6, "tables_mb": tables,
                "raw_rows": count("readings"), "rollups_1m_rows": count("rollups_1m"),
                "rollups_1h_rows": count("rollups_1h")}
    finally:
        conn.close()


QUERY = """
import json, os, sys, time
from gateway import history
from gateway.config import load_config

class Sink:
    lines = 0
    def write(self, text):
        self.lines += text.count("\\n")

config = load_config(sys.argv[1])
out = {}
for name, since, every in json.loads(sys.argv[2]):
    times = []
    for _ in range(5):
        sink = Sink()
        t = time.perf_counter()
        history.readings(config, "d00", since=since, fmt="csv", out=sink, every=every)
        times.append((time.perf_counter() - t) * 1000)
    out[name] = {"ms": sorted(times)[2], "best_ms": min(times), "rows": sink.lines - 1}
print(json.dumps(out))
"""


def iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ms / 1000))


def queries(env: Env, config: Path, end_ms: int) -> dict:
    """``readings`` of d00: one day raw, a year per hour; each the median of 5, in one
    process (the command's own work, without Python's start-up), then once as the whole
    command."""
    asks = [["day_raw", iso(end_ms - DAY_MS), None], ["year_hourly", iso(end_ms - 365 * DAY_MS), "1h"]]
    done = subprocess.run([sys.executable, "-c", QUERY, str(config), json.dumps(asks)], cwd=env.source.root,
                          env=env.source.env(), capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    for name, since, every in asks:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "gateway", "readings", "--config", str(config), "--device", "d00",
                        "--since", since, "--format", "csv", *(["--every", every] if every else [])],
                       cwd=env.source.root, env=env.source.env(), stdout=subprocess.DEVNULL, check=True)
        result[name]["whole_command_ms"] = (time.monotonic() - started) * 1000
    return result


def _phase(broker, picos: Picos, sub: Subscriber, gw: GatewayProcess, until) -> dict:
    """Commands one at a time and the readings delivered meanwhile, until ``until()``."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    client = ctx.Process(target=command_client, name="commands",
                         args=(broker.host, broker.port, picos.devices[0], 1_000_000, child, stop))
    client.start()
    time.sleep(1.0)  # its connection and subscription
    t0, recv0 = time.monotonic(), sub.received
    while not until(time.monotonic() - t0):
        gw.check()
        time.sleep(0.1)
    elapsed, delivered = time.monotonic() - t0, sub.received - recv0
    stop.set()
    timings = parent.recv() if parent.poll(30) else {"ok": [], "failed": -1}
    client.join(10)
    result_ms = [r for r, _ in timings["ok"]]
    return {"seconds": elapsed, "readings_per_s": delivered / elapsed, "commands": len(result_ms),
            "failed": timings["failed"], "p50_ms": percentile(result_ms, 50), "p99_ms": percentile(result_ms, 99)}


def under_load(env: Env, work: Path, db: Path, now_ms: int, live_links: int) -> dict:
    """The month's pass while a gateway on the same database takes flooded readings and commands."""
    picos = Picos(live_links, prefix="live")
    os.environ["PICOGW_RETENTION_DELAY"] = "86400"  # (this measurement starts the gateway's pass itself)
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port, counter=picos.received)
        config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port), db, picos.peers, env.qos)
        gw = GatewayProcess(env.source, config)
        try:
            wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
            picos.feed(env.window)
            time.sleep(env.warmup)
            baseline = _phase(broker, picos, sub, gw, lambda t: t >= BASELINE)
            started = time.monotonic()
            proc = subprocess.Popen(pass_command(env, db, now_ms, pause=True), stdout=subprocess.PIPE, text=True)
            during = _phase(broker, picos, sub, gw, lambda t: proc.poll() is not None or t >= LOAD_PHASE_MAX)
            during["pass_finished_within"] = proc.poll() is not None
            picos.stop_feed()
            out, _ = proc.communicate()
            result = json.loads(out.strip().splitlines()[-1])
            result["wall_s"] = time.monotonic() - started
        finally:
            os.environ.pop("PICOGW_RETENTION_DELAY", None)
            gw.stop()
            sub.close()
            picos.close()
    return {"baseline": baseline, "during": during, "pass": result}


def run(env: Env, devices: int = 16, months: int = 12, live_links: int = 4) -> dict:
    work = env.tempdir("soak")
    db = work / "readings.db"
    env.source.create_store(db)
    soak_started = time.monotonic()
    end = time.time_ns() // 1_000_000 // 3_600_000 * 3_600_000
    start = end - months * MONTH_MS
    per_month = []
    load: dict = {}
    try:
        for k in range(months):
            t = time.monotonic()
            rows = generate(db, devices, start + k * MONTH_MS, start + (k + 1) * MONTH_MS)
            generated_s = time.monotonic() - t
            now = start + (k + 1) * MONTH_MS
            if k == months - 1 and live_links:
                progress(f"month {k + 1}: {rows:,} rows in {generated_s:.0f} s; its pass under load...")
                load = under_load(env, work, db, now, live_links)
                r = load["pass"]
            else:
                r = retention_pass(env, db, now)
            per_month.append({"month": k + 1, "rows": rows, "generate_s": generated_s, "pass_s": r["seconds"],
                              "rolled": r["rolled"], "deleted_raw": r["deleted_raw"],
                              "max_transaction_ms": r["max_transaction_ms"], "under_load": k == months - 1
                              and bool(live_links)})
            progress(f"month {k + 1}: {rows:,} rows generated in {generated_s:.0f} s; pass {r['seconds']:.1f} s "
                     f"({r['rolled']:,} rolled, {r['deleted_raw']:,} deleted, longest transaction "
                     f"{r['max_transaction_ms']:.1f} ms)")
        figures = db_figures(db)
        config = work / "readings.toml"
        config.write_text(f'gateway_id = "{GATEWAY_ID}"\n[mqtt]\nhost = "127.0.0.1"\n[store]\npath = "{db}"\n')
        found = queries(env, config, end)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passes = [m["pass_s"] for m in per_month if not m["under_load"]]
    full_rows = 16 * 365 * 86400
    return {"devices": devices, "months": months, "rows": sum(m["rows"] for m in per_month),
            "soak_s": time.monotonic() - soak_started, "per_month": per_month,
            "pass_s_per_month_mean": sum(passes) / len(passes) if passes else float("nan"),
            "pass_us_per_row": (sum(passes) / sum(m["rows"] for m in per_month if not m["under_load"]) * 1e6
                                if passes else float("nan")),
            "scale_to_full_year": full_rows / max(1, sum(m["rows"] for m in per_month)),
            **figures, "queries": found, "load": load}


def fill_table(t, r: dict) -> None:
    """The soak's rows in run.py's table."""
    t.section(f"soak: {r['devices']} device(s) x 1 reading/s, {r['months']} month(s), default retention "
              f"({r['rows']:,} readings; soak took {r['soak_s'] / 60:.1f} min)")
    t.add("retention pass per month (unloaded months, mean)",
          f"{r['pass_s_per_month_mean']:.1f} s ({r['pass_us_per_row']:.2f} us per reading; x{16 / r['devices']:.0f} "
          f"for 16 devices: {r['pass_s_per_month_mean'] * 16 / r['devices']:.0f} s)")
    t.add("longest retention transaction", f"{max(m['max_transaction_ms'] for m in r['per_month']):.1f} ms")
    t.add("database at the end", f"{r['file_mb']:,.0f} MB file, {r['used_mb']:,.0f} MB used: "
          f"{r['raw_rows']:,} raw rows, {r['rollups_1m_rows']:,} per-minute and {r['rollups_1h_rows']:,} "
          "per-hour roll-ups")
    if r.get("tables_mb"):
        t.add("of which", ", ".join(f"{name} {mb:,.0f} MB" for name, mb in r["tables_mb"].items() if mb >= 1))
    q = r["queries"]
    for name, what in (("day_raw", "readings, one day of one device, raw, CSV"),
                       ("year_hourly", "readings, a year of one device, --every 1h, CSV")):
        t.add(what, f"{q[name]['ms']:.0f} ms ({q[name]['rows']:,} rows; whole command "
              f"{q[name]['whole_command_ms']:.0f} ms)", "< 200 ms", q[name]["ms"] < 200)
    if r["load"]:
        b, d, p = r["load"]["baseline"], r["load"]["during"], r["load"]["pass"]
        t.add("last month's pass under load", f"{p['seconds']:.1f} s ({p['rolled']:,} rolled, "
              f"{p['deleted_raw']:,} deleted; longest transaction {p['max_transaction_ms']:.1f} ms)")
        t.add("ingest before / during the pass", f"{b['readings_per_s']:,.0f}/s / {d['readings_per_s']:,.0f}/s")
        t.add("command p50, p99 before / during the pass",
              f"{b['p50_ms']:.1f}, {b['p99_ms']:.1f} ms / {d['p50_ms']:.1f}, {d['p99_ms']:.1f} ms "
              f"({b['commands']} / {d['commands']} commands, {b['failed'] + d['failed']} failed)")
