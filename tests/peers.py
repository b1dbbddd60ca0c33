"""Hand-written Pico stand-ins on pseudo-terminals, for protocol edge cases.

The end-to-end tests also run the real firmware in the simulator; these peers let a
test put exact bytes on the wire (garbage, corrupt frames, silence) and see what the
gateway sends back. ``Events`` is the other side: the bridge as a link reports to it.
"""

from __future__ import annotations

import os
import select
import threading
import tty

from gateway.links.uart import UartConfig, UartLink
from gateway.protocols.picogw import Frame, FrameReceiver, encode


class PtyPeer:
    """The Pico end of a pseudo-terminal; ``path`` is what the gateway opens."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.received = bytearray()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.deaf = threading.Event()  # set: stop reading, like a hung Pico (the gateway's writes pile up)
        self._thread = threading.Thread(target=self._read_loop, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read_loop(self) -> None:
        # select with a timeout, not a blocking read: close() must really close the
        # master (a thread blocked in read() would keep the pty alive).
        while not self._closed.is_set():
            if self.deaf.is_set():
                self._closed.wait(0.05)
                continue
            try:
                if not select.select([self.master], [], [], 0.05)[0]:
                    continue
                data = os.read(self.master, 4096)
            except (OSError, ValueError):
                return
            if not data:
                return
            with self._lock:
                self.received += data
            self.on_bytes(data)

    def on_bytes(self, data: bytes) -> None:
        """Override to react to what the gateway writes."""

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2)
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass


class PicogwPeer(PtyPeer):
    """Speaks picogw: answers commands (unless ``mute``), sends what the test asks."""

    def __init__(self, device: str = "greenhouse") -> None:
        self.rx = FrameReceiver()
        self.device = device
        self.led = False
        self.mute = False
        self.seq = 0
        self.commands: list[Frame] = []
        super().__init__()

    def hello(self) -> None:
        self.send(encode("H", self.seq, [("proto", "1"), ("fw", "test"), ("dev", self.device),
                                         ("led", "on" if self.led else "off"), ("metrics", "temp")]))

    def reading(self, **values: float | str) -> None:
        self.send(encode("R", self.seq, [(k, str(v)) for k, v in values.items()]))
        self.seq += 1

    def on_bytes(self, data: bytes) -> None:
        for frame in self.rx.feed(data):
            self.commands.append(frame)
            if self.mute or frame.type != "C":
                continue
            key, value = frame.fields[0] if frame.fields else ("", None)
            if key == "led" and value in ("on", "off", "toggle"):
                self.led = (not self.led) if value == "toggle" else value == "on"
                self.send(encode("A", frame.number, [("led", "on" if self.led else "off")]))
            elif key == "led" and value is None:
                self.send(encode("A", frame.number, [("led", "on" if self.led else "off")]))
            elif key in ("ping", "hello"):
                self.send(encode("A", frame.number, []))
                if key == "hello":
                    self.hello()
            else:
                self.send(encode("N", frame.number, [("err", "unknown")]))


class TutorialPeer(PtyPeer):
    """The tutorial's UART program: ``led_on\\r``/``led_off\\r`` -> ``on\\r\\n``/``off\\r\\n``."""

    def __init__(self) -> None:
        self.led = False
        self.mute = False
        self._buf = b""
        super().__init__()

    def on_bytes(self, data: bytes) -> None:
        self._buf += data
        while b"\r" in self._buf:
            line, self._buf = self._buf.split(b"\r", 1)
            if self.mute:
                continue
            if line == b"led_on":
                self.led = True
                self.send(b"on\r\n")
            elif line == b"led_off":
                self.led = False
                self.send(b"off\r\n")


class RawReplPeer(PtyPeer):
    """Stock MicroPython's raw REPL as mpremote drives it (no raw-paste), answering every
    snippet as the reading snippet (temperature, uptime, LED); ``silent`` set: it answers
    nothing more, like a board that hung. ``silent_after_entry``: it enters the raw REPL,
    then hangs (mpremote waits for raw-paste's answer)."""

    BANNER = b"raw REPL; CTRL-B to exit\r\n>"

    def __init__(self, silent_after_entry: bool = False) -> None:
        self.silent = threading.Event()
        self.silent_after_entry = silent_after_entry
        self.execs = 0
        self._code: bytearray | None = None  # in the raw REPL: the snippet being received
        super().__init__()

    def on_bytes(self, data: bytes) -> None:
        if self.silent.is_set():
            return
        if self._code is None:
            if b"\x01" in data:  # ctrl-A: enter the raw REPL
                self._code = bytearray()
                self.send(self.BANNER)
                if self.silent_after_entry:
                    self.silent.set()
            return
        if b"\x05A\x01" in data:  # may we use raw-paste? No: the plain raw REPL
            self.send(b"R\x00")
            data = data.split(b"\x05A\x01", 1)[1]
        self._code += data
        if b"\x02" in self._code:  # ctrl-B: back to the friendly REPL
            self._code = None
        elif b"\x04" in self._code:
            self._code.clear()
            self.execs += 1
            self.send(b"OK" + f"21.5 {self.execs} 0\r\n".encode() + b"\x04\x04>")


class TutorialTcpPeer:
    """The tutorial's Pico W TCP server on a loopback port: one command per connection."""

    def __init__(self, readings: str | None = None) -> None:
        import socket

        self.led = False
        self.readings = readings  # answer to "r\n" (our firmware's extension), None = tutorial
        self.requests: list[bytes] = []
        self.awake = threading.Event()  # cleared: a stuck Pico, whose connections wait unread
        self.awake.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self.awake.wait()
                command = conn.recv(64).strip()
                self.requests.append(command)
                if command == b"on":
                    self.led = True
                elif command == b"off":
                    self.led = False
                elif command == b"?":
                    conn.sendall(b"on\n" if self.led else b"off\n")
                elif command == b"r" and self.readings is not None:
                    conn.sendall(self.readings.encode() + b"\n")

    def close(self) -> None:
        self.server.close()


class Events:
    """A LinkEvents that records what the link reports."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, float, int | None]] = []  # (device, metric, value, seq)
        self.leds: list[bool] = []
        self.online: list[bool] = []
        self.firmware_versions: list[str] = []
        self.lock = threading.Lock()

    def reading(self, device, values, ts_ms, seq) -> None:  # (what the i2c link calls)
        self.readings(device, [(device, metric, value, ts_ms, seq) for metric, value in values])

    def readings(self, device, rows) -> None:  # (what the picogw session calls)
        with self.lock:
            self.got.extend((row[0], row[1], row[2], row[4]) for row in rows)

    def led_state(self, device, on) -> None:
        self.leds.append(on)

    def firmware(self, device, version) -> None:
        self.firmware_versions.append(version)

    def availability(self, device, online) -> None:
        self.online.append(online)


def unopened_uart_link(device: str = "fz", events: Events | None = None) -> UartLink:
    """A real uart link whose session a test feeds bytes directly (its port is never opened)."""
    return UartLink(UartConfig(id=device, transport="uart", port="/dev/null"), events or Events())
