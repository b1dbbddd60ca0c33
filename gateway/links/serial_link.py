"""A Pico on a serial port (UART or USB CDC): the port's life, whatever the protocol.

The link owns one reader thread. It opens the port (retrying with backoff while
the cable is out), hands every byte to the protocol session, and closes and
reopens the port when it fails. The session (picogw or tutorial) turns bytes
into events and commands into bytes.
"""

from __future__ import annotations

import os
import select
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import serial
from pydantic import Field

from gateway.backoff import Backoff
from gateway.links.base import CommandError, DeviceConfig, LedCommand, LinkEvents, ThreadedLink

if TYPE_CHECKING:
    from collections.abc import Callable

READ_TIMEOUT = 0.05  # seconds a read blocks: bounds how late a heartbeat or stop is noticed
READ_SIZE = 65536


class SerialDeviceConfig(DeviceConfig):
    port: str
    baudrate: int = Field(115200, gt=0)
    heartbeat: float = Field(10.0, gt=0, description="ping the Pico after this long without a frame")
    offline_after: float = Field(30.0, gt=0, description="offline after this long without a frame")


class SerialSession(ABC):
    """One protocol spoken over an open serial port. Driven by the link's reader thread."""

    def __init__(self, link: SerialLink) -> None:
        self.link = link

    def connected(self) -> None:
        """The port has just been opened."""

    def disconnected(self) -> None:
        """The port is closed (unplugged, failed, or stopping)."""

    @abstractmethod
    def received(self, data: bytes) -> None: ...

    def poll(self, now: float) -> None:
        """Called between reads, at least every READ_TIMEOUT while the port is open."""

    @abstractmethod
    def set_led(self, command: LedCommand) -> bool: ...


class SerialLink(ThreadedLink):
    """Base of the uart and usb links: port handling around a SerialSession."""

    Config = SerialDeviceConfig
    config: SerialDeviceConfig

    def __init__(self, config: SerialDeviceConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._port: serial.Serial | None = None
        self._write_lock = threading.Lock()
        self.session = self.make_session()

    def make_session(self) -> SerialSession:
        from gateway.protocols import serial_sessions

        factory: Callable[[SerialLink], SerialSession] = serial_sessions[self.config.protocol]
        return factory(self)

    def set_led(self, command: LedCommand) -> bool:
        return self.session.set_led(command)

    def write(self, data: bytes) -> None:
        """Send bytes to the Pico; CommandError if the port is not open."""
        with self._write_lock:
            port = self._port
            if port is None:
                raise CommandError(f"serial port {self.config.port} is not open")
            try:
                port.write(data)
            except (serial.SerialException, OSError) as exc:
                self.stats["write_errors"] += 1
                raise CommandError(f"write to {self.config.port} failed: {exc}") from exc

    def open_port(self) -> serial.Serial:
        return serial.Serial(self.config.port, self.config.baudrate, timeout=READ_TIMEOUT, exclusive=True)

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                port = self.open_port()
            except (serial.SerialException, OSError, ValueError) as exc:
                self.stats["open_failures"] += 1
                self.set_online(False, f"cannot open {self.config.port}: {exc}")
                self._stop.wait(backoff.next())
                continue
            backoff.reset()
            self.stats["opens"] += 1
            with self._write_lock:
                self._port = port
            reason = "stopping"
            try:
                self.session.connected()
                fd = port.fileno()
                while not self._stop.is_set():
                    # select + one large read, not pyserial's read(): two system calls per
                    # chunk instead of four (this loop is a third of the gateway's CPU under load).
                    if select.select([fd], [], [], READ_TIMEOUT)[0]:
                        data = os.read(fd, READ_SIZE)
                        if not data:
                            raise serial.SerialException("the device reports readiness to read but returned "
                                                         "no data (disconnected?)")
                        self.session.received(data)
                    self.session.poll(time.monotonic())
            except (serial.SerialException, OSError) as exc:
                self.stats["port_errors"] += 1
                reason = f"{self.config.port} failed: {exc}"
            except Exception:  # a bug in a session must not end the link for good
                self.stats["internal_errors"] += 1
                self.log.exception("session error; reopening the port")
                reason = "internal error"
            finally:
                with self._write_lock:
                    self._port = None
                port.close()
                self.session.disconnected()
                self.set_online(False, reason)
            if not self._stop.is_set():
                self._stop.wait(backoff.next())
