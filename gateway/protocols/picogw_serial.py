"""The gateway's side of a picogw conversation over a serial port (docs/protocol.md §1).

Turns hello/reading/state frames into events, keeps the sequence accounting
(gaps, resets), answers liveness with pings, and sends LED commands, matching
each answer to its command by id.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING

from gateway.links.base import CommandError, LedCommand, PendingAnswers, now_ms
from gateway.links.serial_link import SerialLink, SerialSession
from gateway.protocols.picogw import Frame, FrameReceiver, encode

if TYPE_CHECKING:
    from gateway.store import Row

SEQ_MOD = 1 << 32


class PicogwSerialSession(SerialSession):
    def __init__(self, link: SerialLink) -> None:
        super().__init__(link)
        self.rx = FrameReceiver()
        self.rx.counts = link.stats  # drops and good frames are counted on the link
        self.answers = PendingAnswers()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._expected_seq: int | None = None
        self._last_rx = time.monotonic()
        self._rx_ms = now_ms()
        self._last_ping = 0.0

    # -- the serial thread -----------------------------------------------
    def connected(self) -> None:
        self.rx = FrameReceiver()
        self.rx.counts = self.link.stats
        self._last_rx = time.monotonic()
        # Ask who is there and the LED's state; changes nothing on the Pico.
        self._send("hello", None)

    def received(self, data: bytes) -> None:
        frames = self.rx.feed(data)
        if not frames:
            return
        self._last_rx = time.monotonic()
        self._rx_ms = now_ms()  # the frames of one read share its time
        self.link.set_online(True, "frames arriving")
        rows: list[Row] = []  # the readings of this read, handed on in one call
        handlers = self._handlers
        try:
            for frame in frames:
                if frame.type == "R":
                    self._on_reading(frame, rows)
                    continue
                if rows:  # (rare: a state or an answer among readings) keep the Pico's order
                    self.link.events.readings(self.link.device, rows)
                    rows = []
                handler = handlers.get(frame.type)
                if handler is None:
                    self.link.stats["unknown_type"] += 1
                else:
                    handler(self, frame)
        finally:  # a handler that raised loses none of the readings before it
            if rows:
                self.link.events.readings(self.link.device, rows)

    def poll(self, now: float) -> None:
        cfg = self.link.config
        idle = now - self._last_rx
        if idle > cfg.offline_after:
            self.link.set_online(False, f"no frame for {cfg.offline_after:g} s")
        if idle > cfg.heartbeat and now - self._last_ping > cfg.heartbeat:
            self._last_ping = now
            self._send("ping", None)

    def disconnected(self) -> None:
        self._expected_seq = None

    def _on_hello(self, frame: Frame) -> None:
        expected = self._expected_seq
        if expected is not None and (expected - frame.number) % SEQ_MOD < SEQ_MOD // 2 and frame.number != expected:
            self.link.stats["seq_resets"] += 1  # an unasked hello with an older number: the Pico restarted
        self._expected_seq = frame.number
        self.link.stats["hellos"] += 1
        dev = frame.get("dev")
        # The firmware cuts ids longer than a field value (32 bytes).
        if dev and not self.link.device.startswith(dev):
            self.link.stats["id_mismatch"] += 1
            self.link.log.warning("the Pico calls itself %r; using the configured id %r", dev, self.link.device)
        metrics = "|".join(v for k, v in frame.fields if k == "metrics" and v)  # may span several fields
        self.link.log.info("hello: firmware %s, metrics %s", frame.get("fw"), metrics)
        self.link.events.firmware(self.link.device, frame.get("fw") or "")
        self._led_from(frame)

    def _on_reading(self, frame: Frame, rows: list[Row]) -> None:
        number = frame.number
        self._account_seq(number)
        device, ts = self.link.device, self._rx_ms
        for key, raw in frame.fields:
            try:
                value = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):  # (TypeError: a key without a value)
                value = math.nan
            if not math.isfinite(value):
                self.link.stats["bad_values"] += 1
                continue
            rows.append((device, key, value, ts, number))

    def _on_state(self, frame: Frame) -> None:
        self._account_seq(frame.number)
        self._led_from(frame)

    def _on_answer(self, frame: Frame) -> None:
        self._led_from(frame)
        if not self.answers.resolve(frame.number, frame):
            self.link.stats["late_answers"] += 1  # timed out already, or a ping's

    def _account_seq(self, seq: int) -> None:
        expected = self._expected_seq
        if expected is not None and seq != expected:
            ahead = (seq - expected) % SEQ_MOD
            if ahead < SEQ_MOD // 2:
                self.link.stats["seq_gaps"] += ahead
            else:
                self.link.stats["seq_resets"] += 1
        self._expected_seq = (seq + 1) % SEQ_MOD

    def _led_from(self, frame: Frame) -> None:
        led = frame.get("led")
        if led in ("on", "off"):
            self.link.events.led_state(self.link.device, led == "on")

    _handlers = {"H": _on_hello, "S": _on_state, "A": _on_answer, "N": _on_answer}

    # -- command worker thread --------------------------------------------
    def _new_id(self) -> int:
        with self._id_lock:
            self._next_id = self._next_id % 65535 + 1
            return self._next_id

    def _send(self, key: str, value: str | None) -> None:
        """Fire-and-forget (hello, ping), from the serial thread: never blocks; a failure
        shows up as silence (and a count), not an error."""
        self.link.write_nowait(encode("C", self._new_id(), [(key, value)]))

    def set_led(self, command: LedCommand) -> bool:
        cid = self._new_id()
        self.answers.expect(cid)
        try:
            self.link.write(encode("C", cid, [("led", command.value)]))
        except CommandError:
            self.answers.forget(cid)
            raise
        answer = self.answers.wait(cid, self.link.config.command_timeout)
        if answer is None:
            self.link.stats["command_timeouts"] += 1
            raise CommandError(f"no answer from the Pico within {self.link.config.command_timeout:g} s")
        assert isinstance(answer, Frame)
        if answer.type == "N":
            raise CommandError(f"the Pico refused the command: {answer.get('err') or 'no reason given'}")
        led = answer.get("led")
        if led not in ("on", "off"):
            raise CommandError(f"the Pico answered without an LED state: {answer.fields!r}")
        return led == "on"
