"""The gateway's parts share one lifecycle (gateway/features.py): started in order, stopped
in reverse, each stop removing the hooks its part added, bounded, and unable to keep the
others from stopping.

Real parts: a private mosquitto, the daemon's own assembly (gateway.daemon.assemble) on a
real SQLite file, a uart device whose port is not there (every command is refused with an
answer), and a Recorder playing the broker's other clients.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from mqtt_helpers import Broker, Recorder, wait_for

from gateway.config import parse_config
from gateway.daemon import Gateway, assemble
from gateway.features import Feature, Lifecycle, Part, Step
from gateway.store import Store

HELLO = '{"proto": 1, "fw": "0.1.0", "metrics": ["temp"]}'


def gateway(broker: Broker, tmp_path: Path) -> tuple[Gateway, Store]:
    config = parse_config({
        "gateway_id": "lc", "adopt_wifi_picos": True, "diagnostics_interval": 3600,
        "mqtt": {"host": broker.host, "port": broker.port}, "store": {"path": str(tmp_path / "r.db")},
        "devices": [{"id": "porch", "transport": "uart", "port": str(tmp_path / "ttyUSB0")}]})
    store = Store(config.store.path)
    return assemble(config, store), store


def test_after_the_parts_stop_their_topics_have_no_effect(broker: Broker, recorder: Recorder,
                                                          tmp_path: Path) -> None:
    gw, store = gateway(broker, tmp_path)
    mqtt, bridge = gw.mqtt, gw.bridge
    features = gw.parts[1:]  # all but the connection, which stays up to hear what follows
    probes: list[bytes] = []
    mqtt.subscribe("test/probe", lambda topic, payload, retained: probes.append(payload))
    mqtt.start()
    lifecycle = Lifecycle(4.0)
    try:
        assert mqtt.wait_connected(10)
        lifecycle.start(features)
        discovery = next(p for p in features if p.name == "discovery")

        def poke(device: str) -> None:
            """A command, a hello of an unknown Pico, Home Assistant's birth, a refresh request,
            another gateway's claim: each something a running part answers."""
            recorder.publish("pico/porch/cmd/led", "on")
            recorder.publish(f"pico/{device}/hello", HELLO)
            recorder.publish("homeassistant/status", "online")
            recorder.publish("pico/bridge/lc/diagnostics/refresh", "")
            recorder.publish("pico/porch/owner", f"other-{device}")

        def heard(probe: str) -> None:
            """Everything published before the probe has been handled once the probe arrives
            (one publisher, one subscription session: in order, on one network thread)."""
            recorder.publish("test/probe", probe)
            wait_for(lambda: probe.encode() in probes, 10, f"probe {probe}")

        wait_for(lambda: recorder.last("pico/bridge/lc/status") == "online", 10, "the gateway online")
        poke("stray")
        heard("running")
        wait_for(lambda: len(recorder.on("pico/porch/result/led")) == 1, 10, "the command's answer")
        assert "stray" in bridge.links
        assert discovery.stats["republish_requests"] == 1  # type: ignore[attr-defined]
        assert bridge.stats["diagnostics_refresh_requests"] == 1 and bridge.stats["owner_conflicts"] == 1

        lifecycle.stop()
        answers = len(recorder.on("pico/porch/result/led"))
        poke("late")
        heard("stopped")
        assert "late" not in bridge.links  # not adopted
        assert discovery.stats["republish_requests"] == 1  # type: ignore[attr-defined]
        assert bridge.stats["diagnostics_refresh_requests"] == 1 and bridge.stats["owner_conflicts"] == 1
        assert mqtt.stats["callback_errors"] == 0  # (a command reaching the stopped bridge's workers raised)
        recorder.publish("test/probe", "again")  # the last chance for a late answer to show up
        wait_for(lambda: b"again" in probes, 10, "the second probe")
        assert len(recorder.on("pico/porch/result/led")) == answers  # no answer: nothing heard the command
    finally:
        lifecycle.stop()
        mqtt.stop()
        store.close()


def test_the_stop_publishes_the_final_state_before_the_connection_closes(broker: Broker, recorder: Recorder,
                                                                         tmp_path: Path) -> None:
    gw, store = gateway(broker, tmp_path)
    gw.lifecycle.start(gw.parts)
    try:
        wait_for(lambda: recorder.last("pico/bridge/lc/status") == "online", 10, "the gateway online")
        wait_for(lambda: recorder.last("pico/porch/owner"), 10, "the claim on porch")
    finally:
        gw.lifecycle.stop()
        store.close()
    # A clean stop sends no will: "offline" is there only if it went out before the DISCONNECT.
    recorder.wait("pico/bridge/lc/status", "offline", timeout=10)
    final = [m for m in recorder.messages if m.topic in ("pico/bridge/lc/diagnostics", "pico/porch/status",
                                                          "pico/porch/owner", "pico/bridge/lc/status")]
    order = [m.topic for m in final][-4:]
    assert order == ["pico/bridge/lc/diagnostics", "pico/porch/status", "pico/porch/owner",
                     "pico/bridge/lc/status"], order  # counters, the device's last words, then ours
    assert json.loads(final[-4].payload)["health"]["state"] == "stopped"
    assert recorder.last("pico/porch/status") == "offline" and recorder.last("pico/porch/owner") == ""


class Failing(Feature):
    name = "failing"

    def stop(self) -> None:
        raise RuntimeError("a bug in a feature's stop")


def test_a_stop_that_raises_or_hangs_does_not_keep_the_others_from_stopping(
        broker: Broker, recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw, store = gateway(broker, tmp_path)
    stuck = threading.Event()
    hanging = Step("hanging", lambda: None, stuck.wait)
    parts: list[Part] = [gw.parts[0], Failing(), *gw.parts[1:], hanging]  # the connection first, as ever
    lifecycle = Lifecycle(1.0)
    lifecycle.start(parts)
    try:
        wait_for(lambda: recorder.last("pico/bridge/lc/status") == "online", 10, "the gateway online")
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="gateway.features"):
            lifecycle.stop()
        took = time.monotonic() - began
    finally:
        stuck.set()
        store.close()
    recorder.wait("pico/bridge/lc/status", "offline", timeout=10)  # the connection, stopped after both
    assert recorder.last("pico/porch/status") == "offline"
    assert took < 1.0 + 2 * 0.5, took  # the hanging stop was left behind within the budget
    assert lifecycle.stats == {"stops_abandoned": 1, "stop_failures": 1}
    assert any("hanging did not stop within" in m for m in caplog.messages)
    assert any("stopping failing failed (the others still stop): RuntimeError" in m for m in caplog.messages)


def test_a_connect_hook_added_while_connected_runs_for_that_connection_once(broker: Broker) -> None:
    """A part that starts after the connection is up (the daemon starts the connection first)
    still announces itself: its hook runs for the connection in place, once."""
    from gateway.config import MqttConfig
    from gateway.mqtt import MqttConnection

    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "late-hook", None)
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        runs: list[str] = []
        mqtt.on_connect(lambda: runs.append(threading.current_thread().name))
        wait_for(lambda: runs, 5, "the late hook's run")
        heard: list[bytes] = []
        mqtt.subscribe("test/late", lambda topic, payload, retained: heard.append(payload))
        mqtt.publish("test/late", "x", qos=1)  # (after our SUBSCRIBE, on the same connection)
        wait_for(lambda: heard, 5, "a message on the late subscription")
        assert runs == ["mqtt"]  # once, on the network thread, like every connect hook
    finally:
        mqtt.stop()
