"""Readings acknowledged end to end: the store refuses a reading a Pico sent again,
the gateway acknowledges what it stored, and a Pico resends what was not
acknowledged (docs/protocol.md, docs/reliability.md)."""

from __future__ import annotations

import json
import os
import select
import sqlite3
import threading
import time
import tty
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for

from gateway.store import Row, Store


def rows_of(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, device, metric, value, seq, boot, ts_pico FROM readings ORDER BY id").fetchall()


def test_a_reading_sent_again_by_the_same_boot_is_stored_once(tmp_path: Path) -> None:
    """A Pico resends what it could not know was stored: the same (device, boot, seq,
    metric) is refused, counted and reported to the listener, and the ids of what is
    stored still follow the first one in order (the outbox publishes by them)."""
    db = tmp_path / "readings.db"
    store = Store(db)
    told: list[tuple[list[Row], list[Row]]] = []
    store.on_stored = lambda stored, refused: told.append((list(stored), list(refused)))
    try:
        first: list[Row] = [("a", "temp", 20.0, 1000, 5, 77, 0), ("a", "uptime", 1.0, 1000, 5, 77, 0),
                            ("a", "temp", 20.5, 2000, 6, 77, 0)]
        assert store.commit(list(first)) == 1
        again: list[Row] = [("a", "temp", 20.5, 2100, 6, 77, 1),   # stored already
                            ("b", "temp", 9.0, 2100, 6, 77, 0),    # another device
                            ("a", "temp", 21.0, 3000, 7, 77, 0),
                            ("a", "temp", 21.0, 3000, 7, 77, 0),   # twice in one commit
                            ("a", "temp", 30.0, 3000, 6, 78, 0),   # another boot of the same Pico
                            ("a", "temp", 1.0, 3000, 6)]           # no boot: never refused
        batch = list(again)
        assert store.commit(batch) == 4
        assert store.duplicates_refused == 2
        assert batch == [again[1], again[2], again[4], again[5]]
        assert told[-1] == (batch, [again[0], again[3]])
        assert [r[1:] for r in rows_of(db)] == [
            ("a", "temp", 20.0, 5, 77, 0), ("a", "uptime", 1.0, 5, 77, 0), ("a", "temp", 20.5, 6, 77, 0),
            ("b", "temp", 9.0, 6, 77, 0), ("a", "temp", 21.0, 7, 77, 0), ("a", "temp", 30.0, 6, 78, 0),
            ("a", "temp", 1.0, 6, None, 0)]
        assert [r[0] for r in store.unsent(0, 100)] == [1, 2, 3, 4, 5, 6, 7]
        assert store.commit([("a", "temp", 1.0, 3000, 6)]) == 8  # readings without a boot: as before
    finally:
        store.close()


def test_an_older_database_is_migrated_on_open(tmp_path: Path) -> None:
    """A database from before boots: its rows stay, have no boot, and are never taken for
    duplicates of a reading with the same sequence number."""
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as conn:
        conn.execute('CREATE TABLE "readings" ("id" INTEGER PRIMARY KEY, "device" TEXT NOT NULL, '
                     '"metric" TEXT NOT NULL, "value" REAL NOT NULL, "ts" INTEGER NOT NULL, "seq" INTEGER, '
                     '"sent" INTEGER NOT NULL DEFAULT 1)')
        conn.execute("INSERT INTO readings (device, metric, value, ts, seq, sent) VALUES ('a', 'temp', 1, 1, 5, 1)")
    store = Store(db)
    try:
        assert store.commit([("a", "temp", 2.0, 2, 5, 9, 1), ("a", "temp", 3.0, 3, 5)]) == 2
        assert store.commit([("a", "temp", 2.0, 2, 5, 9, 1)]) == 4  # (nothing stored: the id after the last one)
        assert store.duplicates_refused == 1
        assert [r[1:] for r in rows_of(db)] == [("a", "temp", 1.0, 5, None, 0), ("a", "temp", 2.0, 5, 9, 1),
                                                ("a", "temp", 3.0, 5, None, 0)]
    finally:
        store.close()


# -- end to end: the real gateway process, the real firmware on a virtual Pico ---------------------

RATE = 0.05  # seconds between readings: 20 a second, brisk enough that a fault costs a hundred
RING = 1000  # frames the Pico keeps (50 s at RATE): every fault below fits


def readings(db: Path, device: str) -> list[tuple[int, int, int, float, int]]:
    """(id, seq, ts, uptime, ts_pico) of a device's readings, one row per frame (its uptime)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, seq, ts, value, ts_pico FROM readings WHERE device = ? AND metric = 'uptime' "
                            "ORDER BY id", (device,)).fetchall()


def caught_up(db: Path, device: str, after_id: int) -> list[tuple[int, int, int, float, int]] | None:
    """The device's readings once a live one (the gateway's time: the Pico has sent all it
    kept) is stored past row ``after_id``; else None."""
    rows = readings(db, device)
    return rows if rows and rows[-1][0] > after_id and rows[-1][4] == 0 else None


def check_once_in_order(rows: list[tuple[int, int, int, float, int]]) -> None:
    """Every reading the Pico took, by its own sequence numbers from 0, is there once, in order."""
    seqs = [r[1] for r in rows]
    assert seqs == list(range(len(seqs))), next(
        (i, seqs[i - 1:i + 2]) for i in range(len(seqs)) if seqs[i] != i)


def check_every_metric_once(db: Path, device: str) -> None:
    with sqlite3.connect(db) as conn:
        counts = conn.execute("SELECT metric, count(*), count(DISTINCT seq) FROM readings WHERE device = ? "
                              "GROUP BY metric", (device,)).fetchall()
    assert {m for m, _, _ in counts} == {"temp", "uptime", "mem_free"}
    assert all(n == distinct for _, n, distinct in counts), counts


def check_times(rows: list[tuple[int, int, int, float, int]]) -> None:
    """A reading's stored time is within 1 s of when the Pico took it: ts minus the Pico's
    uptime (whole seconds, cut) is its boot time, the same for every reading to within
    the second the uptime cuts off, plus the wire's and the loop's few milliseconds."""
    boots = [ts - int(uptime) * 1000 for _, _, ts, uptime, _ in rows]
    # (0.4 s for a loaded machine's delays: a live reading's time is when the gateway read it.
    # Stamped on arrival instead, the readings sent again would be 3 s or more late.)
    assert max(boots) - min(boots) <= 1000 + 400, (max(boots) - min(boots), rows[boots.index(max(boots))],
                                                  rows[boots.index(min(boots))])


def start_pico(tmp_path: Path, broker: Broker, device: str):
    from gateway.simulator.fleet import start_fleet
    return start_fleet([{"id": device, "transport": "uart", "read_interval": RATE, "config": {"ACK_RING": RING}}],
                       tmp_path / "picos", broker=(broker.host, broker.port))


def test_gateway_killed_three_times_loses_no_reading_and_stores_none_twice(tmp_path: Path, broker: Broker,
                                                                         recorder: Recorder) -> None:
    """kill -9 of the gateway, 3 s down, three times, while the Pico reads 50 times a second:
    the Pico keeps what was not acknowledged and sends it again, the store refuses what it
    had already: every reading is in SQLite once, in the Pico's order, with its time."""
    fleet = start_pico(tmp_path, broker, "k1")
    db = tmp_path / "readings.db"
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "k1", "transport": "uart",
                                                          "port": fleet["k1"].endpoint}], db=db,
                          diagnostics_interval=1)
    gw = GatewayProcess(config, recorder)
    try:
        mark = 0
        for _ in range(3):
            mark = wait_for(lambda mark=mark: caught_up(db, "k1", mark), 15, "live readings stored")[-1][0]
            gw.proc.kill()
            gw.proc.wait()
            gw.log.close()
            time.sleep(3)  # the gateway is down for 3 s (the fault, not a wait for something)
            gw = GatewayProcess(config, recorder)
        rows = wait_for(lambda: caught_up(db, "k1", mark), 15, "everything kept sent again, and live readings")
        check_once_in_order(rows)
        check_every_metric_once(db, "k1")
        assert sum(r[4] for r in rows) > 3 * 3 / RATE, "the readings sent again carry the Pico's time"
        check_times(rows)
        diagnostics = json.loads(wait_for(lambda: recorder.last("pico/k1/diagnostics"), 5, "diagnostics"))
        assert diagnostics["counters"]["ring_lost"] == 0
    finally:
        gw.stop()
        fleet.stop()


class Cable:
    """A serial cable the test can pull out: it carries bytes between the Pico's UART (a
    pty) and a pty of its own, which the gateway opens through the symlink ``path``.
    Unplugged, the gateway's end is closed and its path gone (as a USB adapter's
    /dev/serial/by-id link), and what the Pico sends meanwhile goes nowhere."""

    def __init__(self, pico_port: str, path: Path) -> None:
        self.pico = os.open(pico_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.pico)
        self.path = path
        self.end: tuple[int, int] | None = None  # (master, slave) of the gateway's pty
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.plug()
        self._thread = threading.Thread(target=self._carry, daemon=True)
        self._thread.start()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        with self._lock:
            self.end = (master, slave)
        self.path.symlink_to(os.ttyname(slave))

    def unplug(self) -> None:
        self.path.unlink()
        with self._lock:
            end, self.end = self.end, None
        for fd in end or ():
            os.close(fd)

    def _carry(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                end = self.end
                fds = [self.pico] + ([end[0]] if end else [])
                ready = select.select(fds, [], [], 0.02)[0]
                for fd in ready:
                    try:
                        data = os.read(fd, 4096)
                    except OSError:
                        continue
                    if fd == self.pico:
                        if end is not None:
                            os.write(end[0], data)  # (else: unplugged, the bytes are lost)
                    else:
                        os.write(self.pico, data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self.end is not None:
            self.unplug()
        os.close(self.pico)


def test_serial_cable_pulled_for_5_s_loses_no_reading(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """The cable out for 5 s: the gateway's port fails and its path is gone; the Pico
    keeps what nobody acknowledged, and when the port opens again sends it, with its
    time: every reading once, in order."""
    fleet = start_pico(tmp_path, broker, "c1")
    db = tmp_path / "readings.db"
    cable = Cable(fleet["c1"].endpoint, tmp_path / "usb-serial")
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "c1", "transport": "uart",
                                                          "port": str(cable.path)}], db=db)
    gw = GatewayProcess(config, recorder)
    try:
        wait_for(lambda: caught_up(db, "c1", 0), 15, "live readings stored")
        statuses = len(recorder.on("pico/c1/status"))
        cable.unplug()
        wait_for(lambda: recorder.on("pico/c1/status")[statuses:] == ["offline"], 10, "the port failed: offline")
        mark = readings(db, "c1")[-1][0]
        time.sleep(5)  # the cable is out for 5 s (the fault, not a wait for something)
        cable.plug()
        rows = wait_for(lambda: caught_up(db, "c1", mark), 15, "everything kept sent again, and live readings")
        check_once_in_order(rows)
        check_every_metric_once(db, "c1")
        assert sum(r[4] for r in rows) > 5 / RATE, "the readings sent again carry the Pico's time"
        check_times(rows)
    finally:
        gw.stop()
        cable.close()
        fleet.stop()


@pytest.mark.parametrize("qos", [1, 0])
def test_gateway_stopped_and_started_loses_no_reading(tmp_path: Path, broker: Broker, recorder: Recorder,
                                                      qos: int) -> None:
    """SIGTERM, 3 s down, started again: what the Pico read meanwhile went nowhere, and it
    keeps it until the new gateway's K; every reading is stored once, in order, with its
    time, and reaches a subscriber with a persistent session at least once, those sent
    late with their time (the ``ts`` property), at either ``readings_qos``."""
    from test_reliability import SessionSubscriber

    sub = SessionSubscriber(broker, "pico/t1/sensor/uptime")
    fleet = start_pico(tmp_path, broker, "t1")
    db = tmp_path / "readings.db"
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "t1", "transport": "uart",
                                                          "port": fleet["t1"].endpoint}], db=db)
    config.write_text(config.read_text().replace("[mqtt]\n", f"[mqtt]\nreadings_qos = {qos}\n"))
    gw = GatewayProcess(config, recorder)
    try:
        mark = wait_for(lambda: caught_up(db, "t1", 0), 15, "live readings stored")[-1][0]
        assert gw.stop() == 0
        time.sleep(3)  # the gateway is down for 3 s (the fault, not a wait for something)
        gw = GatewayProcess(config, recorder)
        rows = wait_for(lambda: caught_up(db, "t1", mark), 15, "everything kept sent again, and live readings")
        check_once_in_order(rows)
        check_every_metric_once(db, "t1")
        assert sum(r[4] for r in rows if r[0] > mark) > 3 / RATE / 2, "the readings sent again carry the Pico's time"
        check_times(rows)

        # On MQTT at least once: each reading sent late by its (value, time), the live ones counted.
        late = [r for r in rows if r[4]]

        def text(value: float) -> str:  # as the gateway formats a value
            return str(value).rstrip("0").rstrip(".")

        def missing() -> tuple[set[tuple[str, str]], int]:
            with sub.lock:
                got = list(sub.got)
            late_missing = {(text(r[3]), str(r[2])) for r in late} - {(v, ts) for _, v, ts in got if ts}
            return late_missing, len(rows) - len(late) - sum(1 for *_, ts in got if ts is None)
        wait_for(lambda: not missing()[0] and missing()[1] <= 0, 15, "every stored reading on MQTT")
    finally:
        sub.close()
        gw.stop()
        fleet.stop()
