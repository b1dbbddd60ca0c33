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

With a Pico whose hello says ``ack=`` (docs/protocol.md 1.8) nothing it sends is
lost to a gateway restart or an unplugged cable: the session tells it the time
(``T``), asks it to send again what it keeps (``C,<id>,resend``), takes its
frames strictly in sequence order from the number the answer gives (anything
else comes again: a gap asks for a resend), hands readings on with the Pico's
boot (the store refuses one it has already), and once the store has committed
them says so (``K``, :meth:`stored`, at most once per commit).

One module, past 400 lines, because it is one conversation's state: the sequence
accounting, the Pico's clock, the commands waiting for answers and the acknowledged
stream all follow the same frames in the same order, and each reads what the others
have seen (a resend answer moves the sequence, a hello resets the clock and the acks).
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING

from gateway.domain import MAY_STILL_HAPPEN, CommandError, LedCommand, now_ms
from gateway.protocols.answers import PendingAnswers
from gateway.protocols.picogw import Frame, FrameReceiver, encode
from gateway.protocols.session import ByteLink, SerialSession

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
HOLD_FRAMES = 2000  # frames held after the port opened until a hello says whether the Pico resends
HOLD_TIME = 2.0  # seconds they are held at most (a Pico that never says hello: taken as one that does not)
TIME_EVERY = 60.0  # seconds between T frames to a Pico that keeps frames (its ticks drift, ~50 ppm)
TS_MIN = 946_684_800_000  # 2000-01-01 in Unix ms: a resent frame's ts= before it is not a time
TS_AHEAD = 60_000  # ms: nor one further ahead of the gateway's clock than this
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


def _value(raw: str | None) -> float | None:
    """A reading's value, or None when it is not a finite number (or missing)."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # (TypeError: a key without a value)
        return None
    return value if math.isfinite(value) else None


def _ring_skipped(frame: Frame) -> int:
    """A resent frame's ``lost=`` (just before its ``ts=``): frames its ring dropped right before it."""
    fields = frame.fields
    if len(fields) > 1 and fields[-1][0] == "ts" and fields[-2][0] == "lost":
        raw = fields[-2][1]
        if raw is not None and raw.isdigit() and len(raw) <= 10:
            return int(raw)
    return 0


def _pico_time(raw: str | None, received_ms: int) -> int | None:
    """A resent frame's ``ts=``: the Pico's Unix ms when plausible (it learnt the time from
    a T frame), else None (``0``: it did not know the time)."""
    if raw is None or not raw.isdigit() or len(raw) > 16:
        return None
    ts = int(raw)
    return ts if TS_MIN <= ts <= received_ms + TS_AHEAD else None


def _remember(ids: dict[int, None], cid: int) -> None:
    ids[cid] = None
    if len(ids) > REMEMBERED_IDS:
        del ids[next(iter(ids))]  # the oldest (dicts keep insertion order)


class PicogwSerialSession(SerialSession):
    def __init__(self, link: ByteLink) -> None:
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
        # Acknowledged readings (docs/protocol.md 1.8). acks: None from the port's opening until a
        # hello says whether the Pico keeps frames; meanwhile its frames are held (``_held``).
        self.acks: bool | None = False
        self.boot: int | None = None  # the boot its hello named
        self._held: list[tuple[Frame, int]] = []  # (frame, received at, Unix ms)
        self._held_since = 0.0
        self._synced = False  # acks: frames are taken (from _expected_seq on), the resend's answer came
        self._resend_id: int | None = None
        self._resend_due: float | None = None
        self._last_time = 0.0  # monotonic time of the last T frame
        self._ack_lock = threading.Lock()
        self._ack_due: tuple[int, int] | None = None  # (boot, seq) stored and not yet said (a K frame)

    # -- the serial thread -----------------------------------------------
    def connected(self) -> None:
        self.rx = FrameReceiver()
        self.rx.counts = self.link.stats
        self._last_rx = time.monotonic()
        # Another Pico, or this one restarted, may be there now: hold its frames until it says.
        self.acks, self._synced, self._resend_due = None, False, None
        self._held, self._held_since = [], self._last_rx
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
                if frame.type in "RS" and not self._take(frame):
                    continue
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
        if self.acks is None and self._held and now - self._held_since > HOLD_TIME:
            self._release_held()  # no hello: a Pico that does not keep its frames
        if self.acks:
            if self._resend_due is not None and now >= self._resend_due:
                self._request_resend(now)
            if now - self._last_time > TIME_EVERY:
                self._send_time(now)
            self._send_ack()  # (one the committing thread could not write at once)
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
        self._hello_due = None  # what a hello was asked for is here
        self._clock_from(frame, restart=True)
        self.link.stats["hellos"] += 1
        if self._hello_acks(frame):
            self._expected_seq = None  # the resend's answer says where its frames start
        else:
            if self._held:
                self._release_held()  # (before the hello: they came before it)
            expected = self._expected_seq
            if expected is not None and frame.number != expected:
                self._seq_jump(expected, frame.number)  # (a restart's unasked hello: an older number)
            self._expected_seq = frame.number
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
        device, ts = self.link.device, self._rx_ms
        if self.acks:
            boot = self.boot
            fields = frame.fields
            ts_pico = 0
            if fields and fields[-1][0] == "ts":  # sent late, from the Pico's ring: taken at ts
                pico_ts = _pico_time(fields[-1][1], ts)
                if pico_ts is not None:
                    ts, ts_pico = pico_ts, 1
                fields = fields[:-2] if len(fields) > 1 and fields[-2][0] == "lost" else fields[:-1]
            for key, raw in fields:
                value = _value(raw)
                if value is None:
                    self.link.stats["bad_values"] += 1
                    continue
                rows.append((device, key, value, ts, number, boot, ts_pico))
            return
        self._account_seq(number)
        for key, raw in frame.fields:
            value = _value(raw)
            if value is None:
                self.link.stats["bad_values"] += 1
                continue
            rows.append((device, key, value, ts, number))

    def _on_state(self, frame: Frame) -> None:
        if self.acks:
            if not frame.fields or frame.fields[-1][0] != "ts":  # (a resent one says what the LED was then)
                self._led_from(frame)
            return
        self._account_seq(frame.number)
        self._led_from(frame)

    def _on_answer(self, frame: Frame) -> None:
        self._clock_from(frame)
        self._led_from(frame)  # (a late answer's state is the LED's state all the same)
        if frame.number == self._resend_id:
            self._on_resend_answer(frame)
            return
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

    # -- acknowledged readings (docs/protocol.md 1.8) ----------------------
    def _hello_acks(self, frame: Frame) -> bool:
        """Whether the hello says the Pico keeps its frames until acknowledged; if so, tell
        it the time and ask for what it keeps (frames until then come again)."""
        ring, boot, lost = frame.get("ack"), frame.get("boot"), frame.get("lost")
        if not (ring and ring.isdigit() and int(ring) > 0 and boot and boot.isdigit() and len(boot) <= 10):
            self.acks = False
            return False
        first = self.acks is None and not self._synced and self.boot is None
        if self.boot is not None and int(boot) != self.boot:
            self.link.stats["seq_resets"] += 1  # it restarted: its ring went with the old boot
        self.acks, self.boot, self._synced = True, int(boot), False
        self._held = []  # the Pico keeps them: they come again, in order
        with self._ack_lock:
            self._ack_due = None
        if lost is not None and lost.isdigit():
            self.link.stats["ring_lost"] = int(lost)  # frames its full ring dropped since it started (it counts)
        if first:
            self.link.log.info("the Pico keeps up to %s frames until they are stored, and sends them again", ring)
        now = time.monotonic()
        self._send_time(now)
        self._request_resend(now)
        return True

    def _send_time(self, now: float) -> None:
        if self.link.write_nowait(encode("T", 0, [("now", str(now_ms()))])):
            self._last_time = now

    def _request_resend(self, now: float) -> None:
        self._resend_due = now + HELLO_RETRY  # again, until its answer comes
        self._resend_id = self._new_id(self._own)
        self.link.write_nowait(encode("C", self._resend_id, [("resend", None)]))

    def _on_resend_answer(self, frame: Frame) -> None:
        self._resend_id = None
        start = frame.get("from")
        if frame.type != "A" or not (start and start.isdigit() and int(start) < SEQ_MOD):
            self.link.stats["resend_refused"] += 1
            self._resend_due = time.monotonic() + HELLO_RETRY
            return
        self._resend_due = None
        self._synced = True
        self._expected_seq = int(start)
        count = frame.get("n")
        if count and count.isdigit() and int(count):
            self.link.stats["resends"] += 1

    def _take(self, frame: Frame) -> bool:
        """Whether an R or S frame goes on now (the serial thread, in the order received).
        Before a hello says what the Pico is, frames are held; with acks, only the next
        one in sequence is taken: an older one is one the Pico sent again, a newer one
        comes after a gap (frames lost on the wire), which a resend fills."""
        acks = self.acks
        if acks is None:
            if len(self._held) >= HOLD_FRAMES:
                self._release_held()
                return True
            if not self._held:
                self._held_since = time.monotonic()
            self._held.append((frame, self._rx_ms))
            return False
        if not acks:
            return True
        if not self._synced:
            return False  # the Pico sends it again after the resend's answer
        seq, expected = frame.number, self._expected_seq
        if seq == expected:
            self._expected_seq = (seq + 1) % SEQ_MOD
            return True
        assert expected is not None
        skipped = _ring_skipped(frame)
        if skipped and (seq - expected) % SEQ_MOD == skipped:
            # The Pico's full ring dropped the frames before this one (it reads faster than it
            # can send them again): they are gone, and counted there (ring_lost) and here.
            self.link.stats["ring_skipped"] += skipped
            self._expected_seq = (seq + 1) % SEQ_MOD
            return True
        if (seq - expected) % SEQ_MOD >= SEQ_MOD // 2:
            # Behind: only a Pico that restarted, and whose hello was lost, sends that.
            self.link.stats["seq_resets"] += 1
            self._synced = False
            self._ask_hello()
        else:
            self.link.stats["resend_requests"] += 1
            self._synced = False
            self._request_resend(time.monotonic())
        return False

    def _release_held(self) -> None:
        """Frames held since the port opened go on as from a Pico that does not resend."""
        held, self._held = self._held, []
        rows: list[Row] = []
        rx_ms = self._rx_ms
        try:
            for frame, self._rx_ms in held:
                if frame.type == "R":
                    self._on_reading(frame, rows)
                else:
                    self._on_state(frame)
        finally:
            self._rx_ms = rx_ms
            if rows:
                self.link.events.readings(self.link.device, rows)

    def stored(self, rows: list[Row]) -> None:
        """The store committed these rows of this device (or had them already): say so to
        the Pico, one K frame for the newest of its boot. Any thread; never blocks."""
        boot = self.boot
        if boot is None:
            return
        for row in reversed(rows):
            if len(row) > 5 and row[5] == boot and row[4] is not None:
                with self._ack_lock:
                    self._ack_due = (boot, row[4])
                self._send_ack()
                return

    def _send_ack(self) -> None:
        with self._ack_lock:
            due = self._ack_due
            if due is None:
                return
            self._ack_due = None
        if not self.link.write_nowait(encode("K", due[1], [("boot", str(due[0]))])):
            with self._ack_lock:
                if self._ack_due is None:  # (poll writes it, unless a newer one came)
                    self._ack_due = due

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
