"""Health means progress, and a link never dies of a bug (gateway/progress.py).

Real parts: a private mosquitto, a real MqttConnection, Bridge, Outbox and SQLite file,
a uart link on a pseudo-terminal, an i2c link on a register map faked at the bus (the
machine has no I2C bus), and the gateway as a process. A loop is frozen in-process by
holding a lock its next turn needs, or by blocking in a hook it calls.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from peers import Events, PicogwPeer
from test_i2c_link import RegisterBus

import gateway.diagnostics as diagnostics
import gateway.links.i2c as i2c
from gateway.bridge import Bridge
from gateway.cli import main
from gateway.config import MqttConfig
from gateway.links.i2c import I2cConfig, I2cLink
from gateway.links.serial_reactor import REACTOR
from gateway.links.uart import UartConfig, UartLink
from gateway.mqtt import MqttConnection
from gateway.payloads import BridgeDiagnostics, check
from gateway.progress import Heartbeat
from gateway.simulator.i2c_bus import decode_request
from gateway.store import Store
from gateway.systemd import Notifier, Watchdog, gateway_health
from gateway.topics import Topics

SLACK = 2.0  # seconds: the tests' bounds are short (the gateway's are at least 10 s), not tight


# -- a poll that raises something other than OSError --------------------------------------------

class FaultyBus(RegisterBus):
    """The register map, whose bus raises ``fault`` (not an OSError) while it is set."""

    fault: Exception | None = None

    def i2c_rdwr(self, write, read) -> None:
        if self.fault is not None:
            raise self.fault
        super().i2c_rdwr(write, read)


def test_a_polling_link_survives_any_exception_counts_it_logs_once_and_comes_back(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    bus = FaultyBus([b"temp"])
    monkeypatch.setattr(i2c, "open_bus", lambda number: bus)
    events = Events()
    link = I2cLink(I2cConfig(id="cellar", transport="i2c", poll_interval=0.02), events)
    link.start()
    try:
        wait_for(lambda: events.online[-1:] == [True], 5, "online")
        bus.fault = RuntimeError("a bug in the bus driver")
        wait_for(lambda: link.stats["internal_errors"] >= 3, 10, "three failed polls, counted")
        assert events.online[-1] is False and link.alive()
        bus.fault = None
        bus.memory[0x08:0x0C] = bus.memory[0x3C:0x40] = struct.pack("<I", 8)  # a new snapshot
        wait_for(lambda: events.online[-1:] == [True] and len(events.got) >= 2, 10, "back online, reading again")
    finally:
        link.stop()
    logged = [r for r in caplog.records if "error while polling" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once, with its traceback


class FakeI2cTarget:
    """One I2C target on the simulator's bus wire format (gateway/simulator/i2c_bus.py):
    a Unix socket the gateway's SimulatedSMBus talks to, serving a register map. While
    ``broken``, it answers with an empty response, on which the controller side raises
    IndexError: a bug below the link, not an OSError."""

    def __init__(self, path: Path, names: list[bytes]) -> None:
        self.bus = RegisterBus(names)
        self.broken = threading.Event()
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self, seq: int) -> None:
        self.bus.memory[0x08:0x0C] = self.bus.memory[0x3C:0x40] = struct.pack("<I", seq)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    size = struct.unpack("<I", self._exact(conn, 4))[0]
                    msgs = decode_request(self._exact(conn, size))
                    if self.broken.is_set():
                        conn.sendall(struct.pack("<I", 0))
                        continue
                    register, data = 0, bytearray()
                    for _, read, payload in msgs:
                        if read:
                            data += self.bus.memory[register:register + payload]
                        elif payload:
                            register = payload[0]
                            for i, value in enumerate(payload[1:]):
                                self.bus.memory[register + i] = value
                    conn.sendall(struct.pack("<I", 1 + len(data)) + b"\0" + bytes(data))
            except (OSError, ConnectionError):
                return

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def close(self) -> None:
        self.server.close()


def test_the_gateway_keeps_polling_a_device_whose_bus_raises_a_bug_and_it_comes_back_online(
        tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    target = FakeI2cTarget(tmp_path / "0x43.sock", [b"temp"])
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "cellar", "transport": "i2c", "bus": str(target.path),
                                                          "poll_interval": 0.1}], diagnostics_interval=1)
    gw = GatewayProcess(config, recorder)
    try:
        recorder.wait("pico/cellar/status", "online", timeout=15)
        recorder.wait("pico/cellar/sensor/temp", "21.5")
        mark = recorder.mark("pico/cellar/status")
        target.broken.set()
        recorder.wait_new("pico/cellar/status", "offline", mark)

        def internal_errors() -> int:
            last = recorder.last("pico/cellar/diagnostics")
            return json.loads(last)["counters"].get("internal_errors", 0) if last else 0

        wait_for(lambda: internal_errors() >= 3, 20, "three failed polls, counted in the diagnostics")
        mark = recorder.mark("pico/cellar/status")
        readings = recorder.mark("pico/cellar/sensor/temp")
        target.broken.clear()
        target.snapshot(8)
        recorder.wait_new("pico/cellar/status", "online", mark, timeout=90)  # (after a backoff of up to 60 s)
        wait_for(lambda: len(recorder.on("pico/cellar/sensor/temp")) > readings, 10, "a reading after the fault")
    finally:
        code = gw.stop()
        target.close()
    assert code == 0
    assert gw.output().count("error while polling") == 1  # logged once, however often it happened
    assert "IndexError" in gw.output()


# -- one MQTT handler raising ------------------------------------------------------------------

def test_one_raising_handler_does_not_keep_a_message_from_the_others(
        broker: Broker, recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes] = []

    def broken(topic: str, payload: bytes, retained: bool) -> None:
        raise RuntimeError("a bug in a handler")

    recorder.publish("pico/shed/cmd/led", "on", retain=True)  # delivered at subscribe: no race with it
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "handlers-test", None)
    mqtt.subscribe("pico/+/cmd/led", broken)
    mqtt.subscribe("pico/shed/cmd/led", lambda topic, payload, retained: got.append(payload))
    mqtt.start()
    try:
        wait_for(lambda: b"on" in got, 10, "the retained message, in the second handler")
        recorder.publish("pico/shed/cmd/led", "off")
        recorder.publish("pico/shed/cmd/led", "toggle")
        wait_for(lambda: b"toggle" in got, 10, "both live messages, in the second handler")
        # (mosquitto sends a copy per matching subscription: each copy reaches both handlers)
        assert set(got) == {b"on", b"off", b"toggle"} and mqtt.stats["callback_errors"] == len(got)
    finally:
        mqtt.stop()
    logged = [r for r in caplog.records if r.name == "gateway.mqtt" and r.exc_info is not None]
    assert len(logged) == 1 and "broken" in logged[0].getMessage()  # once per handler and kind


# -- a loop that stops turning -----------------------------------------------------------------

class Gateway:
    """The daemon's parts in-process: MQTT, the bridge and its outbox, a uart link on a pty
    (the serial thread) and an i2c link (its own polling thread), with the health the
    watchdog asks, the diagnostics that publish it, and short bounds."""

    def __init__(self, broker: Broker, tmp_path: Path, bus: RegisterBus) -> None:
        self.mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "freeze-test",
                                   ("pico/bridge/t/status", "offline"))
        self.store = Store(tmp_path / "readings.db")
        self.bridge = Bridge("t", Topics(), self.store, self.mqtt)
        self.peer = PicogwPeer("porch")
        self.porch = UartLink(UartConfig(id="porch", transport="uart", port=self.peer.path), self.bridge)
        self.cellar = I2cLink(I2cConfig(id="cellar", transport="i2c", poll_interval=0.05, command_timeout=0.1),
                              self.bridge)
        self.bridge.add(self.porch)
        self.bridge.add(self.cellar)
        self.health = gateway_health(self.mqtt, self.bridge)
        self.diagnostics = diagnostics.Diagnostics(self.bridge, interval=3600, log_health=True)
        self.outbox = self.bridge.outbox
        self.outbox.heartbeat.expected = 0.5  # its longest wait when the disk is well
        for heartbeat in self.bridge.heartbeats():
            heartbeat.slack = SLACK
        self.hooks: list[Callable[[], None]] = []
        self.mqtt.after_io(lambda: [hook() for hook in self.hooks])

    def start(self) -> None:
        self.mqtt.start()
        assert self.mqtt.wait_connected(10)
        self.bridge.start()
        self.diagnostics.start()

    def stop(self) -> None:
        self.diagnostics.stop()
        self.bridge.stop()
        self.mqtt.stop()
        self.store.close()
        self.peer.close()


@pytest.fixture
def gateway(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    bus = RegisterBus([b"temp"])
    monkeypatch.setattr(i2c, "open_bus", lambda number: bus)
    monkeypatch.setattr(diagnostics, "HEALTH_CHECK", 0.1)
    gw = Gateway(broker, tmp_path, bus)
    gw.start()
    yield gw
    gw.stop()


def freeze_mqtt(gw: Gateway, release: threading.Event) -> None:
    gw.hooks.append(lambda: release.wait())  # an after-I/O hook that blocks


# A loop is frozen by holding the private lock its next turn needs: no public call stalls a
# loop, and a stall from outside (a slow disk, a stuck port) cannot be timed from a test.

def hold(lock: threading.Lock, release: threading.Event) -> None:
    assert lock.acquire(timeout=5)
    threading.Thread(target=lambda: (release.wait(), lock.release()), daemon=True).start()


def freeze_outbox(gw: Gateway, release: threading.Event) -> None:
    # The store's lock, which the outbox's next commit needs; a reading makes it commit.
    hold(gw.store._lock, release)  # noqa: SLF001 -- see hold()
    gw.bridge.reading("cellar", [("temp", 20.0)], 1, None)


def freeze_serial(gw: Gateway, release: threading.Event) -> None:
    hold(REACTOR._lock, release)  # noqa: SLF001 -- the lock the serial thread takes at the start of every turn


def freeze_link(gw: Gateway, release: threading.Event) -> None:
    # The link's lock, which its next poll needs (as a command that never ends would hold it).
    hold(gw.cellar._lock, release)  # noqa: SLF001 -- see hold()


@pytest.mark.parametrize("loop, freeze", [("mqtt", freeze_mqtt), ("outbox", freeze_outbox),
                                          ("serial", freeze_serial), ("link-cellar", freeze_link)])
def test_a_frozen_loop_makes_the_gateway_unhealthy_naming_it_until_it_turns_again(
        gateway: Gateway, recorder: Recorder, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        tmp_path: Path, broker: Broker, loop: str, freeze: Callable[[Gateway, threading.Event], None]) -> None:
    gw = gateway
    wait_for(lambda: gw.health() == (True, ""), 10, "healthy at first")
    sent: list[str] = []

    class Recording(Notifier):
        def notify(self, *fields: str) -> bool:
            sent.extend(fields)
            return True

    watchdog = Watchdog(Recording(env={"NOTIFY_SOCKET": "/nonexistent"}), gw.health, interval=30)
    assert watchdog.tick() and sent == ["WATCHDOG=1"]
    if loop != "mqtt":  # (a frozen MQTT loop cannot publish that it is frozen)
        recorder.wait("pico/bridge/t/diagnostics", timeout=15)
    release = threading.Event()
    try:
        freeze(gw, release)
        wait_for(lambda: f"the {loop} loop has not turned for" in gw.health()[1], 15, f"the {loop} loop stalled")
        sent.clear()
        assert not watchdog.tick() and "WATCHDOG=1" not in sent
        assert any(f.startswith(f"STATUS=unhealthy: the {loop} loop has not turned for") for f in sent), sent
        wait_for(lambda: any(r.name == "gateway.diagnostics" and f"the {loop} loop" in r.getMessage()
                             for r in caplog.records), 15, "the stall logged")
        if loop != "mqtt":
            def published_stall() -> dict | None:
                last = recorder.last("pico/bridge/t/diagnostics")
                health = json.loads(last)["health"] if last else {}
                return health if health.get("loops", {}).get(loop, {}).get("stalled") else None

            health = wait_for(published_stall, 15, "the stall in the bridge's diagnostics")
            check(BridgeDiagnostics, json.loads(recorder.last("pico/bridge/t/diagnostics")))
            assert health["state"] == "unhealthy" and health["problem"].startswith(f"the {loop} loop")
            config = write_config(tmp_path / "status.toml", broker, [], gateway_id="t")
            assert main(["status", "--config", str(config)]) == 0
            assert f"health: unhealthy: the {loop} loop has not turned for" in capsys.readouterr().out
    finally:
        release.set()
    wait_for(lambda: gw.health() == (True, ""), 15, "healthy again once it turns")
    sent.clear()
    assert watchdog.tick() and sent[-1] == "WATCHDOG=1" and "STATUS=running" in sent
    wait_for(lambda: json.loads(recorder.last("pico/bridge/t/diagnostics") or "{}").get("health", {}).get("state")
             == "healthy", 15, "healthy again in the bridge's diagnostics")
    # Without systemd's watchdog the diagnostics log it: once for the spell, and its end.
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.diagnostics"]
    assert sum(m.startswith(f"unhealthy: the {loop} loop has not turned for") for m in logged) == 1, logged
    assert logged[-1] == "healthy again"


def test_a_heartbeat_is_judged_against_what_each_turn_expects() -> None:
    beat = Heartbeat("link-shed", expected=1.0)
    assert beat.stall() is None and beat.report()["idle_s"] is None  # not started: not judged
    beat.beat()
    now = time.monotonic()
    assert beat.stall(now + 10.9) is None  # a 1 s turn: at least 10 s of slack
    assert str(beat.stall(now + 11.5)).startswith("the link-shed loop has not turned for 11.5 s (bound 11.0 s)")
    beat.beat(expected=60.0)  # before a 60 s backoff: asleep on purpose, not stalled
    now = time.monotonic()
    assert beat.stall(now + 119) is None and beat.stall(now + 121) is not None  # twice what it expects
