"""A Pico on a serial port (UART or USB CDC): the port's life, whatever the protocol.

The gateway's one serial thread (``serial_reactor.REACTOR``) opens the port
(retrying with backoff while the cable is out), hands every byte to the link's
protocol session, and closes and reopens the port when it fails. The session
(picogw or tutorial, from gateway/protocols/, which knows the link only as a
ByteLink) turns bytes into events and commands into bytes.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, ClassVar

import serial
from pydantic import Field

from gateway.domain import CommandError, LedCommand
from gateway.links.base import DeviceConfig, Link, LinkEvents
from gateway.links.serial_reactor import REACTOR
from gateway.protocols import PROTOCOLS, SERIAL, ProtocolKind, SerialSession

if TYPE_CHECKING:
    from gateway.progress import Heartbeat

WRITE_TIMEOUT = 2.0  # seconds a command's write may block (a hung USB Pico stops reading) before it fails


class SerialDeviceConfig(DeviceConfig):
    protocol_kind: ClassVar[ProtocolKind[Any] | None] = SERIAL  # (usb's config narrows it to its own)
    port: str
    baudrate: int = Field(115200, gt=0)
    heartbeat: float = Field(10.0, gt=0, description="ping the Pico after this long without a frame")
    offline_after: float = Field(30.0, gt=0, description="offline after this long without a frame")

    example_port: ClassVar[str] = "/dev/serial0"  # for messages

    def address_problems(self, label: str) -> tuple[list[str], list[str], tuple[str, ...] | None]:
        # A port that does not exist yet is only a note: Picos get plugged in later, and the
        # gateway opens the port when it appears.
        advice = f"write the serial device's file, e.g. port = \"{self.example_port}\""
        if not self.port.startswith("/"):
            return [f"{label}.port: not a device path: {advice}"], [], None
        if os.path.isdir(self.port) or os.path.isfile(self.port):
            return [f"{label}.port: {self.port} is not a serial device: {advice}"], [], None
        notes = [] if os.path.exists(self.port) else [
            f"{label}.port: {self.port} does not exist now; the gateway opens it when it appears"]
        return [], notes, ("port", os.path.realpath(self.port))


class SerialLink(Link):
    """Base of the uart and usb links: port handling around a SerialSession.

    The session's ``connected``, ``received``, ``poll`` and ``disconnected`` run on
    the serial thread and must not block: they write with :meth:`write_nowait`.
    ``set_led`` runs on the bridge's worker for this device and uses :meth:`write`."""

    Config = SerialDeviceConfig
    config: SerialDeviceConfig

    def __init__(self, config: SerialDeviceConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._port: serial.Serial | None = None
        self._write_lock = threading.Lock()
        self.commands_waiting = 0  # the serial thread reads at once, without gathering, while > 0
        self.session = self.make_session()

    def make_session(self) -> SerialSession:
        return PROTOCOLS.lookup(SERIAL, self.config.protocol)(self)

    def set_led(self, command: LedCommand) -> bool:
        self.commands_waiting += 1  # (one worker per device calls this: no lock needed)
        try:
            return self.session.set_led(command)
        finally:
            self.commands_waiting -= 1

    def write(self, data: bytes) -> None:
        """Send bytes to the Pico, blocking up to WRITE_TIMEOUT; CommandError if the port
        is not open or the write fails."""
        with self._write_lock:
            port = self._port
            if port is None:
                raise CommandError(f"serial port {self.config.port} is not open")
            try:
                port.write(data)
            except (serial.SerialException, OSError, ValueError) as exc:  # (ValueError: closed meanwhile)
                self.stats["write_errors"] += 1
                raise CommandError(f"write to {self.config.port} failed: {exc}") from exc

    def write_nowait(self, data: bytes) -> bool:
        """Send bytes if that can be done at once (the serial thread's writes: hello, pings).

        False, counted, when another write holds the port or the Pico's buffer is full:
        these messages are fire-and-forget, and the serial thread must never wait."""
        if not self._write_lock.acquire(blocking=False):
            self.stats["writes_skipped"] += 1
            return False
        try:
            port = self._port
            if port is None:
                return False
            written = os.write(port.fileno(), data)  # pyserial keeps the fd non-blocking
            if written < len(data):
                self.stats["writes_cut"] += 1  # the Pico drops the partial frame (bad CRC)
                return False
            return True
        except OSError:
            self.stats["write_errors"] += 1
            return False
        finally:
            self._write_lock.release()

    def open_port(self) -> serial.Serial:
        return serial.Serial(self.config.port, self.config.baudrate, timeout=0, write_timeout=WRITE_TIMEOUT,
                             exclusive=True)

    def attach(self, port: serial.Serial) -> None:
        """The serial thread opened the port. No lock here or in detach: a blocked writer
        must not hold up the serial thread; it fails on the closed port instead."""
        self._port = port

    def detach(self) -> None:
        self._port = None

    def start(self) -> None:
        REACTOR.add(self)

    def stop(self) -> None:
        REACTOR.remove(self)

    def alive(self) -> bool:
        """The serial thread is running (it serves every serial link)."""
        return REACTOR.alive()

    def heartbeats(self) -> list[Heartbeat]:
        return [REACTOR.heartbeat]
