# The serial-protocol side of a Pico (docs/protocol.md 1.3-1.4), free of
# hardware: one sequence counter for H/R/S frames, command handling with
# ack/nack, the clock its hello and answers carry (t=) and the deadlines
# commands may carry (exp=), and the counters of what was dropped. link_uart
# and link_usb feed it lines and write out the frames it returns.

import clock
import frame
import led as ledmod

FW_VERSION = "0.2.0"
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


def parse_t(value):
    # A t= / exp= value: decimal 0 .. 2**30 - 1, else None.
    if value is None or not (1 <= len(value) <= 10) or not value.isdigit():
        return None
    n = int(value)
    if n > T_MASK:
        return None
    return n


class Node:
    def __init__(self, device, led, sensors, ticks_ms=None):
        self.device = device
        self.led = led            # led.Led
        self.sensors = sensors    # sensors.Sensors (needs .names and .read())
        self.ticks_ms = ticks_ms or clock.ticks_ms   # (tests give a fixed clock)
        self.seq = 0              # next H/R/S sequence number, mod 2**32
        self.counts = {"frames": 0, "noise": 0, "malformed": 0,
                       "corrupt": 0, "overlong": 0, "ignored": 0}

    def t(self):
        # The t= field: this Pico's clock now (the gateway learns from it
        # which deadline to put on a command).
        return str(self.ticks_ms() & T_MASK)

    def _next_seq(self):
        n = self.seq
        self.seq = (n + 1) & 0xFFFFFFFF
        return n

    # --- frames the Pico originates -------------------------------------

    def hello_frames(self):
        # One H frame carrying the next sequence number without consuming it.
        # Values are limited to 32 bytes, so a long metric list is split over
        # several "metrics=" fields (a|b|c, then d|e ...), and the device id
        # is cut to 32 bytes. Fields that would push the frame past 200 bytes
        # are left out.
        fields = [("proto", PROTO), ("fw", FW_VERSION),
                  ("dev", self.device[:frame.MAX_VALUE]), ("led", self.led.word()), ("t", self.t())]
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
                if len(fields) <= 5:
                    raise
                fields.pop()

    def reading_frames(self, readings):
        # readings: [(metric, number)] taken at one time. Usually one R frame;
        # split over several (each with its own sequence number) if it would
        # pass 200 bytes. nan/inf values are left out.
        fields = []
        for name, value in readings:
            text = frame.fmt_number(value)
            if text is not None and len(text) <= frame.MAX_VALUE:
                fields.append((name, text))
        out = []
        while fields:
            n = len(fields)
            while True:
                try:
                    line = frame.encode("R", self.seq, fields[:n])
                    break
                except ValueError:
                    n -= 1
                    if n == 0:
                        return out
            self._next_seq()
            out.append(line)
            fields = fields[n:]
        return out

    def state_frame(self):
        # S frame: for LED changes that did not come from a command.
        return frame.encode("S", self._next_seq(), [("led", self.led.word())])

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
        if ftype != "C":
            self.counts["ignored"] += 1
            return []
        return self.handle_command(number, fields)

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
        return [self._answer("N", cid, [("err", "unknown")])]

    def _answer(self, ftype, cid, fields):
        # Every A and N carries t=, when the command was handled.
        fields.append(("t", self.t()))
        return frame.encode(ftype, cid, fields)
