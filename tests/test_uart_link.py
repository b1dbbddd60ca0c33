"""The uart link in-process: what it counts, and that it survives what the wire throws."""

from __future__ import annotations

import threading

import pytest
from mqtt_helpers import wait_for
from peers import Events, PicogwPeer, unopened_uart_link

from gateway.domain import CommandError, LedCommand
from gateway.links.uart import UartConfig, UartLink
from gateway.protocols import picogw_serial
from gateway.protocols.picogw import encode


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
    wait_for(lambda: events.got, 5, "the good reading")
    assert events.got == [("greenhouse", "temp", 5.5, 0)]
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
    wait_for(lambda: len(events.got) == 3, 5, "three readings")
    assert link.stats["seq_gaps"] == 4
    assert link.stats["seq_resets"] == 1


def test_commands_get_their_own_answers(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    assert link.set_led(LedCommand.ON) is True
    assert link.set_led(LedCommand.TOGGLE) is False
    ids = [f.number for f in peer.commands if f.fields and f.fields[0][0] == "led"]
    assert len(set(ids)) == 2 and 0 not in ids


def test_a_pico_that_stops_reading_holds_up_no_other_serial_link() -> None:
    # One thread reads every serial port: it must never wait on a write to a Pico that
    # stopped reading (hung firmware, a full USB buffer).
    stuck, healthy = PicogwPeer("stuck"), PicogwPeer("healthy")
    stuck_events, healthy_events = Events(), Events()
    stuck_link = UartLink(UartConfig(id="stuck", transport="uart", port=stuck.path, heartbeat=0.1), stuck_events)
    healthy_link = UartLink(UartConfig(id="healthy", transport="uart", port=healthy.path), healthy_events)
    stuck_link.start()
    healthy_link.start()
    try:
        wait_for(lambda: stuck_events.online[-1:] == healthy_events.online[-1:] == [True], 5, "both online")
        stuck.deaf.set()
        failed: list[Exception] = []

        def flood() -> None:  # a command worker writing more than the Pico will ever read
            try:
                stuck_link.write(b"x" * 1_000_000)
            except CommandError as exc:
                failed.append(exc)

        writer = threading.Thread(target=flood)
        writer.start()
        wait_for(lambda: stuck_link.stats["writes_skipped"] + stuck_link.stats["writes_cut"], 5,
                 "the stuck Pico's heartbeat ping skipped, not waited for")
        for _ in range(20):
            healthy.reading(temp=21.5)
        wait_for(lambda: len(healthy_events.got) == 20, 5, "the healthy Pico's readings meanwhile")
        assert healthy_link.set_led(LedCommand.ON) is True
        writer.join(10)
        assert failed and "failed" in str(failed[0])  # the worker's write gave up after its timeout
    finally:
        stuck.deaf.clear()
        stuck_link.stop()
        healthy_link.stop()
        stuck.close()
        healthy.close()


class OrderedEvents(Events):
    """Events that also keep one log of readings and LED states, in the order reported."""

    def __init__(self, fail_on_led: bool = False) -> None:
        super().__init__()
        self.log: list[object] = []
        self.fail_on_led = fail_on_led

    def readings(self, device, rows) -> None:
        super().readings(device, rows)
        self.log.extend(row[2] for row in rows)

    def led_state(self, device, on) -> None:
        if self.fail_on_led:
            raise RuntimeError("the bridge failed")
        self.log.append("led on" if on else "led off")


READ = encode("R", 0, [("temp", "1")]) + encode("R", 1, [("temp", "2")]) + encode("S", 2, [("led", "on")]) \
    + encode("R", 3, [("temp", "3")])


def test_one_read_keeps_the_picos_order_of_readings_and_states() -> None:
    # A read's readings go to the bridge in one call, but not past a state between them.
    events = OrderedEvents()
    unopened_uart_link("greenhouse", events).session.received(READ)  # (the serial thread's call)
    assert events.log == [1.0, 2.0, "led on", 3.0]


def test_a_failing_handler_loses_none_of_the_readings_before_it() -> None:
    events = OrderedEvents(fail_on_led=True)
    with pytest.raises(RuntimeError):  # (the serial thread counts it and reopens the port)
        unopened_uart_link("greenhouse", events).session.received(READ)
    assert events.log == [1.0, 2.0]


# -- protocol edges: the state shown stays true ------------------------------------------------

def led_commands(peer: PicogwPeer) -> list:
    return [f for f in peer.commands if f.fields and f.fields[0][0] == "led"]


def test_a_restart_whose_hello_was_lost_is_asked_for_one(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Pico restarted (its LED off) and its hello never arrived: the readings' sequence
    # numbers went back. The gateway asks for a hello, whose led= shows the LED's true state.
    monkeypatch.setattr(picogw_serial, "HELLO_RETRY", 0.05)  # (hellos are asked for a second apart at most)
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    assert link.set_led(LedCommand.ON) is True
    for i in range(5):
        peer.reading(temp=i)
    wait_for(lambda: len(events.got) == 5, 5, "five readings")
    hellos = sum(1 for f in peer.commands if f.fields == (("hello", None),))
    peer.led, peer.seq = False, 0  # the restart; its hello is lost on the wire
    peer.reading(temp=9)
    wait_for(lambda: events.leds[-1:] == [False], 5, "the LED's state from the hello asked for")
    assert sum(1 for f in peer.commands if f.fields == (("hello", None),)) == hellos + 1
    assert link.stats["seq_resets"] == 1 and link.stats["seq_gaps"] == 0


def test_late_answers_are_late_command_answers_only() -> None:
    # The answers to the gateway's own hello and pings are not late; a command's answer
    # after its timeout is, and the result said it may still be carried out (this firmware
    # sends no t=, so the command went without a deadline).
    peer, events = PicogwPeer("greenhouse"), Events()
    link = UartLink(UartConfig(id="greenhouse", transport="uart", port=peer.path, command_timeout=0.3,
                               heartbeat=0.05), events)
    link.start()
    try:
        wait_for(lambda: sum(1 for f in peer.commands if f.fields == (("ping", None),)) >= 3, 5, "pings answered")
        assert link.set_led(LedCommand.ON) is True
        wait_for(lambda: link.stats["frames"] >= 5, 5, "the answers to the hello, the pings and the command")
        assert link.stats["late_answers"] == 0
        peer.mute = True
        with pytest.raises(CommandError, match="within 0.3 s; its firmware takes no deadline, so it may still"):
            link.set_led(LedCommand.OFF)
        command = led_commands(peer)[-1]
        assert command.fields == (("led", "off"),)  # no exp=: this firmware would refuse the frame
        assert link.stats["late_answers"] == 0 and link.stats["unmatched_answers"] == 0
        peer.send(encode("A", command.number, [("led", "off")]))  # it wakes, and carries it out
        wait_for(lambda: link.stats["late_answers"] == 1, 5, "the late answer counted")
        assert events.leds[-1] is False  # and the state shown is what it did
    finally:
        link.stop()
        peer.close()


def test_a_wild_sequence_jump_is_not_two_billion_lost_readings(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    peer.reading(temp=1)
    peer.seq = 2**31 - 5  # corruption, or firmware that numbers otherwise
    peer.reading(temp=2)
    peer.reading(temp=3)
    wait_for(lambda: len(events.got) == 3, 5, "three readings")
    assert link.stats["seq_gaps"] == 0 and link.stats["seq_jumps"] == 1


def test_readings_lost_while_the_port_was_closed_are_counted(setup) -> None:
    peer, events, link = setup
    wait_for(lambda: events.online, 5, "online")
    peer.reading(temp=1)
    wait_for(lambda: events.got, 5, "a reading")
    link.stop()
    peer.seq += 3  # three readings sent while nothing listened
    link.start()
    wait_for(lambda: link.stats["hellos"] == 2, 5, "the hello asked for on reopening")
    assert link.stats["seq_gaps"] == 3 and link.stats["seq_resets"] == 0


def test_a_delayed_answer_never_makes_deadlines_early() -> None:
    # Each t= is a lower bound of the Pico's clock (it was read later than written): one that
    # sat in a buffer must not move deadlines earlier, or a healthy Pico would refuse commands
    # as expired. The least delayed sample is kept; a hello (the Pico may have restarted) starts afresh.
    clock = picogw_serial.PicoClock()
    clock.sample(10_000, at=100.0, restart=True)
    clock.sample(10_500, at=101.0)  # read 500 ms after it was written
    assert clock.deadline(102.0) == 12_000
    clock.sample(12_100, at=102.0)  # less delayed than the first
    assert clock.deadline(102.0) == 12_100
    clock.sample(2**30 - 10, at=200.0, restart=True)
    assert clock.deadline(200.02) == 10  # the Pico's clock wraps at 2**30
    clock.forget()
    assert clock.deadline(200.0) is None and clock.age(200.0) is None
