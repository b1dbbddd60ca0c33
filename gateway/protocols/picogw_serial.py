"""The gateway's side of a picogw conversation over a serial port (docs/protocol.md §1).

Turns hello/reading/state frames into events, keeps the sequence accounting
(gaps, resets), answers liveness with pings, and sends LED commands, matching
each answer to its command by id.

Two things keep the shown state true at the protocol's edges:

* a Pico that restarted without its hello reaching us (seen from the sequence
  numbers), or whose frames were lost, is asked for a hello: it carries the
  LED's state;
* a command carries a deadline on the Pico's own clock (``exp=``, learned from
  the ``t=`` its hello and answers carry), so a Pico that was stuck while the
  command waited in its buffer refuses it instead of carrying it out after the
  gateway has answered that it failed. Firmware that sends no ``t=`` gets
  commands without a deadline, and a timeout then says they may still happen.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING

from gateway.links.base import MAY_STILL_HAPPEN, CommandError, LedCommand, PendingAnswers, now_ms
from gateway.links.serial_link import SerialLink, SerialSession
from gateway.protocols.picogw import Frame, FrameReceiver, encode

if TYPE_CHECKING:
    from gateway.store import Row

SEQ_MOD = 1 << 32
MAX_GAP = 10_000  # frames: a sequence number further ahead is a restart or corruption, not that many losses
T_MOD = 1 << 30  # the Pico's t= clock (milliseconds) wraps here: docs/protocol.md
CLOCK_RESYNC = 60.0  # seconds: a Pico's clock is asked again (a ping) when the last t= is older (drift)
CLOCK_MAX_AGE = 120.0  # seconds: older than this, a command first asks for a fresh t= (a ping)
ANSWER_MARGIN = 1.0  # seconds (at most half the command timeout) between the Pico's deadline and the gateway's:
# an answer sent just before the deadline still arrives before the gateway gives up
HELLO_RETRY = 1.0  # seconds between requests for a hello until one comes
HELLO_TRIES = 5  # requests before giving up (counted: hellos_unanswered) until the next reason to ask
REMEMBERED_IDS = 256  # command ids kept to tell a late answer from a stray one


def _signed_t(delta: int) -> int:
    """A difference on the t clock, in -2**29 .. 2**29 - 1."""
    return (delta + T_MOD // 2) % T_MOD - T_MOD // 2


class PicoClock:
    """What the gateway knows of one Pico's ``t=`` clock: its offset from our monotonic
    clock, from the frames that carried it.

    Each sample is a lower bound of the true offset (the Pico wrote ``t`` before we
    read the frame), so the largest recent one is kept: an answer that sat in a buffer
    never makes deadlines earlier than they should be. A hello restarts the estimate
    (the Pico may have restarted), and so does a sample once the kept one is older
    than CLOCK_RESYNC (the two clocks drift apart)."""

    def __init__(self) -> None:
        self._offset: int | None = None  # Pico t minus our monotonic ms, mod T_MOD
        self._at = 0.0  # monotonic time of the kept sample

    def sample(self, t: int, at: float, restart: bool = False) -> None:
        offset = (t - int(at * 1000)) % T_MOD
        if (restart or self._offset is None or at - self._at > CLOCK_RESYNC
                or _signed_t(offset - self._offset) > 0):
            self._offset, self._at = offset, at

    def forget(self) -> None:
        self._offset = None

    def age(self, now: float) -> float | None:
        """Seconds since the kept sample; None when the clock is not known."""
        return None if self._offset is None else now - self._at

    def deadline(self, at: float) -> int | None:
        """Our monotonic time ``at`` on the Pico's t clock (None when not known)."""
        if self._offset is None:
            return None
        return (int(at * 1000) + self._offset) % T_MOD


def _remember(ids: dict[int, None], cid: int) -> None:
    ids[cid] = None
    if len(ids) > REMEMBERED_IDS:
        del ids[next(iter(ids))]  # the oldest (dicts keep insertion order)


class PicogwSerialSession(SerialSession):
    def __init__(self, link: SerialLink) -> None:
        super().__init__(link)
        self.rx = FrameReceiver()
        self.rx.counts = link.stats  # drops and good frames are counted on the link
        self.answers = PendingAnswers()
        self._next_id = 0
        self._id_lock = threading.Lock()  # ids, and the two records of what they were for
        self._commands: dict[int, None] = {}  # ids of LED commands sent and not answered in time (yet)
        self._own: dict[int, None] = {}  # ids of the gateway's own hello and ping requests
        # Kept across reopening the port: frames the Pico sent meanwhile were lost, and are counted.
        self._expected_seq: int | None = None
        self._last_rx = time.monotonic()
        self._rx_ms = now_ms()
        self._last_ping = 0.0
        self.clock = PicoClock()
        self.deadlines: bool | None = None  # the firmware takes exp= (it sends t=); None: not known yet
        self._hello_due: float | None = None  # monotonic time to ask for a hello (again); None: not wanted
        self._hello_tries = 0
        self._last_hello_request = -HELLO_RETRY
        self._last_clock_ping = 0.0
        self._hello_said: tuple[str | None, str] | None = None  # (firmware, metrics) of the last hello logged

    # -- the serial thread -----------------------------------------------
    def connected(self) -> None:
        self.rx = FrameReceiver()
        self.rx.counts = self.link.stats
        self._last_rx = time.monotonic()
        # Ask who is there and the LED's state; changes nothing on the Pico.
        self._ask_hello(at_once=True)

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
            self._send("ping")
        if self._hello_due is not None and now >= self._hello_due:
            if self._hello_tries >= HELLO_TRIES:
                self._hello_due = None
                self.link.stats["hellos_unanswered"] += 1
            else:
                self._request_hello(now)
        if self.deadlines and now - self._last_clock_ping > CLOCK_RESYNC:
            age = self.clock.age(now)
            if age is None or age > CLOCK_RESYNC:  # keep the Pico's clock known between commands
                self._last_clock_ping = now
                self._send("ping")

    def disconnected(self) -> None:
        self.clock.forget()  # the Pico may restart before the port opens again

    def _ask_hello(self, at_once: bool = False) -> None:
        """Ask for a hello, and again every HELLO_RETRY seconds until one comes. Not more
        often than that (unless ``at_once``: the port has just opened): a link losing frame
        after frame costs a hello a second at most."""
        if self._hello_due is not None and not at_once:
            return  # asked already, and no hello since
        self._hello_tries = 0
        now = time.monotonic()
        if at_once or now - self._last_hello_request >= HELLO_RETRY:
            self._request_hello(now)
        else:
            self._hello_due = self._last_hello_request + HELLO_RETRY  # (poll sends it)

    def _request_hello(self, now: float) -> None:
        self._hello_tries += 1
        self._hello_due = now + HELLO_RETRY
        self._last_hello_request = now
        self._send("hello")

    def _on_hello(self, frame: Frame) -> None:
        expected = self._expected_seq
        if expected is not None and frame.number != expected:
            self._seq_jump(expected, frame.number)  # (a restart's unasked hello: an older number)
        self._expected_seq = frame.number
        self._hello_due = None  # what a hello was asked for is here
        self._clock_from(frame, restart=True)
        self.link.stats["hellos"] += 1
        dev = frame.get("dev")
        # The firmware cuts ids longer than a field value (32 bytes).
        if dev and not self.link.device.startswith(dev):
            self.link.stats["id_mismatch"] += 1
            self.link.log.warning("the Pico calls itself %r; using the configured id %r", dev, self.link.device)
        metrics = "|".join(v for k, v in frame.fields if k == "metrics" and v)  # may span several fields
        said = (frame.get("fw"), metrics)
        if said != self._hello_said:  # (hellos asked for after lost frames may come every second)
            self._hello_said = said
            self.link.log.info("hello: firmware %s, metrics %s", *said)
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
        self._clock_from(frame)
        self._led_from(frame)  # (a late answer's state is the LED's state all the same)
        if self.answers.resolve(frame.number, frame):
            return
        with self._id_lock:
            late = self._commands.pop(frame.number, 0) is None
            own = self._own.pop(frame.number, 0) is None
        if late:
            self.link.stats["late_answers"] += 1  # a command's, after it timed out
        elif not own:
            self.link.stats["unmatched_answers"] += 1  # an id we never sent, or long forgotten

    def _account_seq(self, seq: int) -> None:
        expected = self._expected_seq
        self._expected_seq = (seq + 1) % SEQ_MOD
        if expected is not None and seq != expected:
            self._seq_jump(expected, seq)
            self._ask_hello()  # lost frames may have said the LED changed, and a restart switched it off

    def _seq_jump(self, expected: int, seq: int) -> None:
        """Count a sequence number other than the one expected: frames lost (a few ahead),
        a restart of the Pico (behind), or a jump too far ahead to be losses."""
        ahead = (seq - expected) % SEQ_MOD
        if ahead <= MAX_GAP:
            self.link.stats["seq_gaps"] += ahead
            return
        self.link.stats["seq_resets" if ahead >= SEQ_MOD // 2 else "seq_jumps"] += 1
        self.clock.forget()  # a restarted Pico's clock started again

    def _clock_from(self, frame: Frame, restart: bool = False) -> None:
        """A hello or an answer says whether the firmware has a t= clock, and its time."""
        raw = frame.get("t")
        t = int(raw) if raw is not None and raw.isdigit() and len(raw) <= 10 else T_MOD
        if t < T_MOD:
            self.deadlines = True
            self.clock.sample(t, self._last_rx, restart)
        else:  # older firmware (or a broken t=): commands go without a deadline
            self.deadlines = False
            self.clock.forget()

    def _led_from(self, frame: Frame) -> None:
        led = frame.get("led")
        if led in ("on", "off"):
            self.link.events.led_state(self.link.device, led == "on")

    _handlers = {"H": _on_hello, "S": _on_state, "A": _on_answer, "N": _on_answer}

    # -- ids, from either thread ------------------------------------------
    def _new_id(self, record: dict[int, None] | None) -> int:
        with self._id_lock:
            cid = self._next_id = self._next_id % 65535 + 1
            self._commands.pop(cid, None)  # (ids wrap: whatever this id was for before is long over)
            self._own.pop(cid, None)
            if record is not None:
                _remember(record, cid)
            return cid

    def _send(self, key: str) -> None:
        """Fire-and-forget (hello, ping), from the serial thread: never blocks; a failure
        shows up as silence (and a count), not an error."""
        self.link.write_nowait(encode("C", self._new_id(self._own), [(key, None)]))

    # -- command worker thread --------------------------------------------
    def _exchange(self, fields: list[tuple[str, str | None]], until: float,
                  record: dict[int, None] | None) -> Frame | None:
        """Send one command and wait for its answer until monotonic ``until``; None if none came."""
        cid = self._new_id(record)
        self.answers.expect(cid)
        try:
            self.link.write(encode("C", cid, fields))
        except CommandError:
            self.answers.forget(cid)
            raise
        answer = self.answers.wait(cid, max(0.0, until - time.monotonic()))
        if answer is not None and record is not None:
            with self._id_lock:
                record.pop(cid, None)  # answered in time: an answer with this id later is a stray
        assert answer is None or isinstance(answer, Frame)
        return answer

    def set_led(self, command: LedCommand) -> bool:
        timeout = self.link.config.command_timeout
        now = time.monotonic()
        until = now + timeout
        if self.deadlines is not False:
            age = self.clock.age(now)
            if age is None or age > CLOCK_MAX_AGE:
                # Learn the Pico's clock (and whether it has one) first: a ping's answer carries it.
                if self._exchange([("ping", None)], until, self._own) is None:
                    self.link.stats["command_timeouts"] += 1
                    raise CommandError(f"no answer from the Pico within {timeout:g} s (not sent: the Pico "
                                       f"did not answer a ping first)")
        # The Pico may carry the command out until a margin before we give up, never later.
        pico_deadline = self.clock.deadline(until - min(ANSWER_MARGIN, timeout / 2)) if self.deadlines else None
        fields: list[tuple[str, str | None]] = [("led", command.value)]
        if pico_deadline is not None:
            fields.append(("exp", str(pico_deadline)))
        answer = self._exchange(fields, until, self._commands)
        if answer is None:
            self.link.stats["command_timeouts"] += 1
            if pico_deadline is None:
                raise CommandError(f"no answer from the Pico within {timeout:g} s; {MAY_STILL_HAPPEN}")
            raise CommandError(f"no answer from the Pico within {timeout:g} s; the command has expired: "
                               f"the Pico will not carry it out later")
        if answer.type == "N":
            err = answer.get("err") or "no reason given"
            if pico_deadline is not None and err == "expired":
                self.link.stats["commands_expired"] += 1
                raise CommandError("the Pico read the command after its deadline and did not carry it out")
            if pico_deadline is not None and err == "bad-value":
                # We send only good LED words: what it refused is the deadline, from a clock it no longer has.
                self.clock.forget()
                raise CommandError("the Pico refused the command's deadline (its clock is not the one the "
                                   "gateway knew: it restarted?); not carried out, send it again")
            raise CommandError(f"the Pico refused the command: {err}")
        led = answer.get("led")
        if led not in ("on", "off"):
            raise CommandError(f"the Pico answered without an LED state: {answer.fields!r}")
        return led == "on"
