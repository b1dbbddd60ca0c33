"""A UART Pico end to end: readings reach MQTT and SQLite, cmd/led reaches the Pico.

The gateway runs as a real process (``python -m gateway run``) against a real
mosquitto; the Pico is a peer on a pseudo-terminal.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mqtt_helpers import Broker, Recorder, wait_for
from peers import PicogwPeer, TutorialPeer

from gateway.payloads import CommandResult, check


@pytest.fixture
def pico():
    peer = PicogwPeer("greenhouse")
    yield peer
    peer.close()


def rows(db: Path, device: str = "greenhouse") -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT metric, value, ts, seq FROM readings WHERE device=? ORDER BY id",
                            (device,)).fetchall()


def test_readings_are_stored_then_published_in_order(pico, start_gateway, recorder: Recorder, tmp_path: Path) -> None:
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    # The gateway asks who is there; the peer answers with a hello (LED off).
    recorder.wait("pico/greenhouse/status", "online")
    recorder.wait("pico/greenhouse/state/led", "off")
    before = time.time() * 1000
    for value in (21.5, 21.75, -3.0):
        pico.reading(temp=value, uptime=12)
    assert recorder.wait("pico/greenhouse/sensor/temp", count=3) == ["21.5", "21.75", "-3"]
    assert recorder.wait("pico/greenhouse/sensor/uptime", count=3) == ["12"] * 3
    stored = rows(tmp_path / "readings.db")
    assert [(m, v, s) for m, v, _, s in stored if m == "temp"] == [("temp", 21.5, 0), ("temp", 21.75, 1),
                                                                    ("temp", -3.0, 2)]
    assert all(before - 1000 <= ts <= time.time() * 1000 for _, _, ts, _ in stored)
    assert recorder.last("pico/greenhouse/state/led") == "off"  # from the hello; nothing was switched


def test_mosquitto_pub_switches_the_led(pico, start_gateway, recorder: Recorder, broker: Broker) -> None:
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port),
                    "-t", "pico/greenhouse/cmd/led", "-m", "on"], check=True, timeout=10)
    recorder.wait("pico/greenhouse/state/led", "on")
    assert pico.led is True
    result = json.loads(recorder.wait("pico/greenhouse/result/led")[0])
    check(CommandResult, result)
    assert result == {"ok": True, "command": "on", "state": "on", "error": None}
    # The state is retained: a client that subscribes later still learns it.
    late = Recorder(broker, topics=["pico/greenhouse/state/led"])
    try:
        late.wait("pico/greenhouse/state/led", "on")
    finally:
        late.close()


@pytest.mark.parametrize("payload, led", [("OFF", False), ("toggle", True), ("1", True), ("false", False),
                                          (" True\n", True)])
def test_every_accepted_spelling(pico, start_gateway, recorder: Recorder, payload: str, led: bool) -> None:
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    recorder.publish("pico/greenhouse/cmd/led", payload)
    recorder.wait("pico/greenhouse/result/led")
    assert pico.led is led


def test_refused_commands_are_answered_and_never_reach_the_pico(pico, start_gateway, recorder: Recorder) -> None:
    gw = start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    for bad in ("maybe", "__import__('os').system('touch /tmp/pwned')", "x" * 500, b"\xff\xfe"):
        recorder.publish("pico/greenhouse/cmd/led", bad)
    answers = [json.loads(a) for a in recorder.wait("pico/greenhouse/result/led", count=4)]
    assert all(a["ok"] is False and a["error"] for a in answers)
    assert "expected on, off, toggle" in answers[0]["error"]
    # A device this gateway does not own: it subscribes to its own devices' command
    # topics only, so it never even receives this one (and answers nothing).
    recorder.publish("pico/nosuch/cmd/led", "on")
    # A retained command would replay on every reconnect: refused.
    recorder.publish("pico/greenhouse/cmd/led", "on", retain=True)
    recorder.wait("pico/greenhouse/result/led", count=5)
    assert recorder.on("pico/nosuch/#") == ["on"]  # the command itself, and no answer
    assert not recorder.on("pico/bridge/testgw/rejected")
    recorder.publish("pico/greenhouse/cmd/led", "", retain=True)  # clear it from the broker
    assert not [c for c in pico.commands if c.fields and c.fields[0][0] == "led"]
    assert pico.led is False
    assert gw.proc.poll() is None
    assert "refused" in gw.output()


def test_a_pico_that_never_answers_gets_a_timeout(pico, start_gateway, recorder: Recorder) -> None:
    pico.mute = True
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path, "command_timeout": 0.5}],
                  wait_online=False)
    wait_for(lambda: pico.commands, 10, "the port opened (the gateway's hello request)")
    recorder.publish("pico/greenhouse/cmd/led", "on")
    answer = json.loads(recorder.wait("pico/greenhouse/result/led")[0])
    assert answer["ok"] is False and "no answer" in answer["error"]
    assert recorder.on("pico/greenhouse/state/led") == []


def test_garbage_and_corrupt_frames_are_skipped(pico, start_gateway, recorder: Recorder, tmp_path: Path) -> None:
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    recorder.wait("pico/greenhouse/status", "online")  # the port is open: nothing written is flushed
    pico.send(b"\x00\x13garbage \xff\xfe\n")
    pico.send(b"$R,0,temp=99.9*00000000\n")  # wrong CRC
    pico.send(b"$" + b"9" * 500 + b"\n")  # overlong
    pico.reading(temp=20.25)
    assert recorder.wait("pico/greenhouse/sensor/temp") == ["20.25"]
    assert [v for _, v, _, _ in rows(tmp_path / "readings.db")] == [20.25]


def test_unplugged_pico_goes_offline(start_gateway, recorder: Recorder) -> None:
    peer = PicogwPeer("greenhouse")
    start_gateway([{"id": "greenhouse", "transport": "uart", "port": peer.path}])
    recorder.wait("pico/greenhouse/status", "online")
    peer.close()
    recorder.wait("pico/greenhouse/status", "offline")


def test_sigterm_publishes_offline_and_exits_zero(pico, start_gateway, recorder: Recorder) -> None:
    gw = start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    recorder.wait("pico/greenhouse/status", "online")
    assert gw.stop() == 0
    recorder.wait("pico/greenhouse/status", "offline")
    recorder.wait("pico/bridge/testgw/status", "offline")


class TestTutorialFirmware:
    @pytest.fixture
    def tut(self):
        peer = TutorialPeer()
        yield peer
        peer.close()

    def test_on_off_and_toggle(self, tut, start_gateway, recorder: Recorder) -> None:
        start_gateway([{"id": "porch", "transport": "uart", "port": tut.path, "protocol": "tutorial"}])
        recorder.wait("pico/porch/status", "online")
        recorder.publish("pico/porch/cmd/led", "on")
        recorder.wait("pico/porch/state/led", "on")
        assert bytes(tut.received) == b"led_on\r"
        recorder.publish("pico/porch/cmd/led", "toggle")
        recorder.wait("pico/porch/state/led", "off")
        assert bytes(tut.received) == b"led_on\rled_off\r"
        assert tut.led is False

    def test_toggle_before_any_answer_is_refused(self, tut, start_gateway, recorder: Recorder) -> None:
        start_gateway([{"id": "porch", "transport": "uart", "port": tut.path, "protocol": "tutorial"}])
        recorder.publish("pico/porch/cmd/led", "toggle")
        answer = json.loads(recorder.wait("pico/porch/result/led")[0])
        assert answer["ok"] is False and "cannot toggle" in answer["error"]
        assert tut.received == b""

    def test_silent_pico_times_out_and_goes_offline(self, tut, start_gateway, recorder: Recorder) -> None:
        tut.mute = True
        start_gateway([{"id": "porch", "transport": "uart", "port": tut.path, "protocol": "tutorial",
                        "command_timeout": 0.5}])
        recorder.publish("pico/porch/cmd/led", "on")
        answer = json.loads(recorder.wait("pico/porch/result/led")[0])
        assert answer["ok"] is False and "no answer" in answer["error"]
        assert "may still carry the command out later" in answer["error"]  # the program takes no deadline
        recorder.wait("pico/porch/status", "offline")
        mark = recorder.mark("pico/porch/status")
        tut.mute = False
        recorder.publish("pico/porch/cmd/led", "on")
        recorder.wait_new("pico/porch/status", "online", mark)
        recorder.wait("pico/porch/state/led", "on")


def test_a_retained_command_left_on_the_broker_does_not_switch_at_start(pico, broker: Broker, recorder: Recorder,
                                                                       start_gateway) -> None:
    recorder.publish("pico/greenhouse/cmd/led", "on", retain=True)
    try:
        start_gateway([{"id": "greenhouse", "transport": "uart", "port": pico.path}])
        answer = json.loads(recorder.wait("pico/greenhouse/result/led")[0])
        assert answer["ok"] is False and "retained" in answer["error"]
        recorder.wait("pico/greenhouse/state/led", "off")
        assert pico.led is False
    finally:
        recorder.publish("pico/greenhouse/cmd/led", "", retain=True)


def test_seq_gaps_count_on_across_a_restart(pico, broker: Broker, recorder: Recorder, tmp_path: Path) -> None:
    # Readings lost a run ago still show after a restart: seq_gaps is kept in the database.
    from conftest import GatewayProcess, write_config

    config = write_config(tmp_path / "gw.toml", broker, [{"id": "greenhouse", "transport": "uart", "port": pico.path}])
    for run in (1, 2):
        mark = recorder.mark("pico/greenhouse/status")
        gw = GatewayProcess(config, recorder)
        try:
            recorder.wait_new("pico/greenhouse/status", "online", mark)
            pico.reading(temp=run)
            pico.seq += 2  # two readings lost on the wire
            pico.reading(temp=run + 0.5)
            recorder.wait("pico/greenhouse/sensor/temp", str(run + 0.5))
        finally:
            assert gw.stop() == 0  # (the diagnostics at stop, retained)
        wait_for(lambda run=run: json.loads(recorder.last("pico/greenhouse/diagnostics") or "{}").get("seq_gaps")
                 == 2 * run,
                 10, f"seq_gaps {2 * run} after run {run}")
