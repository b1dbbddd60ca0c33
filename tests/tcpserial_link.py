"""A transport of one's own, in one file: a Pico on a serial-to-TCP bridge.

The Pico runs our firmware's uart link; its UART is wired to a bridge that serves the
serial line as a raw TCP stream (ser2net's raw mode, esp-link, a terminal server). The
gateway connects to the bridge and speaks the picogw serial protocol over the stream:
the same session as on a UART (gateway/protocols/), over the ByteLink interface.

A config names this file in ``plugins``; the last line registers the link::

    plugins = ["tcpserial_link.py"]

    [[devices]]
    id = "bench"
    transport = "tcpserial"
    host = "192.168.1.40"
    port = 4001

For ``pico-gateway simulate``, the link's Simulation puts a small bridge of its own (a
TCP server in the simulate process) in front of the virtual Pico's UART.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import serial
from pydantic import Field

from gateway.backoff import Backoff
from gateway.domain import CommandError, LedCommand
from gateway.hosts import host_advice, is_host
from gateway.links import register
from gateway.links.base import DeviceConfig, LinkEvents, ThreadedLink
from gateway.links.simulation import Description, SerialPortSimulation
from gateway.protocols import PROTOCOLS, SERIAL

WRITE_TIMEOUT = 2.0  # seconds a command's write may block
TICK = 0.05  # seconds between the session's polls (pings, offline_after)
READ_SIZE = 4096


class TcpSerialConfig(DeviceConfig):
    transport: Literal["tcpserial"]
    protocol_kind = SERIAL
    host: str
    port: int = Field(gt=0, lt=65536, description="the bridge's TCP port for the Pico's serial line")
    heartbeat: float = Field(10.0, gt=0, description="ping the Pico after this long without a frame")
    offline_after: float = Field(30.0, gt=0, description="offline after this long without a frame")
    connect_timeout: float = Field(2.0, gt=0, le=30)

    def address_problems(self, label: str) -> tuple[list[str], list[str], tuple[str, ...] | None]:
        if not is_host(self.host):
            return [f"{label}.host: {host_advice(self.host, 'the serial bridge', mqtt=False)}"], [], None
        return [], [], ("bridge host and port", self.host.lower(), str(self.port))


class BridgeSimulation(SerialPortSimulation):
    """The virtual Pico is a uart one (its UART a pty); a TCP server in front of it plays the bridge."""

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"UART": {"baudrate": int(desc.get("baudrate", 115200))}}, {}

    def expose(self, endpoint: Any) -> tuple[Any, Callable[[], None]]:
        return serve_serial_over_tcp(str(endpoint))

    def point(self, device: dict[str, Any], endpoint: Any) -> dict[str, Any]:
        return {**device, "host": endpoint[0], "port": int(endpoint[1])}


def serve_serial_over_tcp(path: str) -> tuple[tuple[str, int], Callable[[], None]]:
    """A raw serial-to-TCP bridge for the serial device ``path``: one client at a time, on a
    free loopback port. Returns ``((host, port), stop)``."""
    server = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def shuttle(client: socket.socket) -> None:
        with client, serial.Serial(path, 115200, timeout=0) as line:
            while not stopping.is_set():
                ready, _, _ = select.select([client.fileno(), line.fileno()], [], [], 0.2)
                if client.fileno() in ready:
                    data = client.recv(READ_SIZE)
                    if not data:
                        return
                    line.write(data)
                if line.fileno() in ready:
                    client.sendall(os.read(line.fileno(), READ_SIZE))

    def run() -> None:
        while not stopping.is_set():
            if select.select([server], [], [], 0.2)[0]:
                client, _ = server.accept()
                try:
                    shuttle(client)
                except OSError:
                    pass  # the client went away: wait for the next one

    thread = threading.Thread(target=run, name=f"bridge-{path}", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(2)
        server.close()

    host, port = server.getsockname()[:2]
    return (host, port), stop


class TcpSerialLink(ThreadedLink):
    """picogw (or the tutorial's serial protocol) over a TCP stream, reconnected with backoff."""

    transport = "tcpserial"
    Config = TcpSerialConfig
    config: TcpSerialConfig
    firmware = "uart"  # the Pico's side is its UART
    simulation = BridgeSimulation()

    def __init__(self, config: TcpSerialConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._sock: socket.socket | None = None
        self._write_lock = threading.Lock()
        self.session = PROTOCOLS.lookup(SERIAL, config.protocol)(self)

    def set_led(self, command: LedCommand) -> bool:
        return self.session.set_led(command)

    def write(self, data: bytes) -> None:
        with self._write_lock:
            sock = self._sock
            if sock is None:
                raise CommandError(f"not connected to the bridge at {self.config.host}:{self.config.port}")
            try:
                sock.sendall(data)
            except OSError as exc:
                self.stats["write_errors"] += 1
                raise CommandError(f"write to {self.config.host}:{self.config.port} failed: {exc}") from exc

    def write_nowait(self, data: bytes) -> bool:
        if not self._write_lock.acquire(blocking=False):
            self.stats["writes_skipped"] += 1
            return False
        try:
            sock = self._sock
            if sock is None:
                return False
            return sock.send(data, socket.MSG_DONTWAIT) == len(data)
        except OSError:
            self.stats["write_errors"] += 1
            return False
        finally:
            self._write_lock.release()

    def _run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.config.host, self.config.port), self.config.connect_timeout)
            except OSError as exc:
                self.stats["open_failures"] += 1
                self.set_online(False, f"cannot connect to {self.config.host}:{self.config.port}: {exc}")
                self._stop.wait(backoff.next())
                continue
            backoff.reset()
            sock.settimeout(WRITE_TIMEOUT)
            self._sock = sock
            reason = "stopping"
            try:
                self.session.connected()
                reason = self._serve(sock)
            except OSError as exc:
                self.stats["port_errors"] += 1
                reason = f"{self.config.host}:{self.config.port} failed: {exc}"
            finally:
                with self._write_lock:
                    self._sock = None
                sock.close()
                self.session.disconnected()
                self.set_online(False, reason)
            if not self._stop.is_set():
                self._stop.wait(backoff.next())

    def _serve(self, sock: socket.socket) -> str:
        """Hand what arrives to the session until the bridge closes or the link stops."""
        next_tick = 0.0
        while not self._stop.is_set():
            if select.select([sock], [], [], TICK)[0]:
                data = sock.recv(READ_SIZE)
                if not data:
                    return "the bridge closed the connection"
                self.session.received(data)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.session.poll(now)
        return "stopping"


register(TcpSerialLink)
