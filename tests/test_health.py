"""Health means progress, and a link never dies of a bug.

Real parts: a private mosquitto, a real MqttConnection, an i2c link on a register map
faked at the bus (the machine has no I2C bus), and the gateway as a process.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest

import gateway.links.i2c as i2c
from conftest import GatewayProcess, write_config
from gateway.config import MqttConfig
from gateway.links.i2c import I2cConfig, I2cLink
from gateway.mqtt import MqttConnection
from gateway.simulator.i2c_bus import decode_request
from mqtt_helpers import Broker, Recorder, wait_for
from peers import Events
from test_i2c_link import RegisterBus


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
