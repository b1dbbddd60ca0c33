# The serial-protocol side of a Pico (docs/protocol.md 1.3-1.4), free of
# hardware: one sequence counter for H/R/S frames, command handling with
# ack/nack, and the counters of what was dropped. link_uart and link_usb feed
# it lines and write out the frames it returns.

import frame
import led as ledmod

FW_VERSION = "0.1.0"
PROTO = "1"


class Node:
    def __init__(self, device, led, sensors):
        self.device = device
        self.led = led            # led.Led
        self.sensors = sensors    # sensors.Sensors (needs .names and .read())
        self.seq = 0              # next H/R/S sequence number, mod 2**32
        self.counts = {"frames": 0, "noise": 0, "malformed": 0,
                       "corrupt": 0, "overlong": 0, "ignored": 0}

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
                  ("dev", self.device[:frame.MAX_VALUE]), ("led", self.led.word())]
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
                if len(fields) <= 4:
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
        if len(fields) != 1:
            return [frame.encode("N", cid, [("err", "unknown")])]
        key, value = fields[0]
        if key == "led":
            if value is None:
                return [frame.encode("A", cid, [("led", self.led.word())])]
            word = ledmod.parse_word(value)
            if word is None:
                return [frame.encode("N", cid, [("err", "bad-value")])]
            ledmod.apply(self.led, word)
            return [frame.encode("A", cid, [("led", self.led.word())])]
        if key == "hello" or key == "ping":
            if value is not None:
                return [frame.encode("N", cid, [("err", "bad-value")])]
            out = [frame.encode("A", cid, [])]
            if key == "hello":
                out.extend(self.hello_frames())
            return out
        return [frame.encode("N", cid, [("err", "unknown")])]
