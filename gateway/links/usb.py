"""A Pico on USB (CDC, ``/dev/ttyACM*``): see docs/links.md.

``protocol = "picogw"``: our firmware speaks frames on its USB console, exactly
as on a UART; REPL output around them (banner, prompts, tracebacks, prints) is
noise the frame receiver skips. ``protocol = "tutorial"``: a Pico with stock
MicroPython and no program of ours, driven the way ``mpremote exec`` does it,
through mpremote's SerialTransport (raw REPL, no soft reset, so the board keeps
its state). Only the fixed snippets below are ever sent: nothing from a
message reaches the board.

Name the port by ``/dev/serial/by-id/...``: the link reopens the path after a
replug, so the Pico is found again even under a new ttyACM number.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import serial
from mpremote.transport import TransportError  # type: ignore[import-untyped]  # mpremote ships no types
from pydantic import Field

from gateway.domain import CommandError, LedCommand, now_ms
from gateway.links.base import Link, LinkEvents, PollingLink
from gateway.links.serial_link import WRITE_TIMEOUT, SerialDeviceConfig, SerialLink
from gateway.links.simulation import STOCK, SerialPortSimulation
from gateway.progress import Heartbeat
from gateway.protocols import PROTOCOLS, ProtocolKind

# The only code ever sent to a stock-MicroPython Pico. Each prints the LED
# state last, as 0 or 1; READ prints temperature (°C, RP2040 datasheet formula)
# before it.
SNIPPETS = {
    LedCommand.ON: "from machine import Pin\nPin('LED', Pin.OUT).on()\nprint(Pin('LED').value())",
    LedCommand.OFF: "from machine import Pin\nPin('LED', Pin.OUT).off()\nprint(Pin('LED').value())",
    LedCommand.TOGGLE: "from machine import Pin\np = Pin('LED', Pin.OUT)\np.toggle()\nprint(p.value())",
    "read": ("from machine import Pin, ADC\nimport time\n"
             "print(27 - (ADC(4).read_u16() * 3.3 / 65535 - 0.706) / 0.001721, time.ticks_ms() // 1000, "
             "Pin('LED').value())"),
}
READ_METRICS = ("temp", "uptime")
READ_SLICE = 0.1  # seconds a read of the raw REPL waits before it looks at whether the link is stopping


class Stopping(OSError):
    """The link is stopping: the raw REPL call in progress was cut short."""


class BoundedPort:
    """The serial port as mpremote's SerialTransport uses it (``transport.serial``), with
    every call bounded. mpremote opens its port without a read timeout: a board that goes
    silent would hold a read (entering the raw REPL, waiting for raw-paste's answer) and with
    it the link's thread for ever. Here a read ends after ``timeout`` seconds with what has
    come, and within READ_SLICE seconds of ``stopping`` being set (raising :class:`Stopping`);
    a write fails after WRITE_TIMEOUT (a board that stopped reading)."""

    def __init__(self, port: serial.Serial, timeout: float, stopping: threading.Event) -> None:
        port.timeout = READ_SLICE
        port.write_timeout = WRITE_TIMEOUT
        self._port = port
        self._timeout = timeout
        self._stopping = stopping

    def _check(self) -> None:
        if self._stopping.is_set():
            raise Stopping("the link is stopping")

    def read(self, size: int = 1) -> bytes:
        deadline = time.monotonic() + self._timeout
        data = b""
        while True:
            self._check()
            data += self._port.read(size - len(data))
            if len(data) >= size or time.monotonic() >= deadline:
                return data

    def inWaiting(self) -> int:
        self._check()
        return self._port.in_waiting

    def write(self, data: bytes) -> int | None:
        return self._port.write(data)

    @property
    def rts(self) -> bool:
        return self._port.rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._port.rts = value

    @property
    def dtr(self) -> bool:
        return self._port.dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._port.dtr = value

    def __getattr__(self, name: str) -> Any:  # close(), isOpen(), ...: the port's own
        return getattr(self._port, name)


def enter_raw_repl(transport: Any, timeout: float) -> None:
    """Enter the raw REPL without a soft reset, within ``timeout`` seconds where mpremote can
    bound it: ``timeout_overall`` exists from mpremote 1.25. Before, mpremote gives up after
    10 s without a byte, and BoundedPort keeps each read short and stoppable."""
    if _takes_timeout_overall(type(transport).enter_raw_repl):
        transport.enter_raw_repl(soft_reset=False, timeout_overall=timeout)
    else:
        transport.enter_raw_repl(soft_reset=False)


@functools.cache
def _takes_timeout_overall(method: Any) -> bool:
    return "timeout_overall" in inspect.signature(method).parameters


USB: ProtocolKind[Callable[[UsbConfig, LinkEvents], Link]] = ProtocolKind("usb")
"""The usb link runs another link for each protocol: frames on the console, or the raw REPL."""


class UsbConfig(SerialDeviceConfig):
    transport: Literal["usb"]
    protocol_kind = USB
    example_port: ClassVar[str] = "/dev/serial/by-id/usb-MicroPython_..."
    port: str = Field(description="prefer /dev/serial/by-id/usb-MicroPython_...-if00")
    poll_interval: float = Field(5.0, gt=0, description="tutorial: seconds between readings")


class UsbSerialLink(SerialLink):
    """Our firmware on the USB console: the serial link as is."""

    transport = "usb"


class UsbReplLink(PollingLink):
    """Stock MicroPython through mpremote's raw REPL."""

    transport = "usb"
    online_reason = "raw REPL answers"
    max_backoff = 30.0
    config: UsbConfig

    def __init__(self, config: UsbConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._lock = threading.Lock()  # one exec at a time
        self._transport: Any = None  # mpremote's SerialTransport, while the raw REPL is open

    def closed(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.exit_raw_repl()
            except Exception:  # the port may be gone; closing is all that is left
                pass
            try:
                transport.close()
            except Exception:
                pass

    def _exec(self, key: LedCommand | str) -> str:
        """Run one fixed snippet; its output. Opens the raw REPL when needed."""
        from mpremote.transport_serial import SerialTransport  # type: ignore[import-untyped]  # (as above)

        with self._lock:
            try:
                if self._transport is None:
                    # (No read timeout given to mpremote, which takes one from 1.25 only: BoundedPort sets it.)
                    transport = SerialTransport(self.config.port, baudrate=self.config.baudrate)
                    transport.serial = BoundedPort(transport.serial, self.config.command_timeout, self._stop)
                    self._transport = transport
                    enter_raw_repl(transport, self.config.command_timeout + 3)
                out = self._transport.exec_raw(SNIPPETS[key], timeout=self.config.command_timeout)
            except (TransportError, OSError, ValueError) as exc:
                if not isinstance(exc, Stopping):
                    self.stats["repl_errors"] += 1
                self._close()
                raise OSError(f"{self.config.port}: {exc}") from exc
            stdout, stderr = out
            if stderr:
                self.stats["repl_errors"] += 1
                raise OSError(f"the board raised: {stderr.decode(errors='replace').strip().splitlines()[-1:]}")
            return stdout.decode("ascii", "replace")

    def set_led(self, command: LedCommand) -> bool:
        try:
            out = self._exec(command).split()
        except OSError as exc:
            raise CommandError(str(exc)) from exc
        if not out or out[-1] not in ("0", "1"):
            raise CommandError(f"unexpected answer from the board: {' '.join(out)[:60]!r}")
        on = out[-1] == "1"
        self.events.led_state(self.device, on)
        return on

    def poll(self) -> None:
        fields = self._exec("read").split()
        if len(fields) != 3:
            self.stats["bad_values"] += 1
            raise OSError(f"unexpected answer to the reading snippet: {' '.join(fields)[:60]!r}")
        values = []
        for name, raw in zip(READ_METRICS, fields, strict=False):  # (the third field is the LED)
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                values.append((name, round(value, 2)))
            else:
                self.stats["bad_values"] += 1
        self.stats["frames"] += 1
        self.events.reading(self.device, values, now_ms(), None)
        self.events.led_state(self.device, fields[2] == "1")

PROTOCOLS.register(USB, "picogw", UsbSerialLink)
PROTOCOLS.register(USB, "tutorial", UsbReplLink)


class UsbSimulation(SerialPortSimulation):
    """The virtual Pico's USB console is its pty; the tutorial's Pico runs stock MicroPython."""

    ready_key = "usb"
    tutorial = STOCK
    stock = True
    console = True
    demo_devices = ({"id": "desk", "transport": "usb", "protocol": "picogw", "port": "sim"},
                    {"id": "bench", "transport": "usb", "protocol": "tutorial", "port": "sim", "poll_interval": 2.0})


class UsbLink(Link):
    """The usb transport: our firmware's frames, or stock MicroPython's REPL."""

    transport = "usb"
    Config = UsbConfig
    flashed_over_own_port = True
    hello_on = "usb"
    firmware = "usb"
    simulation = UsbSimulation()

    @classmethod
    def software(cls, protocol: str) -> str:
        return "stock MicroPython" if protocol == "tutorial" else super().software(protocol)

    @classmethod
    def default_metrics(cls, protocol: str) -> tuple[str, ...]:
        return READ_METRICS if protocol == "tutorial" else ()  # what the gateway's snippet reads

    def __init__(self, config: UsbConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self.impl: Link = PROTOCOLS.lookup(USB, config.protocol)(config, events)
        self.stats = self.impl.stats

    @property
    def online(self) -> bool:
        return self.impl.online

    def alive(self) -> bool:
        return self.impl.alive()

    def heartbeats(self) -> list[Heartbeat]:
        return self.impl.heartbeats()

    def start(self) -> None:
        self.impl.start()

    def stop(self) -> None:
        self.impl.stop()

    def set_led(self, command: LedCommand) -> bool:
        return self.impl.set_led(command)
