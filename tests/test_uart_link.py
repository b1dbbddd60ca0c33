"""The uart link in-process: what it counts, and that it survives what the wire throws."""

from __future__ import annotations

import threading

import pytest

from gateway.links.base import LedCommand
from gateway.links.uart import UartConfig, UartLink
from mqtt_helpers import wait_for
from peers import PicogwPeer


class Events:
    """A LinkEvents that records what the link reports."""

    def __init__(self) -> None:
        self.readings: list[tuple[str, list[tuple[str, float]], int | None]] = []
        self.leds: list[bool] = []
        self.online: list[bool] = []
        self.lock = threading.Lock()

    def reading(self, device, values, ts_ms, seq) -> None:
        with self.lock:
            self.readings.append((device, values, seq))

    def led_state(self, device, on) -> None:
        self.leds.append(on)

    def availability(self, device, online) -> None:
        self.online.append(online)


@pytest.fixture
def setup():
    peer = PicogwPeer("greenhouse")
    events = Events()
    link = UartLink(UartConfig(id="greenhouse", transport="uart", port=peer.path, command_timeout=1), events)
    link.start()
    yield peer, events, link
    link.stop()
    peer.close()


def test_drops_are_counted_and_good_frames_pass(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online == [True], 5, "online after the hello")
    peer.send(b"random garbage\n$R,0,temp=1*deadbeef\n$R,0,temp=1,*00\n$" + b"x" * 300 + b"\n")
    peer.reading(temp=5.5, bogus="nan")
    wait_for(lambda: events.readings, 5, "the good reading")
    assert events.readings == [("greenhouse", [("temp", 5.5)], 0)]
    s = link.stats
    assert (s["noise"], s["corrupt"], s["malformed"], s["overlong"], s["bad_values"]) == (1, 1, 1, 1, 1)


def test_sequence_gaps_and_resets_are_counted(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    peer.reading(temp=1)       # seq 0 (the hello said 0)
    peer.seq = 5
    peer.reading(temp=2)       # 4 frames lost on the wire
    peer.seq = 0
    peer.reading(temp=3)       # went back without a hello: the Pico restarted
    wait_for(lambda: len(events.readings) == 3, 5, "three readings")
    assert link.stats["seq_gaps"] == 4
    assert link.stats["seq_resets"] == 1


def test_commands_get_their_own_answers(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    assert link.set_led(LedCommand.ON) is True
    assert link.set_led(LedCommand.TOGGLE) is False
    ids = [f.number for f in peer.commands if f.fields and f.fields[0][0] == "led"]
    assert len(set(ids)) == 2 and 0 not in ids
