"""Faults injected with real parts: the broker dies, the cable goes, the gateway is
killed, the disk refuses writes. Each test names the guarantee of docs/reliability.md
it proves."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Recorder, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from peers import PicogwPeer

from gateway.config import MqttConfig
from gateway.mosquitto import PrivateBroker
from gateway.mqtt import MqttConnection
from gateway.outbox import Outbox, OutboxSettings
from gateway.store import Store
from gateway.topics import Topics

OUTAGE = float(os.environ.get("PICOGW_TEST_OUTAGE", "12"))  # seconds the broker stays down: long enough
# for the reconnect backoff to grow past 8 s (1, 2, 4, 8), short enough for the suite's five minutes


class SessionSubscriber:
    """A subscriber with a persistent session (clean_start off, long expiry): the broker
    keeps its QoS 1 messages while it is away. Records (topic, value, ts property)."""

    def __init__(self, broker: PrivateBroker, topic: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.got: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="session-sub",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, "subscription")

    def _on_message(self, client, userdata, msg) -> None:
        props = msg.properties
        ts = dict(props.UserProperty).get("ts") if props and hasattr(props, "UserProperty") else None
        with self.lock:
            self.got.append((msg.topic, msg.payload.decode(), ts))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def db_rows(db: Path, device: str, metric: str = "temp") -> list[tuple[int, float, int, int | None, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, value, ts, seq, sent FROM readings WHERE device=? AND metric=? ORDER BY id",
                            (device, metric)).fetchall()


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    """Guarantee 1: readings made while the broker is down are stored, then delivered,
    in order, with their original time, to a subscriber with a persistent session."""
    broker = PrivateBroker(tmp_path / "broker", extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    broker.start()
    peer = PicogwPeer("greenhouse")
    stop_flood = threading.Event()

    def flood() -> None:  # a reading every 50 ms, all through the outage
        while not stop_flood.is_set():
            peer.reading(temp=round(20 + peer.seq / 1000, 3))
            stop_flood.wait(0.05)

    sub = SessionSubscriber(broker, "pico/greenhouse/sensor/temp")
    recorder = Recorder(broker)
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "greenhouse", "transport": "uart", "port": peer.path}])
    gw = GatewayProcess(config, recorder)
    recorder.wait("pico/greenhouse/status", "online")  # port open: from here on nothing may be lost
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: len(sub.got) >= 10, 10, "live readings")
        recorder.close()
        broker.stop()  # SIGTERM: mosquitto saves the subscriber's session
        during_from = peer.seq
        time.sleep(OUTAGE)  # the outage itself is the point of the test
        during_to = peer.seq
        assert during_to - during_from > 10
        broker.start()
        # Keep reading on until live readings flow again, so the backlog and live ones interleave.
        after = len(sub.got)
        wait_for(lambda: any(ts is None for _, _, ts in sub.got[after:]), 30, "live readings after the outage")
        stop_flood.set()
        flooder.join()
        sent = peer.seq
        db = tmp_path / "readings.db"
        wait_for(lambda: len(db_rows(db, "greenhouse")) == sent, 20, "every reading in SQLite")
        rows = db_rows(db, "greenhouse")
        assert [r[3] for r in rows] == list(range(sent))  # every sequence number, once, in order
        text = lambda value: str(value).rstrip("0").rstrip(".")  # noqa: E731  (as the gateway formats it)
        stored_ts = {text(r[1]): str(r[2]) for r in rows}
        received = lambda: {v for _, v, _ in sub.got}  # noqa: E731
        wait_for(lambda: set(stored_ts) <= received(), 30, "every stored reading delivered after the outage")
        duplicates = len(sub.got) - len(received())
        assert duplicates <= 64 + 20, duplicates  # the window, plus half a second: docs/reliability.md
        # Readings published late carry the time they were taken, and those of the outage all came late.
        late = {v: ts for _, v, ts in sub.got if ts is not None}
        assert all(stored_ts[v] == ts for v, ts in late.items())
        outage = {text(r[1]) for r in rows if during_from <= r[3] < during_to}
        assert outage <= set(late)
        wait_for(lambda: all(r[4] == 1 for r in db_rows(db, "greenhouse")), 10, "all marked sent")
    finally:
        stop_flood.set()
        sub.close()
        code = gw.stop()
        broker.stop()
        peer.close()
    assert code == 0  # a clean exit (after the cleanup, so a failure leaks no broker)


def test_qos0_readings_are_all_published_in_order_across_a_broker_restart(tmp_path: Path) -> None:
    """Guarantee 1b: at ``mqtt.readings_qos = 0`` the outbox publishes live readings many
    to a write (``publish_many``); every reading goes out, in order per device, and those
    made while the broker is down go out, late and with their time, when it returns.
    (mosquitto queues QoS 0 for the persistent session only with queue_qos0_messages.)"""
    broker = PrivateBroker(tmp_path / "broker", extra_conf=f"persistence true\npersistence_location {tmp_path}/\n"
                                                           "queue_qos0_messages true\n")
    broker.start()
    sub = SessionSubscriber(broker, "pico/+/sensor/temp")
    store = Store(tmp_path / "r.db")
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "qos0-test", None, report_refusals=False)
    outbox = Outbox(store, mqtt, Topics(), OutboxSettings(qos=0))
    mqtt.start()
    outbox.start()
    got = lambda device: [v for t, v, _ in list(sub.got) if t == f"pico/{device}/sensor/temp"]  # noqa: E731
    try:
        assert mqtt.wait_connected(10)
        now = int(time.time() * 1000)
        for i in range(3000):  # far more than a window: many batches
            outbox.put([(f"d{i % 3}", "temp", float(i), now, i)])
        wait_for(lambda: len(sub.got) >= 3000, 20, "3,000 live readings")
        assert all(got(f"d{d}") == [str(i) for i in range(d, 3000, 3)] for d in range(3))
        assert all(ts is None for _, _, ts in sub.got)  # live: no time property
        broker.stop()
        wait_for(lambda: not mqtt.connected.is_set(), 10, "the gateway to notice")
        for i in range(3000, 3300):
            outbox.put([(f"d{i % 3}", "temp", float(i), now + i, i)])
        wait_for(lambda: outbox.stats["stored"] == 3300, 10, "readings stored while the broker is down")
        broker.start()
        wait_for(lambda: len(sub.got) >= 3300, 30, "the outage's readings after the broker returns")
        assert all(got(f"d{d}") == [str(i) for i in range(d, 3300, 3)] for d in range(3))
        assert all(ts == str(now + int(v)) for _, v, ts in sub.got[3000:])  # late, with their time
        wait_for(lambda: all(row[4] == 1 for row in db_rows(tmp_path / "r.db", "d0")), 10, "all marked sent")
    finally:
        outbox.stop()
        mqtt.stop()
        store.close()
        sub.close()
        broker.stop()


def test_a_reading_mqtt_cannot_carry_holds_up_nothing(tmp_path: Path, broker, recorder: Recorder,
                                                       caplog: pytest.LogCaptureFixture,
                                                       request: pytest.FixtureRequest) -> None:
    """A metric name with a wildcard (a link that let one through) cannot be a topic:
    such readings stay in the database, are counted and logged once, and every other
    reading, in the backlog and live, at QoS 0 and 1, goes out as usual."""
    store = Store(tmp_path / "r.db")
    request.addfinalizer(store.close)
    now = int(time.time() * 1000)
    store.commit([("d", "a+b", 1.0, now, 0), ("d", "temp", 1.0, now, 1)])  # a backlog: bad, then good
    # Per pass: temp messages received so far (the backlog's 1, then 4 live each pass),
    # and the readings counted unpublishable (the backlog's one, in the first pass only).
    expected = {0: (5, 5), 1: (9, 4)}
    for qos, (received, unpublishable) in expected.items():
        mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), f"bad-topic-{qos}", None,
                              report_refusals=qos > 0)
        outbox = Outbox(store, mqtt, Topics(), OutboxSettings(qos=qos))
        mqtt.start()
        outbox.start()
        try:
            assert mqtt.wait_connected(10)
            for i in range(2, 6):
                outbox.put([("d", "a+b", float(i), now + i, i), ("d", "temp", float(i), now + i, i)])
            wait_for(lambda received=received: len(recorder.on("pico/d/sensor/temp")) == received, 10,
                     "the good readings")
            assert outbox.stats["unpublishable"] == unpublishable
        finally:
            outbox.stop()
            mqtt.stop()
    got = recorder.on("pico/d/sensor/temp")  # (the backlog's "1" may come before or after live ones)
    assert sorted(got[:5]) == ["1", "2", "3", "4", "5"] and got[5:] == ["2", "3", "4", "5"]
    assert len(db_rows(tmp_path / "r.db", "d", "a+b")) == 9  # kept
    assert caplog.text.count("cannot publish to 'pico/d/sensor/a+b'") == 2  # once per outbox


def test_a_qos0_message_a_reconnect_found_unwritten_is_published_again(tmp_path: Path) -> None:
    # paho marks QoS 0 messages still queued at a reconnect as published with rc
    # CONN_LOST (so that wait_for_publish returns). Hard to time from outside (it needs the
    # outbox to stall across the reconnect's backoff), so this checks the rule directly, on the
    # outbox's private state (and paho's own marking of a message, as its network loop does it).
    store = Store(tmp_path / "r.db")
    outbox = Outbox(store, MqttConnection(MqttConfig(), "unit", None), Topics(), OutboxSettings(qos=0))
    written, lost = paho.MQTTMessageInfo(1), paho.MQTTMessageInfo(2)
    lost.rc = paho.MQTT_ERR_CONN_LOST
    for info in (written, lost):
        info._set_as_published()  # noqa: SLF001 -- the rule, directly (see above)
    outbox._inflight.update({10: written, 11: lost, 12: lost})  # noqa: SLF001 -- (as above)
    outbox._backlog_from = None  # noqa: SLF001 -- (as above)
    outbox._resolve_acks()  # noqa: SLF001 -- (as above)
    assert outbox._done == {10} and not outbox._inflight  # noqa: SLF001 -- (as above)
    assert outbox._backlog_from == 10  # noqa: SLF001 -- the next scan starts after row 10: 11 and 12 go out again
    store.close()


def proc_counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_replugged_serial_pico_reopens_without_leaks(tmp_path: Path, broker, recorder: Recorder) -> None:
    """Guarantee 2: a serial Pico that disappears and comes back (even on another pty,
    behind a stable path like /dev/serial/by-id) is reopened by itself; no fd or
    thread leaks over several cycles."""
    by_id = tmp_path / "usb-MicroPython_Board_in_FS_mode_e6614c311b7e6f35-if00"
    peer = PicogwPeer("desk")
    by_id.symlink_to(peer.path)
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "desk", "transport": "usb", "port": str(by_id)}])
    gw = GatewayProcess(config, recorder)
    try:
        recorder.wait("pico/desk/status", "online")
        peer.reading(temp=1)
        recorder.wait("pico/desk/sensor/temp", "1")
        baseline = proc_counts(gw.proc.pid)
        for cycle in range(1, 4):
            statuses = len(recorder.on("pico/desk/status"))
            peer.close()
            by_id.unlink()
            wait_for(lambda statuses=statuses: recorder.on("pico/desk/status")[statuses:] == ["offline"], 10, "offline")
            peer = PicogwPeer("desk")  # a new pty: a different /dev/pts number
            by_id.symlink_to(peer.path)
            wait_for(lambda statuses=statuses: recorder.on("pico/desk/status")[statuses:] == ["offline", "online"],
                     15, "online again")
            peer.reading(temp=cycle + 1)
            recorder.wait("pico/desk/sensor/temp", str(cycle + 1))
        assert proc_counts(gw.proc.pid) == baseline
    finally:
        gw.stop()
        peer.close()


def test_sigkill_during_a_burst_then_restart(tmp_path: Path, broker, recorder: Recorder) -> None:
    """Guarantee 3: after kill -9 the database opens cleanly, and every stored reading
    reaches the broker at least once after the restart, with bounded duplicates."""
    peer = PicogwPeer("burst")
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "burst", "transport": "uart", "port": peer.path}])
    gw = GatewayProcess(config, recorder)
    killed = 3000  # readings sent to the gateway that is killed (values 0 .. killed - 1)
    for i in range(killed):
        peer.reading(temp=i)
    wait_for(lambda: len(recorder.on("pico/burst/sensor/temp")) > 100, 10, "the burst under way")
    gw.proc.kill()
    gw.proc.wait()
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    mark = recorder.mark("pico/burst/status")
    gw2 = GatewayProcess(config, recorder)
    try:
        # Bytes that reach a serial port before it is opened are lost, on a Pi too: wait for the link.
        recorder.wait_new("pico/burst/status", "online", mark)
        for i in range(killed, killed + 100):
            peer.reading(temp=i)
        wait_for(lambda: (rows := db_rows(db, "burst")) and rows[-1][1] == killed + 99 and all(r[4] == 1 for r in rows),
                 20, "everything stored marked sent after the restart")
        stored = {int(r[1]) for r in db_rows(db, "burst")}
        # The broker acknowledged them all; delivery to the subscriber can lag a little behind.
        wait_for(lambda: stored <= {int(v) for v in recorder.on("pico/burst/sensor/temp")}, 10,
                 "every stored reading at the subscriber")
        got = Counter(int(v) for v in recorder.on("pico/burst/sensor/temp"))
        # Duplicates: only readings the killed gateway had published (those in flight, and
        # those acknowledged in the last half second, whose marks died with it) go out
        # again, once each; the restarted gateway's own readings go out once.
        assert max(got.values()) <= 2
        assert all(value < killed for value, n in got.items() if n == 2)
        assert len(stored) == len(db_rows(db, "burst"))  # and none in the database
    finally:
        gw2.stop()
        peer.close()


def test_sigterm_stops_within_5_s_and_flushes(tmp_path: Path, broker, recorder: Recorder) -> None:
    """Guarantee 4: SIGTERM stops within 5 s, stores and publishes what it holds,
    publishes offline statuses, exits 0."""
    peer = PicogwPeer("calm")
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "calm", "transport": "uart", "port": peer.path}])
    gw = GatewayProcess(config, recorder)
    recorder.wait("pico/calm/status", "online")
    for i in range(500):
        peer.reading(temp=i)
    wait_for(lambda: recorder.on("pico/calm/sensor/temp"), 10, "readings flowing")
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(5) == 0
    assert time.monotonic() - started < 5
    recorder.wait("pico/calm/status", "offline")
    recorder.wait("pico/bridge/testgw/status", "offline")
    rows = db_rows(tmp_path / "readings.db", "calm")
    received = {int(v) for v in recorder.wait("pico/calm/sensor/temp", count=len(rows))}
    assert received == {int(r[1]) for r in rows}
    assert all(r[4] == 1 for r in rows)
    gw.log.close()
    peer.close()


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_database_refusing_writes_holds_readings_then_recovers(tmp_path: Path, broker, recorder: Recorder,
                                                               caplog, fault: str) -> None:
    """Guarantee 5: a full disk or read-only database: a clear error, readings held in
    memory up to a bound, everything stored and published when writes work again.
    The fault is injected inside SQLite (max_page_count gives SQLITE_FULL exactly as a
    full disk does; query_only gives SQLITE_READONLY)."""
    store = Store(tmp_path / "r.db")
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "outbox-test",
                          ("pico/bridge/t/status", "offline"))
    outbox = Outbox(store, mqtt, Topics(), OutboxSettings(memory_rows=150))
    mqtt.start()
    assert mqtt.wait_connected(10)
    outbox.start()
    try:
        outbox.put([("d", "temp", 1.0, 1, 0)])
        recorder.wait("pico/d/sensor/temp", "1")
        # (a real full disk needs a mount a test cannot make)
        store._set_fault(*(("max_page_count", 0) if fault == "full" else ("query_only", 1)))  # noqa: SLF001 -- the store's fault hook
        for i in range(2, 402):
            outbox.put([("d", "temp", float(i), i, i), ("d", "pad", float(i) * 1e9 + 0.123456789, i, i)])
        wait_for(lambda: outbox.stats["store_errors"] >= 1, 10, "the store error")
        wait_for(lambda: outbox.stats["dropped_memory_full"] > 0, 10, "the memory bound")
        wait_for(lambda: any("cannot write to" in r.message for r in caplog.records), 5, "the error logged")
        assert recorder.on("pico/d/sensor/temp") == ["1"]  # nothing published before it is stored
        store._set_fault(*(("max_page_count", 1073741823) if fault == "full" else ("query_only", 0)))  # noqa: SLF001 -- (as above)
        # Recovered: every reading is stored or counted dropped (the bound held it out of memory).
        wait_for(lambda: len(db_rows(tmp_path / "r.db", "d")) + len(db_rows(tmp_path / "r.db", "d", "pad"))
                 + outbox.stats["dropped_memory_full"] == 1 + 2 * 400, 10, "recovery")
        dropped = outbox.stats["dropped_memory_full"]
        kept = 2 * 400 - dropped  # readings of both metrics that fitted in memory
        wait_for(lambda: len(recorder.on("pico/d/#")) == 1 + kept, 10, "the held readings published")
        assert recorder.on("pico/d/sensor/temp")[-1] == "401"  # the newest were kept; the oldest dropped
    finally:
        outbox.stop()
        mqtt.stop()
        store.close()


def test_backlog_bound_keeps_rows_but_stops_publishing_the_oldest(tmp_path: Path, broker, recorder: Recorder) -> None:
    """Guarantee 6: past the backlog bound the oldest unpublished readings are not
    published; they stay in the database, and the count is logged and reported."""
    store = Store(tmp_path / "r.db")
    old = int((time.time() - 3 * 3600) * 1000)
    store.commit([("d", "temp", float(i), old + i, i) for i in range(3000)])  # 3 h old, never sent
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "bound-test",
                          ("pico/bridge/t/status", "offline"))
    outbox = Outbox(store, mqtt, Topics(), OutboxSettings(max_backlog_rows=1000, max_backlog_age_s=7200))
    mqtt.start()
    assert mqtt.wait_connected(10)
    outbox.start()
    try:
        outbox.put([("d", "temp", -1.0, int(time.time() * 1000), None)])
        recorder.wait("pico/d/sensor/temp", "-1")
        wait_for(lambda: outbox.stats["backlog_expired"] == 3000, 10, "the old backlog expired")
        assert recorder.on("pico/d/sensor/temp") == ["-1"]
        assert len(db_rows(tmp_path / "r.db", "d")) == 3001  # nothing deleted
    finally:
        outbox.stop()
        mqtt.stop()
        store.close()


def test_backlog_of_a_device_removed_from_the_config_is_still_published(tmp_path: Path, broker,
                                                                        recorder: Recorder) -> None:
    """Unsent readings of a device that left the config (between two runs) are published
    all the same: they were stored for a device that existed."""
    store = Store(tmp_path / "readings.db")
    store.commit([("retired", "temp", 7.5, int(time.time() * 1000), 1)])
    store.close()
    config = write_config(tmp_path / "gw.toml", broker, [])
    gw = GatewayProcess(config, recorder)
    try:
        recorder.wait("pico/retired/sensor/temp", "7.5")
        wait_for(lambda: db_rows(tmp_path / "readings.db", "retired")[0][4] == 1, 10, "marked sent")
    finally:
        gw.stop()


def test_mqtt_network_thread_survives_an_error_in_its_loop(broker: PrivateBroker, recorder: Recorder,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # The gateway drives paho from its own thread: a bug met there (here: in a hook run
    # after each round of I/O) is counted, logged once, and the connection carries on.
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "loop-test", None)
    rounds: list[int] = []

    def flaky() -> None:
        rounds.append(1)
        if len(rounds) <= 2:
            raise RuntimeError("a bug in a hook")

    mqtt.after_io(flaky)
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        wait_for(lambda: mqtt.stats["loop_errors"] == 2, 5, "both errors counted")
        assert mqtt.publish("pico/x/status", "online", qos=1)
        recorder.wait("pico/x/status", "online")
        assert mqtt.alive()
        assert caplog.text.count("error in the MQTT network loop (survived") == 1
    finally:
        mqtt.stop()
    assert not mqtt.alive()
