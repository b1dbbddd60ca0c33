"""tcp (the tutorial's Pico W server) and wifi (a Pico publishing itself) end to end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from mqtt_helpers import Recorder, wait_for
from peers import Events, TutorialTcpPeer

from gateway.domain import CommandError, LedCommand
from gateway.links.tcp import TcpConfig, TcpLink


def test_tcp_tutorial_commands_and_polling(start_gateway, recorder: Recorder) -> None:
    peer = TutorialTcpPeer()
    try:
        start_gateway([{"id": "shed", "transport": "tcp", "host": "127.0.0.1", "port": peer.port,
                        "protocol": "tutorial", "poll_interval": 0.2}])
        recorder.wait("pico/shed/status", "online")
        recorder.wait("pico/shed/state/led", "off")
        recorder.publish("pico/shed/cmd/led", "toggle")
        assert json.loads(recorder.wait("pico/shed/result/led")[0])["state"] == "on"
        assert peer.led is True
        recorder.wait("pico/shed/state/led", "on")
        mark = recorder.mark("pico/shed/state/led")
        peer.led = False  # someone switched it locally: polling notices
        recorder.wait_new("pico/shed/state/led", "off", mark)
        assert set(peer.requests) <= {b"?", b"on", b"off"}  # never 'r' for the tutorial program
        peer.close()
        recorder.wait("pico/shed/status", "offline")
        recorder.publish("pico/shed/cmd/led", "on")
        answer = json.loads(recorder.wait("pico/shed/result/led", count=2)[1])
        assert answer["ok"] is False and "cannot reach" in answer["error"]
    finally:
        peer.close()


def test_a_command_a_stuck_tcp_pico_did_not_answer_is_said_to_be_still_possible() -> None:
    """The tutorial's server takes no deadline: a command it reads after the gateway gave up is
    still carried out, and the answer the user got says it may be."""
    peer = TutorialTcpPeer()
    events = Events()
    link = TcpLink(TcpConfig(id="shed", transport="tcp", host="127.0.0.1", port=peer.port, protocol="tutorial",
                             command_timeout=0.3), events)
    try:
        peer.awake.clear()
        with pytest.raises(CommandError, match="may still carry the command out later"):
            link.set_led(LedCommand.ON)
        peer.awake.set()
        wait_for(lambda: peer.led, 5, "the command carried out late")
        peer.close()
        with pytest.raises(CommandError, match="cannot reach") as refused:  # never sent: nothing to happen later
            link.set_led(LedCommand.OFF)
        assert "may still" not in str(refused.value)
    finally:
        peer.awake.set()
        peer.close()


def test_tcp_picogw_readings(start_gateway, recorder: Recorder, tmp_path: Path) -> None:
    peer = TutorialTcpPeer(readings="temp=21.5 uptime=7 junk=x")
    try:
        start_gateway([{"id": "shed", "transport": "tcp", "host": "127.0.0.1", "port": peer.port,
                        "poll_interval": 0.2}])
        recorder.wait("pico/shed/sensor/temp", "21.5", count=2)
        with sqlite3.connect(tmp_path / "readings.db") as db:
            uptimes = db.execute("SELECT count(*) FROM readings WHERE device='shed' AND metric='uptime'").fetchone()[0]
            assert uptimes >= 2
    finally:
        peer.close()


def test_wifi_pico_readings_are_stored_not_republished(start_gateway, recorder: Recorder, tmp_path: Path) -> None:
    gw = start_gateway([{"id": "balcony", "transport": "wifi"}], wait_online=False)
    # What a wifi Pico publishes, by hand:
    recorder.publish("pico/balcony/status", "online", retain=True)
    recorder.publish("pico/balcony/sensor/temp", "19.25")
    recorder.publish("pico/balcony/sensor/temp", "not-a-number")
    recorder.publish("pico/balcony/cmd/led", "on")

    def stored() -> list:
        with sqlite3.connect(tmp_path / "readings.db") as db:
            return db.execute("SELECT metric, value FROM readings WHERE device='balcony'").fetchall()

    wait_for(lambda: stored() == [("temp", 19.25)], 10, "the wifi reading in SQLite")
    assert recorder.on("pico/balcony/sensor/temp") == ["19.25", "not-a-number"]  # nothing added by the gateway
    assert recorder.on("pico/balcony/result/led") == []  # the Pico handles its own commands
    gw.stop()
    assert recorder.on("pico/balcony/status") == ["online"]  # the gateway never speaks for it
    recorder.publish("pico/balcony/status", "", retain=True)


def test_unknown_wifi_picos_are_adopted_only_when_asked(tmp_path: Path, broker, recorder: Recorder) -> None:
    from conftest import GatewayProcess, write_config

    def stored(db: Path) -> list:
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT device, value FROM readings").fetchall()

    strict = GatewayProcess(write_config(tmp_path / "a.toml", broker, [], "strict", db=tmp_path / "a.db"), recorder,
                            "strict")
    adopting = GatewayProcess(write_config(tmp_path / "b.toml", broker, [], "adopter", db=tmp_path / "b.db",
                                           adopt_wifi_picos=True), recorder, "adopter")
    try:
        recorder.publish("pico/stray/hello", '{"proto": 1, "fw": "0.1.0", "metrics": ["temp"]}', retain=True)
        recorder.publish("pico/impostor/hello", "not json", retain=True)
        wait_for(lambda: "adopted Wi-Fi Pico 'stray'" in adopting.output(), 10, "the adoption")

        def published_and_stored() -> list:
            # (again until one is stored: the adopted link subscribes a moment after it says so,
            # and a reading published before its subscription reaches nobody, as from a real Pico)
            recorder.publish("pico/stray/sensor/temp", "18.5")
            recorder.publish("pico/impostor/sensor/temp", "99")
            return stored(tmp_path / "b.db")
        rows = wait_for(published_and_stored, 10, "the adopted Pico's reading stored")
        assert set(rows) == {("stray", 18.5)}  # the impostor's never
        assert stored(tmp_path / "a.db") == []  # off by default
    finally:
        strict.stop()
        adopting.stop()
        for t in ("pico/stray/hello", "pico/impostor/hello"):
            recorder.publish(t, "", retain=True)
