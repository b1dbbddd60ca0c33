"""Fewer writes for the SD card: ``store.commit_interval`` groups readings into fewer
commits, loses at most one interval at a crash (nothing from Picos that keep their
readings until acknowledged), and the gateway says how fast its database grows and
when the disk will be full (docs/reliability.md, docs/performance.md)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from test_acks import caught_up, check_every_metric_once, check_once_in_order, readings

from gateway.cli import main
from gateway.payloads import BridgeDiagnostics, DiskBudget, check

RATE = 0.05  # seconds between readings: 20 frames a second
INTERVAL = 2.0  # seconds between commits: long enough to see, short enough for a test


def with_store(config: Path, **keys: object) -> Path:
    """Add keys to the config's [store] table."""
    lines = "".join(f"{k} = {v!r}\n" for k, v in keys.items())
    config.write_text(config.read_text().replace("[store]\n", "[store]\n" + lines, 1))
    return config


def start_pico(tmp_path: Path, broker: Broker, device: str, ring: int | None = None):
    from gateway.simulator.fleet import start_fleet
    extra = {} if ring is None else {"config": {"ACK_RING": ring}}  # (None: the firmware's default ring)
    return start_fleet([{"id": device, "transport": "uart", "read_interval": RATE, **extra}],
                       tmp_path / "picos", broker=(broker.host, broker.port))


def bridge_outbox(recorder: Recorder) -> dict[str, int] | None:
    raw = recorder.last("pico/bridge/testgw/diagnostics")
    return json.loads(raw)["outbox"] if raw else None


def test_a_long_commit_interval_commits_less_and_stores_every_reading(tmp_path: Path, broker: Broker,
                                                                     recorder: Recorder) -> None:
    """At 20 frames a second (60 readings), a 2 s commit interval: a commit every 2 s or so
    (and the acknowledgements ride along), not one every few frames; every reading is stored
    once, in order; the Pico's ring (the firmware's default size) never overflows while its
    acknowledgements wait for the commit."""
    fleet = start_pico(tmp_path, broker, "w1")
    db = tmp_path / "readings.db"
    config = with_store(write_config(tmp_path / "gw.toml", broker, [{"id": "w1", "transport": "uart",
                                                                     "port": fleet["w1"].endpoint}], db=db,
                                     diagnostics_interval=1), commit_interval=INTERVAL)
    gw = GatewayProcess(config, recorder)
    try:
        first = wait_for(lambda: (bridge_outbox(recorder) or {}).get("stored", 0) > 0 and bridge_outbox(recorder),
                         15, "readings stored")
        start = time.monotonic()
        time.sleep(3 * INTERVAL)  # readings flow for three intervals (the load, not a wait for something)
        last = wait_for(lambda: (o := bridge_outbox(recorder)) and o["stored"] > first["stored"] + 100 and o, 10,
                        "diagnostics after three intervals")
        elapsed = time.monotonic() - start + 1.0  # (diagnostics are up to 1 s old)
        commits = last["commits"] - first["commits"]
        stored = last["stored"] - first["stored"]
        assert commits <= elapsed / INTERVAL + 2, (commits, stored, elapsed)
        assert stored / commits > 50, (commits, stored)  # at the default interval: a few readings per commit
        rows = wait_for(lambda: caught_up(db, "w1", 0), 5, "readings")
        check_once_in_order(rows)
        check_every_metric_once(db, "w1")
        diagnostics = json.loads(wait_for(lambda: recorder.last("pico/w1/diagnostics"), 5, "diagnostics"))
        assert diagnostics["counters"].get("ring_lost", 0) == 0
    finally:
        gw.stop()
        fleet.stop()


def test_a_kill_loses_at_most_one_interval_and_nothing_a_pico_keeps(tmp_path: Path, broker: Broker,
                                                                   recorder: Recorder) -> None:
    """kill -9 with a 2 s commit interval: of a Pico without acknowledgements, the readings
    of the last interval at most are lost (the stored ones reach to within an interval of
    the kill); a Pico with them (the default firmware) sends its uncommitted readings again
    after the restart, and every one is stored once, in order."""
    fleet = start_pico(tmp_path, broker, "keep")
    plain = start_pico(tmp_path / "plain", broker, "plain", ring=0)
    db = tmp_path / "readings.db"
    config = with_store(write_config(tmp_path / "gw.toml", broker, [
        {"id": "keep", "transport": "uart", "port": fleet["keep"].endpoint},
        {"id": "plain", "transport": "uart", "port": plain["plain"].endpoint}], db=db), commit_interval=INTERVAL)
    gw = GatewayProcess(config, recorder)
    try:
        wait_for(lambda: caught_up(db, "keep", 0) and readings(db, "plain"), 15, "readings stored")
        time.sleep(INTERVAL + 0.5)  # a commit interval's worth of readings is uncommitted at the kill (the load)
        killed_ms = time.time() * 1000
        gw.proc.kill()
        gw.proc.wait()
        gw.log.close()
        stored = readings(db, "plain")
        assert stored[-1][2] >= killed_ms - (INTERVAL + 1.5) * 1000, (killed_ms - stored[-1][2])
        mark = readings(db, "keep")[-1][0]
        gw = GatewayProcess(config, recorder)
        rows = wait_for(lambda: caught_up(db, "keep", mark), 15, "everything kept sent again, and live readings")
        check_once_in_order(rows)
        check_every_metric_once(db, "keep")
    finally:
        gw.stop()
        fleet.stop()
        plain.stop()



def test_the_gateway_says_how_big_its_database_is_what_it_writes_and_when_it_is_full(tmp_path: Path, broker: Broker,
                                                                                    recorder: Recorder, capsys) -> None:
    """The bridge diagnostics carry the database's size, the bytes the gateway and its
    writer process write per day and the days until store.max_size_mb at the current
    growth; pico-gateway status says it in words."""
    fleet = start_pico(tmp_path, broker, "b1")
    db = tmp_path / "readings.db"
    config = with_store(write_config(tmp_path / "gw.toml", broker, [{"id": "b1", "transport": "uart",
                                                                     "port": fleet["b1"].endpoint}], db=db,
                                     diagnostics_interval=1), max_size_mb=5)
    gw = GatewayProcess(config, recorder)

    def budget() -> dict | None:
        raw = recorder.last("pico/bridge/testgw/diagnostics")
        disk = json.loads(raw).get("disk") if raw else None
        return disk if disk and disk["days_until_full"] is not None and disk["written_per_day"] else None

    try:
        disk = wait_for(budget, 15, "a disk budget with rates")
        check(BridgeDiagnostics, json.loads(recorder.last("pico/bridge/testgw/diagnostics")))
        check(DiskBudget, disk)
        with sqlite3.connect(db) as conn:
            pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
        assert 0 < disk["db_bytes"] <= (pages - free) * size  # (it grows on)
        assert disk["file_bytes"] >= disk["db_bytes"] and disk["free_bytes"] > 0
        assert disk["full_at"] == "max_size_mb" and disk["max_bytes"] == 5 * 1024 * 1024
        # 60 readings a second: some kB a second, far less than a TB a day
        assert 1e6 < disk["growth_per_day"] < 1e10 and disk["written_per_day"] >= disk["growth_per_day"]
        assert abs(disk["days_until_full"] - (disk["max_bytes"] - disk["db_bytes"]) / disk["growth_per_day"]) < 1
        assert main(["status", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("disk: "))
        assert line.startswith("disk: database ") and " free; the gateway writes " in line, out
        assert "a day and the database grows " in line and "store.max_size_mb (5.2 MB) is reached in about " in line
    finally:
        gw.stop()
        fleet.stop()


def test_the_disk_budget_rates_cover_the_last_day_whatever_the_diagnostics_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two and a half days of diagnostics every 20 s: the rates are over the last day (its window),
    not the process's whole life, and the samples kept stay bounded."""
    from gateway import disk_budget
    from gateway.store import Store

    clock = [1000.0]
    monkeypatch.setattr(disk_budget.time, "monotonic", lambda: clock[0])
    store = Store(tmp_path / "readings.db")
    meter = disk_budget.DiskBudgetMeter(store, None)
    try:
        for _ in range(int(2.5 * 86400 / 20)):
            report = meter.report()
            clock[0] += 20
        step = disk_budget.WINDOW / disk_budget.MAX_SAMPLES
        assert disk_budget.WINDOW <= report["window_s"] <= disk_budget.WINDOW + step
        assert len(meter._samples) <= disk_budget.MAX_SAMPLES + 1  # noqa: SLF001  (the bound itself)
    finally:
        store.close()


def test_the_disk_budget_counts_to_the_disk_and_its_writes_survive_a_new_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without store.max_size_mb the days count to a full disk; the bytes written only grow,
    also when the database writer process died and a new one took over (the kernel adds a
    waited-for child's writes to the gateway's own count)."""
    import os
    import signal

    from gateway import disk_budget
    from gateway.disk_budget import DiskBudgetMeter, written_bytes
    from gateway.store import Store, WriterDied

    clock = [1000.0]
    monkeypatch.setattr(disk_budget.time, "monotonic", lambda: clock[0])
    store = Store(tmp_path / "readings.db")
    meter = DiskBudgetMeter(store, None, min_span=0.2)
    try:
        first = meter.report()
        assert first["written_per_day"] is None and first["days_until_full"] is None and first["window_s"] == 0
        rows = [("a", "temp", float(i), 1000 + i, i) for i in range(2000)]
        store.commit(list(rows))
        clock[0] += 0.2  # (the rates' shortest window)
        report = meter.report()
        check(DiskBudget, report)
        assert report["growth_per_day"] > 0 and report["full_at"] == "disk" and report["max_bytes"] is None
        assert report["days_until_full"] == report["free_bytes"] / report["growth_per_day"]
        before = meter.written()
        pid = store.writer_pid
        assert pid is not None and written_bytes(pid)  # (the writer wrote the WAL)
        os.kill(pid, signal.SIGKILL)
        try:
            store.commit([("a", "temp", 1.0, 9000, 1)])
        except WriterDied:
            pass  # (the next call starts a new writer)
        store.commit([("a", "temp", 2.0, 9001, 2)])
        assert store.writer_pid != pid
        assert meter.written() >= before  # type: ignore[operator]
    finally:
        store.close()
