# The serial-protocol side of a Pico (docs/protocol.md 1.3-1.4), free of
# hardware: one sequence counter for H/R/S frames, command handling with
# ack/nack, the clock its hello and answers carry (t=) and the deadlines
# commands may carry (exp=), and the counters of what was dropped. link_uart
# and link_usb feed it lines and write out the frames it returns.
#
# With acknowledgements on (enable_acks, docs/protocol.md 1.8) every R and S
# frame is kept in a Ring until the gateway says it stored it (a K frame); the
# gateway asks for what is kept (C,<id>,resend) after each hello, and the
# frames go out again oldest first, paced by the main loop (resend_frame).

import clock
import frame
import led as ledmod

FW_VERSION = "0.3.0"
PROTO = "1"

# The t= clock: milliseconds, wrapping at 2**30 (what ticks_ms is on a Pico;
# masked, so a port or a PC whose ticks wrap later says the same). Every
# number here stays a small int on a 32-bit MicroPython: no heap per command.
T_MASK = 0x3FFFFFFF
T_HALF = 0x20000000
MAX_AHEAD_MS = 60000   # a deadline further ahead was computed from another clock


def t_diff(a, b):
    # a - b on the t clock, in -2**29 .. 2**29 - 1
    d = (a - b) & T_MASK
    if d >= T_HALF:
        d = d - T_MASK - 1
    return d


SEQ_MASK = 0xFFFFFFFF
SEQ_HALF = 0x80000000
TS_ROOM = 33   # ",lost=" and 10 digits, ",ts=" and 13: a resent frame grows by this much at most
DEFAULT_RING = 240   # frames kept until acknowledged: 20 minutes at the default 5 s


def seq_le(a, b):
    # a <= b for sequence numbers mod 2**32 (within half the range)
    return ((b - a) & SEQ_MASK) < SEQ_HALF


class Ring:
    # The R and S frames not yet acknowledged, oldest first, in fixed lists
    # (an entry costs its body text only: about 70 bytes of heap for a
    # reading of the three built-in metrics). `unsent` counts the newest
    # entries still to be sent: a frame taken while older ones are being
    # resent waits its turn, so the gateway gets every boot's frames in order.
    # A full ring drops its oldest entry and counts it in `lost`; when that
    # entry was the next to send, `skipped` counts it for the next frame sent
    # (its lost= field: the gateway then knows the gap is not the wire's).

    def __init__(self, size):
        self.size = max(1, int(size))
        self.seqs = [0] * self.size
        self.ticks = [0] * self.size
        self.texts = [None] * self.size   # type letter + the body's fields: "Rtemp=21.5,uptime=5"
        self.head = 0
        self.count = 0
        self.unsent = 0
        self.lost = 0
        self.skipped = 0

    def add(self, seq, ticks, text):
        if self.count == self.size:
            if self.unsent == self.count:
                self.skipped += 1
            self.texts[self.head] = None
            self.head = (self.head + 1) % self.size
            self.count -= 1
            if self.unsent > self.count:
                self.unsent = self.count
            self.lost += 1
        i = (self.head + self.count) % self.size
        self.seqs[i] = seq
        self.ticks[i] = ticks
        self.texts[i] = text
        self.count += 1
        self.unsent += 1

    def ack(self, upto):
        # The gateway stored every frame up to `upto`: forget them.
        n = 0
        while self.count and seq_le(self.seqs[self.head], upto):
            self.texts[self.head] = None
            self.head = (self.head + 1) % self.size
            self.count -= 1
            n += 1
        if self.unsent > self.count:
            self.unsent = self.count
        return n

    def rewind(self):
        # Send everything kept again, oldest first.
        self.unsent = self.count
        self.skipped = 0

    def oldest_seq(self):
        return self.seqs[self.head] if self.count else None

    def take_unsent(self):
        # The index of the oldest entry still to send (marked sent), or -1.
        if not self.unsent:
            return -1
        i = (self.head + self.count - self.unsent) % self.size
        self.unsent -= 1
        return i


def parse_t(value):
    # A t= / exp= value: decimal 0 .. 2**30 - 1, else None.
    if value is None or not (1 <= len(value) <= 10) or not value.isdigit():
        return None
    n = int(value)
    if n > T_MASK:
        return None
    return n


class Node:
    def __init__(self, device, led, sensors, ticks_ms=None, boot=None):
        self.device = device
        self.led = led            # led.Led
        self.sensors = sensors    # sensors.Sensors (needs .names and .read())
        self.ticks_ms = ticks_ms or clock.ticks_ms   # (tests give a fixed clock)
        self.seq = 0              # next H/R/S sequence number, mod 2**32
        self.counts = {"frames": 0, "noise": 0, "malformed": 0,
                       "corrupt": 0, "overlong": 0, "ignored": 0}
        if boot is None:
            import regmap
            boot = regmap.new_boot_id()
        self.boot = str(boot)     # this boot's number, as the hello and K frames write it
        self.ring = None          # Ring, once enable_acks is called
        self.time_ms = None       # Unix ms the gateway told (a T frame), and
        self.time_ticks = 0       # our t clock when it did

    def enable_acks(self, size=DEFAULT_RING):
        # Keep R and S frames until the gateway acknowledges them; the hello says so.
        self.ring = Ring(size)

    def unix_ms(self, ticks):
        # Unix ms of t clock value `ticks`, once the gateway told the time; else None.
        if self.time_ms is None:
            return None
        return self.time_ms + t_diff(ticks, self.time_ticks)

    def t(self):
        # The t= field: this Pico's clock now (the gateway learns from it
        # which deadline to put on a command).
        return str(self.ticks_ms() & T_MASK)

    def _next_seq(self):
        n = self.seq
        self.seq = (n + 1) & 0xFFFFFFFF
        return n

    next_seq = _next_seq   # (the wifi link numbers its readings from the same counter)

    # --- frames the Pico originates -------------------------------------

    def hello_frames(self):
        # One H frame carrying the next sequence number without consuming it.
        # Values are limited to 32 bytes, so a long metric list is split over
        # several "metrics=" fields (a|b|c, then d|e ...), and the device id
        # is cut to 32 bytes. Fields that would push the frame past 200 bytes
        # are left out.
        fields = [("proto", PROTO), ("fw", FW_VERSION),
                  ("dev", self.device[:frame.MAX_VALUE]), ("led", self.led.word()), ("boot", self.boot)]
        if self.ring is not None:
            fields.append(("ack", str(self.ring.size)))
            fields.append(("lost", str(self.ring.lost)))
        fields.append(("t", self.t()))
        required = len(fields)
        chunk = ""
        for name in self.sensors.names:
            if chunk and len(chunk) + 1 + len(name) > frame.MAX_VALUE:
                fields.append(("metrics", chunk))
                chunk = ""
            chunk = name if not chunk else chunk + "|" + name
        if chunk:
            fields.append(("metrics", chunk))
        while True:
            try:
                return [frame.encode("H", self.seq, fields)]
            except ValueError:
                if len(fields) <= required:
                    raise
                fields.pop()

    def reading_frames(self, readings):
        # readings: [(metric, number)] taken at one time. Usually one R frame;
        # split over several (each with its own sequence number) if it would
        # pass 200 bytes (with acks: with room for the ts= of a resend).
        # nan/inf values are left out. Returns the frames to send now: with
        # acks on, while older frames are being resent, none (they wait in
        # the ring, and resend_frame sends them in turn).
        fields = []
        for name, value in readings:
            text = frame.fmt_number(value)
            if text is not None and len(text) <= frame.MAX_VALUE:
                fields.append((name, text))
        room = 0 if self.ring is None else TS_ROOM
        out = []
        while fields:
            n = len(fields)
            while True:
                try:
                    line = frame.encode("R", self.seq, fields[:n])
                    if len(line) + room <= frame.MAX_FRAME:
                        break
                except ValueError:
                    pass
                n -= 1
                if n == 0:
                    return out
            self._keep("R", fields[:n], line, out)
            fields = fields[n:]
        return out

    def _keep(self, ftype, fields, line, out):
        # The frame `line` takes the next sequence number; with acks it is kept
        # until acknowledged, and sent now only if nothing older waits.
        seq = self._next_seq()
        ring = self.ring
        if ring is None:
            out.append(line)
            return
        waiting = ring.unsent
        ring.add(seq, self.ticks_ms() & T_MASK, ftype + ",".join(k + "=" + v for k, v in fields))
        if not waiting:
            ring.take_unsent()
            out.append(line)

    def resend_frame(self):
        # The next kept frame to send again (oldest first), or None. A frame
        # sent late carries ts=, when it was taken (Unix ms; 0 if the gateway
        # has not told the time); an S frame resent says an old LED state.
        ring = self.ring
        if ring is None:
            return None
        i = ring.take_unsent()
        if i < 0:
            return None
        text = ring.texts[i]
        ts = self.unix_ms(ring.ticks[i])
        body = text[0] + "," + str(ring.seqs[i]) + "," + text[1:]
        if ring.skipped:   # the frames just before this one fell off the full ring
            body = body + ",lost=" + str(ring.skipped)
            ring.skipped = 0
        body = body + ",ts=" + ("0" if ts is None else str(ts))
        return frame.encode_body(body)

    def state_frame(self):
        # S frame: for LED changes that did not come from a command. None when
        # it has to wait in the ring behind older frames being resent.
        fields = [("led", self.led.word())]
        out = []
        self._keep("S", fields, frame.encode("S", self.seq, fields), out)
        return out[0] if out else None

    # --- frames the Pico receives --------------------------------------

    def handle_line(self, line):
        # One line from LineReader -> list of frames to send back (maybe none).
        try:
            ftype, number, fields = frame.decode(line)
        except ValueError as e:
            kind = e.args[0] if e.args else "malformed"
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return []
        self.counts["frames"] += 1
        if ftype == "C":
            return self.handle_command(number, fields)
        if ftype == "K" and self.ring is not None:
            # K,<seq>,boot=<boot>: the gateway stored every frame of that boot up to seq.
            if len(fields) == 1 and fields[0][0] == "boot" and fields[0][1] == self.boot:
                self.ring.ack(number)
            else:
                self.counts["ignored"] += 1
            return []
        if ftype == "T" and len(fields) == 1 and fields[0][0] == "now":
            # T,0,now=<Unix ms>: the time, for the ts= of frames sent late.
            v = fields[0][1]
            if v is not None and 1 <= len(v) <= 16 and v.isdigit():
                self.time_ms = int(v)
                self.time_ticks = self.ticks_ms() & T_MASK
                return []
        self.counts["ignored"] += 1
        return []

    def handle_command(self, cid, fields):
        # One command field, and at most one exp=<t> (in any order): the last
        # moment the command may be carried out, on this Pico's t clock. A
        # command read later (the Pico was stuck while it waited in the UART
        # buffer, and the gateway has long told the user it failed) is refused.
        cmd = None
        exp = None
        for field in fields:
            if field[0] == "exp" and exp is None:
                exp = field
            elif cmd is None:
                cmd = field
            else:
                return [self._answer("N", cid, [("err", "unknown")])]
        if cmd is None:
            return [self._answer("N", cid, [("err", "unknown")])]
        if exp is not None:
            deadline = parse_t(exp[1])
            if deadline is None:
                return [self._answer("N", cid, [("err", "bad-value")])]
            left = t_diff(deadline, self.ticks_ms() & T_MASK)
            if left < 0:
                return [self._answer("N", cid, [("err", "expired")])]
            if left > MAX_AHEAD_MS:   # the sender's idea of our clock is stale (we restarted?)
                return [self._answer("N", cid, [("err", "bad-value")])]
        key, value = cmd
        if key == "led":
            if value is None:
                return [self._answer("A", cid, [("led", self.led.word())])]
            word = ledmod.parse_word(value)
            if word is None:
                return [self._answer("N", cid, [("err", "bad-value")])]
            ledmod.apply(self.led, word)
            return [self._answer("A", cid, [("led", self.led.word())])]
        if key == "hello" or key == "ping":
            if value is not None:
                return [self._answer("N", cid, [("err", "bad-value")])]
            out = [self._answer("A", cid, [])]
            if key == "hello":
                out.extend(self.hello_frames())
            return out
        if key == "resend" and self.ring is not None:
            # Everything kept goes out again, oldest first; `from` is the number
            # of the first frame after this answer.
            if value is not None:
                return [self._answer("N", cid, [("err", "bad-value")])]
            ring = self.ring
            ring.rewind()
            first = ring.oldest_seq()
            return [self._answer("A", cid, [("from", str(self.seq if first is None else first)),
                                           ("n", str(ring.count))])]
        return [self._answer("N", cid, [("err", "unknown")])]

    def _answer(self, ftype, cid, fields):
        # Every A and N carries t=, when the command was handled.
        fields.append(("t", self.t()))
        return frame.encode(ftype, cid, fields)
