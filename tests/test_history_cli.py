"""``pico-gateway readings`` and ``status`` against real SQLite files and a real broker."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_config
from inprocess import InProcessGateway
from mqtt_helpers import wait_for
from peers import PicogwPeer

import gateway.diagnostics as diagnostics
import gateway.history as history
import gateway.status as status
import gateway.stored as stored
from gateway.cli import SIGPIPE_EXIT, main
from gateway.history import DEFAULT_LIMIT, parse_since, query_readings
from gateway.mosquitto import free_port
from gateway.payloads import ExportedReading, check

SCHEMA = ("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, device TEXT NOT NULL, metric TEXT NOT NULL, "
          "value REAL NOT NULL, ts INTEGER NOT NULL, seq INTEGER)")


class Writer:
    """The gateway's side of the database as docs/DESIGN describe it: WAL, the readings table."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(SCHEMA)
        self.conn.execute("CREATE INDEX IF NOT EXISTS readings_device_metric_ts ON readings(device, metric, ts)")

    def add(self, rows) -> None:
        with self.conn:
            self.conn.executemany("INSERT INTO readings (device, metric, value, ts, seq) VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.conn.close()

NOW_MS = int(time.time() * 1000)
DEVICES = [{"id": "greenhouse", "transport": "uart", "port": "/dev/serial0"},
           {"id": "porch", "transport": "uart", "port": "/dev/ttyAMA1", "protocol": "tutorial"}]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "readings.db"
    store = Writer(path)
    rows = []
    for i in range(10):  # one reading every 10 minutes, the newest 5 minutes ago
        ts = NOW_MS - (5 + 10 * (9 - i)) * 60_000
        rows += [("greenhouse", "temp", 20.0 + i / 2, ts, i), ("greenhouse", "uptime", 600.0 * i, ts, i)]
    store.add(rows)
    store.close()
    return path


def config_for(tmp_path: Path, broker, db: Path) -> Path:
    return write_config(tmp_path / "gw.toml", broker, DEVICES, gateway_id="testgw", db=db)


class NoBroker:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = free_port()


def test_parse_since() -> None:
    now = 1_764_000_000.0
    assert parse_since("30m", now) == (now - 1800) * 1000
    assert parse_since("1h", now) == (now - 3600) * 1000
    assert parse_since("2d", now) == (now - 2 * 86400) * 1000
    assert parse_since("2025-11-25T07:00:00Z") == 1764054000000
    assert parse_since("2025-11-25T08:00:00+01:00") == 1764054000000
    with pytest.raises(Exception, match="expected a duration"):
        parse_since("yesterday")


def test_readings_table_csv_json(tmp_path, db, capsys) -> None:
    cfg = config_for(tmp_path, NoBroker(), db)
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["time", "(local)", "metric", "value", "seq"]
    assert len(lines) == 1 + 20

    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--metric", "temp",
                 "--since", "32m", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(r["value"]) for r in rows] == [23.5, 24.0, 24.5]  # 25, 15 and 5 minutes ago
    assert rows[-1]["ts"].endswith("Z") and rows[-1]["seq"] == "9"

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(NOW_MS / 1000 - 16 * 60))  # local, no offset
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--metric", "uptime",
                 "--since", since, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["value"] for d in data] == [4800.0, 5400.0]
    for row in data:
        check(ExportedReading, row)

    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--limit", "2",
                 "--format", "json"]) == 0
    assert [d["seq"] for d in json.loads(capsys.readouterr().out)] == [9, 9]


def test_readings_while_the_database_is_written(tmp_path, db, capsys) -> None:
    """Read-only: works while the gateway holds the database open and writes."""
    cfg = config_for(tmp_path, NoBroker(), db)
    store = Writer(db)  # the gateway's own connection, WAL mode, open
    now_ms = int(time.time() * 1000)  # (not NOW_MS: the suite may have run for minutes since it was taken)
    try:
        store.add([("greenhouse", "temp", 30.0, now_ms, 10)])
        assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--metric", "temp",
                     "--since", "1m", "--format", "json"]) == 0
        assert [d["value"] for d in json.loads(capsys.readouterr().out)] == [30.0]
        store.add([("greenhouse", "temp", 31.0, now_ms + 1, 11)])
    finally:
        store.close()
    # and never writes: a read-only file is fine
    db.chmod(0o444)
    try:
        assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--limit", "1",
                     "--format", "csv"]) == 0
        assert "31.0" in capsys.readouterr().out
    finally:
        db.chmod(0o644)


def test_readings_errors(tmp_path, db, capsys) -> None:
    cfg = config_for(tmp_path, NoBroker(), db)
    assert main(["readings", "--config", str(cfg), "--device", "garage"]) == 1
    err = capsys.readouterr().err
    assert "unknown device 'garage'" in err and "greenhouse, porch" in err
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--metric", "light"]) == 1
    assert "metrics: temp, uptime" in capsys.readouterr().err
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--since", "soon"]) == 1
    assert "--since 'soon'" in capsys.readouterr().err
    # a configured device without readings is not an error
    assert main(["readings", "--config", str(cfg), "--device", "porch"]) == 0
    assert "no readings of porch" in capsys.readouterr().err

    missing = tmp_path / "nothing-yet.db"
    cfg2 = write_config(tmp_path / "gw2.toml", NoBroker(), DEVICES, db=missing)
    assert main(["readings", "--config", str(cfg2), "--device", "greenhouse"]) == 1
    assert "no database at" in capsys.readouterr().err
    assert not missing.exists()  # never created by a reader

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    cfg3 = write_config(tmp_path / "gw3.toml", NoBroker(), DEVICES, db=other)
    assert main(["readings", "--config", str(cfg3), "--device", "greenhouse"]) == 1
    assert "no readings table" in capsys.readouterr().err


@pytest.fixture
def year(tmp_path: Path) -> Path:
    """Readings of two metrics, more than the default window holds."""
    path = tmp_path / "year.db"
    store = Writer(path)
    first = NOW_MS - 3 * 86400_000
    store.add([("greenhouse", metric, float(i), first + i * 60_000, i)
               for i in range(DEFAULT_LIMIT // 2 + 100) for metric in ("temp", "uptime")])
    store.close()
    return path


def test_readings_without_a_window_are_the_newest_and_say_how_to_get_more(tmp_path, year, capsys) -> None:
    cfg = config_for(tmp_path, NoBroker(), year)
    total = DEFAULT_LIMIT + 200
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == DEFAULT_LIMIT and rows[-1]["seq"] == str(total // 2 - 1)  # the newest, oldest first
    assert rows[0]["seq"] == str(total // 2 - DEFAULT_LIMIT // 2)
    assert f"the newest {DEFAULT_LIMIT} readings of greenhouse" in err and "--since 7d" in err and "--all" in err

    # each way of asking for more says nothing of a window
    for more, count in ((["--all"], total), (["--since", "4d"], total), (["--limit", "1100"], 1100),
                        (["--metric", "temp", "--all"], total // 2)):
        assert main(["readings", "--config", str(cfg), "--device", "greenhouse", "--format", "json", *more]) == 0
        out, err = capsys.readouterr()
        assert len(json.loads(out)) == count and "newest" not in err, more
    # the table too: header + the window, and the note on stderr only
    assert main(["readings", "--config", str(cfg), "--device", "greenhouse"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 + DEFAULT_LIMIT and "newest" not in out and "--all" in err
    with pytest.raises(SystemExit):
        main(["readings", "--config", str(cfg), "--device", "greenhouse", "--limit", "0"])
    assert "1 or more (every one: --all)" in capsys.readouterr().err


def test_readings_are_read_in_chunks_in_the_order_of_time(tmp_path, monkeypatch) -> None:
    """Merged across metrics, chunk by chunk: the same rows, in the same order, as one sorted query."""
    path = tmp_path / "r.db"
    store = Writer(path)
    # equal times within a metric and across metrics, out of insertion order
    store.add([("d", "abcd"[i % 4], float(i), 1000 + (i * 7) % 13, i) for i in range(60)])
    store.close()
    monkeypatch.setattr(stored, "CHUNK", 3)
    conn = history.open_readonly(path)
    try:
        everything = conn.execute("SELECT ts, id, metric, value, seq FROM readings ORDER BY ts, id").fetchall()
        for since, limit in ((None, None), (1005, None), (None, 7), (1005, 7), (1005, 1000), (2000, 5)):
            rows, cut = query_readings(conn, "d", ["a", "b", "c", "d"], since, limit)
            expected = [tuple(r) for r in everything if since is None or r[0] >= since]
            if limit is not None:
                expected, left_out = expected[-limit:], expected[:-limit]
                assert cut == (expected[0][0] if left_out else None), (since, limit)
            assert list(rows) == expected, (since, limit)
    finally:
        conn.close()


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path) -> None:
    """`readings ... | head -3`: no BrokenPipeError traceback; the exit status of a command ended by SIGPIPE."""
    db = tmp_path / "many.db"
    store = Writer(db)
    store.add([("greenhouse", "temp", float(i), NOW_MS - 86400_000 + i * 1000, i) for i in range(20_000)])
    store.close()  # (about 900 kB of table: far more than a pipe holds, so the command is still writing)
    cfg = config_for(tmp_path, NoBroker(), db)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "readings", "--config", str(cfg), "--device",
                             "greenhouse", "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    head = [proc.stdout.readline() for _ in range(3)]  # (more than a pipe holds is still to come)
    proc.stdout.close()
    assert proc.wait(30) == SIGPIPE_EXIT and head[0].startswith(b"time (local)")
    assert proc.stderr.read() == b""


def test_status_asks_the_gateway_for_fresh_counters_and_shows_their_age(tmp_path, broker, recorder, capsys,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(diagnostics, "HEALTH_CHECK", 3600)  # only a refresh request publishes counters here
    monkeypatch.setattr(diagnostics, "REFRESH_SPACING", 0.2)  # (1 s in the gateway)
    pico = PicogwPeer("greenhouse")
    gw = InProcessGateway(broker, tmp_path, "testgw", {"greenhouse": pico.path})
    try:
        gw.start()
        recorder.wait("pico/greenhouse/status", "online", timeout=10)
        for n in range(1, 9):  # eight successful commands, and no diagnostics published since
            recorder.publish("pico/greenhouse/cmd/led", "toggle")
            recorder.wait("pico/greenhouse/result/led", count=n, timeout=10)
        cfg = write_config(tmp_path / "gw.toml", broker, [{"id": "greenhouse", "transport": "uart",
                                                            "port": pico.path}], db=tmp_path / "testgw.db")
        assert main(["status", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "commands_ok=8 commands_failed=0" in out and " s ago)" in out, out
        assert "did not answer" not in out

        # Anyone may ask: a burst of requests is one or two publishes, a retained one none.
        mark = recorder.mark("pico/greenhouse/diagnostics")
        for _ in range(100):
            recorder.publish("pico/bridge/testgw/diagnostics/refresh", "", qos=0)
        recorder.publish("pico/bridge/testgw/diagnostics/refresh", "please", retain=True)
        # (pending: a refresh still due would publish after the count; nothing public says so)
        wait_for(lambda: gw.bridge.stats["diagnostics_refresh_requests"] == 101
                 and gw.bridge.stats["diagnostics_refresh_retained"] == 1
                 and not gw.diagnostics._refresh.pending()  # noqa: SLF001 -- see above
                 and recorder.mark("pico/greenhouse/diagnostics") > mark, 10, "every request handled")
        assert recorder.mark("pico/greenhouse/diagnostics") - mark <= 2
        recorder.publish("pico/bridge/testgw/diagnostics/refresh", "", retain=True)
    finally:
        gw.stop()
        pico.close()


def test_status_with_broker(tmp_path, db, broker, recorder, capsys, monkeypatch) -> None:
    monkeypatch.setattr(status, "REFRESH_WAIT", 0.2)  # nothing answers refresh requests here
    cfg = config_for(tmp_path, broker, db)
    recorder.publish("pico/bridge/testgw/status", "online", retain=True)
    recorder.publish("pico/greenhouse/status", "online", retain=True)
    recorder.publish("pico/greenhouse/state/led", "on", retain=True)
    recorder.publish("pico/porch/status", "offline", retain=True)
    diag = {"frames": 120, "rejected": 2, "seq_gaps": 1, "reconnects": 0, "commands_ok": 3,
            "commands_failed": 1, "backlog": 0, "last_seen_ms": NOW_MS}
    recorder.publish("pico/greenhouse/diagnostics", json.dumps(diag), retain=True)
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"gateway testgw: online (broker {broker.host}:{broker.port})" in out
    greenhouse, porch = out.split("\ngreenhouse")[1].split("\nporch")
    assert "(uart, picogw)" in greenhouse
    assert "status   online" in greenhouse and "led      on" in greenhouse
    assert "temp=24.5" in greenhouse and "uptime=5400" in greenhouse and "min ago" in greenhouse
    assert "frames=120 rejected=2 seq_gaps=1" in greenhouse and "last_seen=" in greenhouse
    assert "(age unknown)" in greenhouse  # (counters without at_ms)
    assert "the gateway did not answer a refresh request" in out
    assert "(uart, tutorial)" in porch and "status   offline" in porch and "led      unknown" in porch
    assert "no readings stored" in porch


def test_status_without_broker(tmp_path, db, capsys) -> None:
    cfg = config_for(tmp_path, NoBroker(), db)
    t0 = time.monotonic()
    assert main(["status", "--config", str(cfg), "--timeout", "2"]) == 0
    assert time.monotonic() - t0 < 10
    out = capsys.readouterr().out
    assert "not reachable" in out and "showing the database only" in out
    assert "temp=24.5" in out and "status   " not in out


def test_status_without_database(tmp_path, broker, capsys) -> None:
    cfg = write_config(tmp_path / "gw.toml", broker, DEVICES, db=tmp_path / "none.db")
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "database: no database at" in out and "status   unknown" in out
