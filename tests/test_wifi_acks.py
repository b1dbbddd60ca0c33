"""A Pico W keeps its readings until the gateway stored them (docs/protocol.md, Wi-Fi):
the Wi-Fi gone, the broker killed, the gateway restarted, the board wedged and
restarted by its watchdog. The real gateway process, the real firmware on a virtual
Pico W (the MicroPython VM), counted by the Pico's own sequence numbers."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from test_acks import caught_up, check_every_metric_once, check_once_in_order, check_times, readings
from test_firmware import _isolated_firmware, load_with_stubs, make_node  # noqa: F401  (the fixture: autouse)
from test_reliability import SessionSubscriber

from gateway import payloads

RATE = 0.1  # seconds between readings: 10 a second, so a few seconds' fault costs dozens
BUFFER = 1000  # readings the Pico keeps (100 s at RATE): every fault below fits
OUTAGE = float(os.environ.get("PICOGW_TEST_OUTAGE", "4"))  # seconds a fault lasts (30 for the figure)


def start_pico_w(tmp_path: Path, broker: Broker, device: str, **config: object):
    from gateway.simulator.fleet import start_fleet
    return start_fleet([{"id": device, "transport": "wifi", "read_interval": RATE,
                         "config": {"WIFI_BUFFER": BUFFER, **config}}],
                       tmp_path / "picos", broker=(broker.host, broker.port), timeout=30)


def start(tmp_path: Path, broker: Broker, recorder: Recorder, device: str, **config: object):
    """The gateway, then the Pico W; returns (fleet, gateway, db, config path) once live
    readings are stored."""
    db = tmp_path / "readings.db"
    cfg = write_config(tmp_path / "gw.toml", broker, [{"id": device, "transport": "wifi"}], db=db,
                       diagnostics_interval=1)
    gw = GatewayProcess(cfg, recorder)
    fleet = start_pico_w(tmp_path, broker, device, **config)
    wait_for(lambda: caught_up(db, device, 0), 30, "live readings stored")
    return fleet, gw, db, cfg


def on_mqtt_at_least_once(sub: SessionSubscriber, rows: list) -> None:
    """Every stored reading went over the broker at least once (the Pico's QoS 1 messages,
    to a subscriber with a persistent session)."""
    def missing() -> set[int]:
        with sub.lock:
            seen = {json.loads(payload)["seq"] for _, payload, _ in sub.got}
        return {r[1] for r in rows} - seen
    wait_for(lambda: not missing(), 15, "every stored reading on MQTT")


def check_all(db: Path, device: str, mark: int, late: float) -> list:
    """Everything the Pico took is stored once, in order, with its time, live readings flow
    again past row ``mark``, and at least ``late`` readings were stored late (the Pico's time)."""
    rows = wait_for(lambda: caught_up(db, device, mark), 60, "everything kept sent again, and live readings")
    check_once_in_order(rows)
    check_every_metric_once(db, device)
    assert sum(r[4] for r in rows if r[0] > mark) >= late, "the readings sent late carry the Pico's time"
    check_times(rows)
    return rows


def test_wifi_gone_for_a_while_loses_no_reading(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """The access point goes (``wifi_fail`` drops the joined station and its connection:
    the broker is not told); the Pico keeps reading, and sends it all when back."""
    sub = SessionSubscriber(broker, "pico/w1/reading")
    fleet, gw, db, _ = start(tmp_path, broker, recorder, "w1")
    try:
        pico = fleet["w1"]
        pico.set_sim(wifi_fail=True)
        wait_for(lambda: "access point is gone" in pico.log(), 10, "the station dropped")
        time.sleep(OUTAGE)  # the Wi-Fi is down (the fault, not a wait for something)
        mark = readings(db, "w1")[-1][0]  # (now: the last readings before the drop may be committed late)
        pico.set_sim(wifi_fail=False)
        on_mqtt_at_least_once(sub, check_all(db, "w1", mark, late=OUTAGE / RATE / 2))
    finally:
        sub.close()
        gw.stop()
        fleet.stop()


def test_broker_killed_loses_no_reading(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """mosquitto SIGKILLed and started again after a while (its retained messages gone with
    it): the Pico and the gateway reconnect, and what the Pico took meanwhile is stored."""
    fleet, gw, db, _ = start(tmp_path, broker, recorder, "w2")
    try:
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait()
        broker.proc = None
        time.sleep(OUTAGE)  # the broker is down (the fault)
        mark = readings(db, "w2")[-1][0]  # (now: the last readings before the kill may be committed late)
        broker.start()
        check_all(db, "w2", mark, late=OUTAGE / RATE / 2)
    finally:
        gw.stop()
        fleet.stop()


def test_gateway_stopped_and_started_loses_no_reading(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """The gateway stopped (SIGTERM) for a while: the broker takes the Pico's readings and
    nobody stores them; the Pico keeps them, and the gateway that starts asks for them."""
    sub = SessionSubscriber(broker, "pico/w3/reading")
    fleet, gw, db, cfg = start(tmp_path, broker, recorder, "w3")
    try:
        assert gw.stop() == 0
        mark = readings(db, "w3")[-1][0]
        time.sleep(OUTAGE)  # the gateway is down (the fault)
        gw = GatewayProcess(cfg, recorder)
        rows = check_all(db, "w3", mark, late=OUTAGE / RATE / 2)
        on_mqtt_at_least_once(sub, rows)
        diagnostics = json.loads(wait_for(lambda: recorder.last("pico/w3/diagnostics"), 5, "diagnostics"))
        assert diagnostics["counters"]["ring_lost"] == 0 and rows
    finally:
        sub.close()
        gw.stop()
        fleet.stop()


def test_a_wedged_board_is_restarted_by_its_watchdog(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """The radio stops answering (``wifi_hang``: every socket call blocks): the main loop no
    longer feeds the watchdog, which restarts the board within WATCHDOG_MS. The new boot
    says why it started; what the old boot took before the hang and what the new one
    takes are stored once each, in order (the few readings the old boot had not yet had
    acknowledged were in its RAM: docs/reliability.md)."""
    fleet, gw, db, _ = start(tmp_path, broker, recorder, "w4", WATCHDOG_MS=3000)
    try:
        pico = fleet["w4"]
        wait_for(lambda: len(readings(db, "w4")) >= 10, 15, "a few readings of the first boot")
        old_boot = json.loads(recorder.last("pico/w4/hello") or "{}")["boot"]
        pico.set_sim(wifi_hang=True)
        wait_for(lambda: "watchdog expired" in pico.log(), 15, "the watchdog's reset")
        pico.set_sim(wifi_hang=False)
        hello = json.loads(wait_for(lambda: (h := recorder.last("pico/w4/hello")) and json.loads(h)["boot"] != old_boot
                                    and h, 30, "the new boot's hello"))
        assert hello["reset"] == "watchdog"
        with sqlite3.connect(db) as conn:
            wait_for(lambda: conn.execute("SELECT count(*) FROM readings WHERE device='w4' AND boot=? AND ts_pico=0 "
                                          "AND seq>20", (hello["boot"],)).fetchone()[0], 30, "the new boot's readings")
            by_boot = {boot: [s for (s,) in conn.execute(
                "SELECT seq FROM readings WHERE device='w4' AND boot=? AND metric='uptime' ORDER BY id", (boot,))]
                for boot in (old_boot, hello["boot"])}
        for seqs in by_boot.values():
            assert seqs == list(range(len(seqs))), seqs[:5]
            for boot in by_boot:  # (each boot's uptime counts from its own start)
                check_times(conn.execute("SELECT id, seq, ts, value, ts_pico FROM readings WHERE device='w4' AND "
                                         "metric='uptime' AND boot=? ORDER BY id", (boot,)).fetchall())
            counts = conn.execute("SELECT count(*), count(DISTINCT boot || '/' || seq || '/' || metric) FROM readings "
                                  "WHERE device='w4'").fetchone()
        assert len(by_boot[old_boot]) >= 10
        assert counts[0] == counts[1], counts  # no reading of either boot stored twice
    finally:
        gw.stop()
        fleet.stop()


def test_payloads_and_older_firmware(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """What goes over the broker has the documented shape, the plain sensor topics still
    carry live readings, and firmware without the buffer (``WIFI_BUFFER = 0``) is stored
    as before, from those topics."""
    db = tmp_path / "readings.db"
    cfg = write_config(tmp_path / "gw.toml", broker, [{"id": "p1", "transport": "wifi"},
                                                      {"id": "p0", "transport": "wifi"}], db=db)
    gw = GatewayProcess(cfg, recorder)
    from gateway.simulator.fleet import start_fleet
    fleet = start_fleet([{"id": "p1", "transport": "wifi", "read_interval": RATE, "config": {"WIFI_BUFFER": 5}},
                         {"id": "p0", "transport": "wifi", "read_interval": RATE, "config": {"WIFI_BUFFER": 0}}],
                        tmp_path / "picos", broker=(broker.host, broker.port), timeout=30)
    try:
        wait_for(lambda: (r := recorder.last("pico/p1/reading")) and json.loads(r)["seq"] >= 20
                 and recorder.on("pico/p1/stored") and len(recorder.on("pico/p0/sensor/temp")) >= 3,
                 30, "readings acknowledged, and the other Pico's")
        hello = json.loads(recorder.last("pico/p1/hello") or "")
        payloads.check(payloads.Hello, hello)
        assert hello["ack"] == 5 and hello["lost"] == 0 and hello["reset"] == "power"
        reading = json.loads(recorder.on("pico/p1/reading")[-1])
        payloads.check(payloads.WifiReading, reading)
        assert reading["seq"] >= 20 and reading["lost"] == 0, "a buffer of 5 never full: stored ones forgotten"
        assert set(reading["values"]) == {"temp", "uptime", "mem_free"} and reading["boot"] == hello["boot"]
        stored = json.loads(recorder.on("pico/p1/stored")[-1])
        payloads.check(payloads.WifiStored, stored)
        assert stored["boot"] == hello["boot"]
        payloads.check(payloads.WifiTime, json.loads(recorder.on("pico/p1/time")[-1]))
        assert recorder.on("pico/p1/sensor/temp"), "live readings on the plain topics too"
        old = json.loads(recorder.last("pico/p0/hello") or "")
        assert "ack" not in old and not recorder.on("pico/p0/reading")
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM readings WHERE device='p0' AND boot IS NULL").fetchone()[0] > 0
            seqs = [s for (s,) in conn.execute("SELECT seq FROM readings WHERE device='p1' AND metric='temp' "
                                               "ORDER BY id")]
        assert seqs == list(range(len(seqs)))  # once each: the plain topics' copies are not stored again
    finally:
        gw.stop()
        fleet.stop()


class FakeClient:
    """What the firmware's link publishes, in order (topic, payload, qos)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, int]] = []

    def publish(self, topic: bytes, msg: bytes, retain: bool = False, qos: int = 0) -> None:
        self.sent.append((topic, msg, qos))


def test_the_firmware_keeps_readings_until_stored_and_drops_the_oldest_when_full() -> None:
    """The firmware's buffer under CPython: each reading is sent once at QoS 1 with the
    documented JSON; a ``stored`` of another boot is ignored, one of its own boot drops what
    it names; a full buffer drops the oldest and counts it; ``resend`` sends all again."""
    link_wifi = load_with_stubs("link_wifi")
    node = make_node(boot=4711)

    class Cfg:
        DEVICE = "greenhouse"
        WIFI_BUFFER = 3
        READ_INTERVAL = 3600  # (readings taken by the test only: the first due one is taken here)

    link = link_wifi.WifiLink(Cfg, node)
    assert link.readings.due()
    client = link.client = FakeClient()
    for _ in range(2):
        link.take_reading()
    link.send_kept()
    kept = [json.loads(m) for t, m, q in client.sent if t == b"pico/greenhouse/reading" and q == 1]
    assert [r["seq"] for r in kept] == [0, 1] and all(r["oldest"] == 0 and r["lost"] == 0 for r in kept)
    for r in kept:
        payloads.check(payloads.WifiReading, r)
    assert b"pico/greenhouse/sensor/temp" in {t for t, _, _ in client.sent}, "live on the plain topics too"
    link.on_message(b"pico/greenhouse/stored", b'{"boot": 4712, "seq": 1, "now": 1764070000000}')
    link.apply_acks()
    assert node.ring.count == 2, "another boot's acknowledgement"
    assert node.time_ms == 1764070000000, "the time, whoever it was for"
    link.on_message(b"pico/greenhouse/stored", b'{"boot": 4711, "seq": 0, "now": 1764070000000}')
    link.apply_acks()
    assert node.ring.count == 1 and node.ring.oldest_seq() == 1
    for _ in range(4):  # seq 2..5 into a buffer of 3: 1 and 2 fall off
        link.take_reading()
    assert node.ring.lost == 2 and node.ring.oldest_seq() == 3
    client.sent.clear()
    link.on_message(b"pico/greenhouse/time", b'{"now": 1764070001000, "resend": true}')
    link.apply_acks()
    link.send_kept()
    again = [json.loads(m) for t, m, _ in client.sent if t == b"pico/greenhouse/reading"]
    assert [r["seq"] for r in again] == [3, 4, 5] and {r["lost"] for r in again} == {2}
    assert all("ts" in r for r in again), "the Pico knows the time now"
    hello = json.loads(link.hello())
    payloads.check(payloads.Hello, hello)
    assert hello["ack"] == 3 and hello["lost"] == 2 and hello["boot"] == 4711
    link.on_message(b"pico/greenhouse/stored", b"not json")  # counted, survived
    assert node.counts["malformed"] == 1
