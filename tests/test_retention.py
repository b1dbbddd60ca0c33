"""Retention and roll-ups on real SQLite files written by the gateway's own store, passes
run by the gateway's own child process, and ``pico-gateway readings`` reading across
raw rows and roll-ups (docs/reliability.md, docs/mqtt-cli.md)."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Recorder, wait_for
from peers import PicogwPeer
from test_reliability import SessionSubscriber

from gateway import rollups, store_writer
from gateway.cli import main
from gateway.config import StoreConfig
from gateway.mosquitto import PrivateBroker, free_port
from gateway.payloads import ROLLUP_COLUMNS, ExportedRollup, check
from gateway.retention import Retention
from gateway.store import Store
from gateway.stored import iso_utc

DAY = 86_400_000
MINUTE, HOUR = 60_000, 3_600_000


def direct(rows: list[tuple], size: int) -> dict[tuple[str, str, int], tuple[int, float, float, float, float]]:
    """(device, metric, interval start) -> (count, min, max, mean, last): computed here,
    straight from the raw rows, to check the gateway's roll-ups against."""
    groups: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for device, metric, value, ts, *_ in rows:
        groups.setdefault((device, metric, ts - ts % size), []).append((ts, value))
    out = {}
    for key, values in groups.items():
        vs = [v for _, v in values]
        out[key] = (len(vs), min(vs), max(vs), sum(vs) / len(vs), max(values)[1])
    return out


def stored_rollups(db: Path, name: str) -> dict[tuple[str, str, int], tuple[int, float, float, float, float]]:
    with sqlite3.connect(db) as conn:
        return {(d, m, ts): (n, lo, hi, total / n, last) for d, m, ts, n, lo, hi, total, last in conn.execute(
            f"SELECT device, metric, ts, n, lo, hi, total, last FROM rollups_{name}")}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, (n, lo, hi, mean, last) in want.items():
        g = got[key]
        assert (g[0], g[1], g[2], g[4]) == (n, lo, hi, last), key
        assert g[3] == pytest.approx(mean), key


def series(start_ms: int, count: int, step_ms: int, devices=("greenhouse", "shed"), metrics=("temp", "hum"),
           seed: int = 1) -> list[tuple]:
    """Readings of every device and metric every ``step_ms`` (jittered, each ts its own)."""
    rnd = random.Random(seed)
    rows = []
    for i in range(count):
        for device in devices:
            for metric in metrics:
                rows.append((device, metric, round(rnd.uniform(-5, 30), 2),
                             start_ms + i * step_ms + rnd.randrange(step_ms // 2), i))
    return rows


def retention(db: Path, **keys: object) -> tuple[Retention, Counter[str]]:
    stats: Counter[str] = Counter()
    return Retention(StoreConfig(path=db, **keys), stats), stats  # type: ignore[arg-type]


def test_rollups_match_a_direct_computation_over_the_raw_rows(tmp_path: Path) -> None:
    """Per minute and per hour, in chunks that split minutes, over several passes, with
    late readings (a Pico's buffered ones) landing in intervals already rolled up."""
    db = tmp_path / "readings.db"
    store = Store(db)
    now = int(time.time() * 1000)
    first = series(now - 3 * HOUR, 500, 17_000)
    store.record(first)
    conn = rollups.connect(str(db))
    result = rollups.run_pass(conn, now, 30 * DAY, None, None, chunk=7, pause_min=0)
    assert result["rolled"] == len(first) and result["transactions"] > len(first) / 7
    late = series(now - 3 * HOUR + 5_000, 40, 61_000, seed=2)  # into minutes and hours rolled up already
    more = series(now - 30 * MINUTE, 60, 13_000, seed=3)
    store.record(late + more)
    store.close()
    assert rollups.run_pass(conn, now, 30 * DAY, None, None, chunk=11, pause_min=0)["rolled"] == len(late + more)
    assert rollups.run_pass(conn, now, 30 * DAY, None, None, pause_min=0)["rolled"] == 0  # each row once
    conn.close()
    everything = first + late + more
    assert_same(stored_rollups(db, "1m"), direct(everything, MINUTE))
    assert_same(stored_rollups(db, "1h"), direct(everything, HOUR))


def test_unsent_readings_are_never_rolled_up_or_deleted(tmp_path: Path) -> None:
    """A pass stops at the oldest unpublished reading: it and everything after it stay raw
    and untouched, however old; once published, they are rolled up and aged out."""
    db = tmp_path / "readings.db"
    store = Store(db)
    old = int(time.time() * 1000) - 40 * DAY
    rows = series(old, 100, 1000, devices=("greenhouse",), metrics=("temp",))
    store.record(rows[:40])  # published
    first_unsent = store.commit(rows[40:60])  # stored, not yet published
    store.record(rows[60:])  # published after (a recorder's, a Pico that publishes itself)
    feature, stats = retention(db)
    result = feature.run_pass()
    assert result is not None and result["held_by_unsent"] == 1
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT id, sent FROM readings ORDER BY id").fetchall()
        assert rollups.rolled_id(conn) == first_unsent - 1
    assert [i for i, sent in kept if sent == 0] == list(range(first_unsent, first_unsent + 20))
    assert kept[0][0] == first_unsent  # the published ones before it: rolled up and deleted (40 days old)
    assert stats["retention_rolled"] == 40 and stats["retention_deleted_raw"] == 40
    assert stats["retention_held_by_unsent"] == 1

    store.commit([], range(first_unsent, first_unsent + 10))  # half of them published now
    store.expire_unsent(keep_rows=1000, older_than_ms=old + 200_000)  # the rest given up (too old): sent = 2
    store.close()
    assert feature.run_pass() is not None
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 1  # (the newest row always stays)
    assert stats["retention_rolled"] == 100 and stats["retention_held_by_unsent"] == 0
    assert_same(stored_rollups(db, "1m"), direct(rows, MINUTE))


def test_max_size_deletes_the_oldest_raw_rows_after_rolling_them_up(tmp_path: Path, caplog) -> None:
    """Above 95 % of max_size_mb, the oldest raw rows go, down to 90 %; their roll-ups stay,
    unsent rows stay, and the log says what went, once a day at most."""
    db = tmp_path / "readings.db"
    store = Store(db)
    now = int(time.time() * 1000)
    rows = series(now - 2 * DAY, 8000, 10_000)  # recent: keep_raw_days alone would keep them all
    store.record(rows[:30000])
    first_unsent = store.commit(rows[30000:])  # the newest 2000 unpublished
    feature, stats = retention(db, max_size_mb=1)
    with sqlite3.connect(db) as conn:
        assert rollups.used_bytes(conn) > 1024 * 1024
    caplog.set_level(logging.WARNING, logger="gateway.retention")
    assert feature.run_pass() is not None
    with sqlite3.connect(db) as conn:
        assert rollups.used_bytes(conn) <= 0.9 * 1024 * 1024
        left = conn.execute("SELECT min(ts), count(*), sum(sent = 0) FROM readings").fetchone()
    assert left[2] == 2000 and 2000 < left[1] < 30000  # every unsent row, and the newest of the others
    assert stats["retention_deleted_for_size"] == 32000 - left[1]
    assert_same(stored_rollups(db, "1h"), direct(rows[:30000], HOUR))  # (all rolled up before any went)
    said = [r.getMessage() for r in caplog.records if "max_size_mb" in r.getMessage()]
    assert len(said) == 1 and f"deleted {32000 - left[1]} raw reading(s)" in said[0]

    store.commit([], range(first_unsent, first_unsent + 2000))  # published now
    store.record(series(now - DAY, 3000, 10_000, seed=4))  # more: more goes, and is not said again today
    store.close()
    assert feature.run_pass() is not None
    assert stats["retention_deleted_for_size"] > 32000 - left[1]
    assert len([r for r in caplog.records if "max_size_mb" in r.getMessage()]) == 1


@pytest.mark.parametrize("keep", ["forever", 3650.0])
def test_rollups_are_kept_keep_rollups_days_or_forever(tmp_path: Path, keep: object) -> None:
    db = tmp_path / "readings.db"
    store = Store(db)
    now = int(time.time() * 1000)
    ancient = series(now - 4000 * DAY, 120, 30_000, devices=("greenhouse",))
    recent = series(now - 40 * DAY, 120, 30_000, devices=("greenhouse",), seed=5)
    store.record(ancient + recent + series(now - MINUTE, 1, 1000, devices=("greenhouse",), seed=6))
    store.close()
    feature, stats = retention(db, keep_rollups_days=keep)
    assert feature.run_pass() is not None
    hours = {ts for _, _, ts in stored_rollups(db, "1h")}
    assert {ts - ts % HOUR for _, _, _, ts, _ in recent} <= hours  # raw gone (40 days), roll-ups kept
    assert ({ts - ts % HOUR for _, _, _, ts, _ in ancient} <= hours) == (keep == "forever")
    assert (stats["retention_deleted_rollups"] > 0) == (keep != "forever")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 2  # the newest reading's metrics


def readings_cli(capsys, cfg: Path, *args: str) -> tuple[str, str]:
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


class NoBroker:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = free_port()


def parsed(out: str) -> dict[tuple[str, str, int], tuple[int, float, float, float, float]]:
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames or ()) == ROLLUP_COLUMNS
    return {("greenhouse", r["metric"], int(r["ts_ms"])): (int(r["count"]), float(r["min"]), float(r["max"]),
                                                           float(r["mean"]), float(r["last"])) for r in reader}


def greenhouse(want: dict) -> dict:
    return {k: v for k, v in want.items() if k[0] == "greenhouse"}


def test_readings_reads_raw_rows_and_rollups_as_one(tmp_path: Path, capsys) -> None:
    """--every 1h over a year: the roll-up tables for what was rolled up (its raw rows
    partly deleted), computed on the fly for what was not (new and late readings);
    without --every, raw readings, and a note where they were rolled up and deleted."""
    db = tmp_path / "readings.db"
    cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "greenhouse", "transport": "uart",
                                                           "port": "/dev/serial0"}], db=db)
    store = Store(db)
    now = int(time.time() * 1000)
    old = series(now - 35 * DAY, 1200, 180_000)  # 35 days ago to 32.5 days ago
    days = series(now - 3 * DAY, 1400, 180_000, seed=7)  # 3 days ago to a few hours ago
    store.record(old + days)
    nothing_rolled = parsed(readings_cli(capsys, cfg, "--since", "1y", "--every", "1h", "--format", "csv")[0])
    assert_same(nothing_rolled, greenhouse(direct(old + days, HOUR)))  # no pass yet: all computed on the fly

    feature, _ = retention(db, keep_raw_days=30)
    assert feature.run_pass() is not None  # rolls everything up, deletes the 35-day-old raw rows
    late = series(now - 2 * DAY + 1000, 5, 60_000, seed=8)  # a Pico's buffered readings, into rolled hours
    new = series(now - 20 * MINUTE, 30, 20_000, seed=9)
    store.record(late + new)
    store.close()
    everything = old + days + late + new

    out, _ = readings_cli(capsys, cfg, "--since", "1y", "--every", "1h", "--format", "csv")
    assert_same(parsed(out), greenhouse(direct(everything, HOUR)))
    out, _ = readings_cli(capsys, cfg, "--since", "3h", "--every", "1m", "--format", "csv")
    got, minutes = parsed(out), greenhouse(direct(everything, MINUTE))
    assert_same(got, {k: minutes[k] for k in got})
    since = now - 3 * HOUR
    assert {k for k in minutes if k[2] >= since} <= set(got)
    assert min(k[2] for k in got) >= since - since % MINUTE
    out, _ = readings_cli(capsys, cfg, "--metric", "temp", "--since", "3d", "--every", "1h", "--format", "json")
    rows = json.loads(out)
    assert rows
    hours = greenhouse(direct(everything, HOUR))
    for row in rows:
        check(ExportedRollup, row)
        n, lo, hi, mean, last = hours[("greenhouse", "temp", row["ts_ms"])]
        assert (row["count"], row["min"], row["max"], row["last"]) == (n, lo, hi, last)

    out, _ = readings_cli(capsys, cfg, "--metric", "temp", "--since", "3h", "--every", "1h")  # the table
    lines = out.splitlines()
    assert lines[0].split() == ["time", "(local)", "metric", "count", "min", "max", "mean", "last"]
    assert len(lines) >= 3 and len({len(line) for line in lines[1:]}) == 1  # aligned
    out, err = readings_cli(capsys, cfg, "--metric", "temp", "--since", "1h", "--format", "csv")  # raw, as stored
    assert "rolled up" not in err
    raw = list(csv.DictReader(io.StringIO(out)))
    want = sorted((ts, v) for d, m, v, ts, _ in new if d == "greenhouse" and m == "temp" and ts >= now - HOUR)
    assert [(int(r["ts_ms"]), float(r["value"])) for r in raw] == want
    assert all(r["ts"] == iso_utc(int(r["ts_ms"])) for r in raw)  # (formatted by hand: as everywhere else)
    _, err = readings_cli(capsys, cfg, "--metric", "temp", "--since", "40d", "--format", "csv")
    assert "rolled up: ask with --every 1m or --every 1h" in err


def test_nothing_unpublished_is_removed_while_the_broker_is_away(tmp_path: Path, monkeypatch) -> None:
    """The gateway itself, with raw readings kept only two seconds and a pass every second:
    while the broker is down, every reading stays in the database, unrolled; once it is
    back, every one is delivered, then rolled up and deleted."""
    monkeypatch.setenv("PICOGW_RETENTION_DELAY", "0.5")
    monkeypatch.setenv("PICOGW_RETENTION_INTERVAL", "1")
    broker = PrivateBroker(tmp_path / "broker", extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    broker.start()
    peer = PicogwPeer("greenhouse")
    stop_flood = threading.Event()

    def flood() -> None:
        while not stop_flood.is_set():
            peer.reading(temp=peer.seq)
            stop_flood.wait(0.02)

    sub = SessionSubscriber(broker, "pico/greenhouse/sensor/temp")
    recorder = Recorder(broker)
    db = tmp_path / "readings.db"
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "greenhouse", "transport": "uart", "port": peer.path}])
    config.write_text(config.read_text().replace("[store]\n", "[store]\nkeep_raw_days = 0.00002\n", 1))
    gw = GatewayProcess(config, recorder)
    recorder.wait("pico/greenhouse/status", "online")
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: len(sub.got) >= 10, 10, "live readings")
        recorder.close()
        broker.stop()
        during = peer.seq

        def held() -> tuple[list[int], int, int] | None:
            """(unsent seqs, rolled id, oldest unsent id) once the outage has held back
            more than 50 readings and a pass (one a second) has rolled up to them."""
            with sqlite3.connect(db) as conn:
                unsent = [seq for (seq,) in conn.execute("SELECT seq FROM readings WHERE sent = 0 ORDER BY id")]
                rolled = rollups.rolled_id(conn)
                oldest = conn.execute("SELECT min(id) FROM readings WHERE sent = 0").fetchone()[0]
            return (unsent, rolled, oldest) if len(unsent) > 50 and rolled >= oldest - 1 else None
        unsent, rolled, oldest = wait_for(held, 30, "a pass during the outage, up to the unsent readings")
        # Every reading since the outage began is there, unpublished and not rolled up; those
        # published before it were rolled up (and, two seconds old, deleted).
        assert unsent[0] <= during and unsent == list(range(unsent[0], unsent[0] + len(unsent)))
        assert len(unsent) > 50 and 0 < rolled < oldest
        broker.start()
        stop_flood.set()
        flooder.join()
        sent = peer.seq
        wait_for(lambda: {int(v) for _, v, _ in sub.got} >= set(range(sent)), 30, "every reading delivered")

        def rolled_up() -> bool:
            with sqlite3.connect(db) as conn:
                n = conn.execute("SELECT coalesce(sum(n), 0) FROM rollups_1m").fetchone()[0]
                left = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
            return n == sent and left <= 1
        wait_for(rolled_up, 20, "every reading rolled up once, and the raw ones deleted")
    finally:
        stop_flood.set()
        sub.close()
        code = gw.stop()
        broker.stop()
        peer.close()
    assert code == 0


def test_rows_a_clock_ahead_left_among_the_oldest_do_not_stop_deletion(tmp_path: Path) -> None:
    """Readings stored while the Pi's clock was a year ahead sit at the lowest ids, not old
    yet: the old ones behind them still go."""
    db = tmp_path / "readings.db"
    store = Store(db)
    now = int(time.time() * 1000)
    ahead = series(now + 365 * DAY, 250, 1000, devices=("greenhouse",), metrics=("temp",))
    old = series(now - 40 * DAY, 300, 1000, devices=("greenhouse",), metrics=("temp",), seed=2)
    store.record(ahead + old + series(now, 1, 1000, devices=("greenhouse",), metrics=("temp",), seed=3))
    store.close()
    conn = rollups.connect(str(db))
    assert rollups.run_pass(conn, now, 30 * DAY, None, None, chunk=100, pause_min=0)["deleted_raw"] == 300
    conn.close()


def test_a_database_from_before_gets_the_covering_index_at_open(tmp_path: Path) -> None:
    """The one-day query reads the index alone: an older, small database has its
    (device, metric, ts) index replaced when the gateway opens it."""
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, device TEXT NOT NULL, metric TEXT NOT NULL, "
                     "value REAL NOT NULL, ts INTEGER NOT NULL, seq INTEGER)")
        conn.execute("CREATE INDEX idx_readings_device_metric_ts ON readings (device, metric, ts)")
        conn.executemany("INSERT INTO readings (device, metric, value, ts, seq) VALUES (?, ?, ?, ?, ?)",
                         series(int(time.time() * 1000) - DAY, 100, 1000))
    Store(db).close()
    with sqlite3.connect(db) as conn:
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(readings)")}
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT ts, id, metric, value, seq FROM readings WHERE device = 'greenhouse' "
            "AND metric = 'temp' AND (ts, id) > (0, 0) ORDER BY ts, id"))
    assert "readings_series" in indexes and "idx_readings_device_metric_ts" not in indexes
    assert "COVERING INDEX readings_series" in plan


def test_a_large_database_from_before_keeps_its_index_and_says_how_to_build_the_new_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Building the covering index on tens of millions of readings would hold the start
    for minutes: the old index stays, and the log says what to run instead."""
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, device TEXT NOT NULL, metric TEXT NOT NULL, "
                     "value REAL NOT NULL, ts INTEGER NOT NULL, seq INTEGER)")
        conn.execute("CREATE INDEX idx_readings_device_metric_ts ON readings (device, metric, ts)")
        conn.executemany("INSERT INTO readings (id, device, metric, value, ts, seq) VALUES (?, 'd', 't', 1, 1, 1)",
                         [(1,), (store_writer.MIGRATE_ROWS + 2,)])  # (ids as far apart as that many readings)
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        Store(db).close()
    said = [r.getMessage() for r in caplog.records if "older (device, metric, ts) index" in r.getMessage()]
    assert len(said) == 1 and "DROP INDEX idx_readings_device_metric_ts" in said[0] and "readings_series" in said[0]
    caplog.clear()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX idx_readings_device_metric_ts")
    Store(db).close()  # (now built at open: nothing to say)
    assert not [r for r in caplog.records if "older" in r.getMessage()]


def test_a_pass_ended_by_a_stop_is_taken_up_where_it_was_and_counts_nothing_twice(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The gateway's stop ends a pass in progress at once (its child process, its open
    transaction rolled back); the next pass goes on from the last committed one."""
    monkeypatch.setenv("PICOGW_RETENTION_DELAY", "0")
    db = tmp_path / "readings.db"
    store = Store(db)
    rows = series(int(time.time() * 1000) - DAY, 6000, 1000)  # 24,000 rows: 12 transactions, 20 ms pauses
    store.record(rows)
    store.close()
    feature, _ = retention(db)
    feature.start()
    wait_for(lambda: feature.current_pass is not None, 10, "a pass running")
    with sqlite3.connect(db) as conn:
        wait_for(lambda: rollups.has_rollups(conn) and 0 < rollups.rolled_id(conn), 10, "its first transactions")
    proc = feature.current_pass
    started = time.monotonic()
    feature.stop()
    assert time.monotonic() - started < 1.0 and proc is not None and proc.poll() is not None
    with sqlite3.connect(db) as conn:
        assert rollups.rolled_id(conn) < len(rows)  # (cut short)
    again, stats = retention(db)
    assert again.run_pass() is not None
    assert_same(stored_rollups(db, "1m"), direct(rows, MINUTE))
    assert stats["retention_rolled"] < len(rows)
