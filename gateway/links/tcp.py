"""A Pico W running the tutorial's TCP command server (port 8080): see docs/links.md.

One connection per command: ``on\\n``, ``off\\n``, or ``?\\n`` (answered ``on``/``off``
and a newline), then the Pico closes. The gateway polls ``?`` every
``poll_interval`` to keep ``state/led`` and availability true, and confirms every
command with a ``?``. With ``protocol = "picogw"`` (our firmware's tcp mode) it
also asks ``r\\n`` for one line of readings, ``temp=21.53 uptime=5``.

No socket outlives the exchange it was opened for.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from gateway.domain import MAY_STILL_HAPPEN, CommandError, LedCommand, now_ms
from gateway.hosts import host_advice, is_host
from gateway.links.base import DeviceConfig, LinkEvents, PollingLink
from gateway.links.simulation import Description, Simulation, free_port
from gateway.protocols import PROTOCOLS, ProtocolKind

MAX_ANSWER = 512  # bytes; the answers are a word or one line of readings


class NoAnswer(OSError):
    """The request went out; the Pico did not answer in time."""


TcpPoll = Callable[["TcpLink"], None]
"""What one poll asks, by protocol (commands are the same in both)."""
TCP: ProtocolKind[TcpPoll] = ProtocolKind("tcp")


class TcpConfig(DeviceConfig):
    transport: Literal["tcp"]
    protocol_kind = TCP
    host: str
    port: int = Field(8080, gt=0, lt=65536)
    poll_interval: float = Field(5.0, gt=0)
    connect_timeout: float = Field(2.0, gt=0, le=30)

    def address_problems(self, label: str) -> tuple[list[str], list[str], tuple[str, ...] | None]:
        if not is_host(self.host):
            return [f"{label}.host: {host_advice(self.host, 'the Pico W', mqtt=False)}"], [], None
        return [], [], ("host and port", self.host.lower(), str(self.port))


class TcpSimulation(Simulation):
    """The virtual Pico W's server listens on a free loopback port (its program's own 8080
    is mapped there), and the device's host and port name it."""

    ready_key = "tcp"
    tutorial = "wifi_tcp_main.py"
    demo_devices = ({"id": "shed", "transport": "tcp", "protocol": "tutorial", "host": "sim", "poll_interval": 1.0},)

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        port = free_port()
        return {"TCP": {"host": "127.0.0.1", "port": port}}, {"tcp_port_map": f"8080={port}"}

    def point(self, device: dict[str, Any], endpoint: Any) -> dict[str, Any]:
        return {**device, "host": endpoint[0], "port": int(endpoint[1])}


class TcpLink(PollingLink):
    online_reason = "answers"
    transport = "tcp"
    board = "Raspberry Pi Pico W"
    needs_wifi = True
    firmware = "tcp"
    firmware_config = {"TCP": {"host": "0.0.0.0", "port": 8080}}
    simulation = TcpSimulation()
    Config = TcpConfig
    config: TcpConfig

    @classmethod
    def config_py(cls, device: DeviceConfig) -> dict[str, Any]:
        return {"TCP": {"host": "0.0.0.0", "port": int(getattr(device, "port", 8080))}}

    def __init__(self, config: TcpConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._protocol_poll = PROTOCOLS.lookup(TCP, config.protocol)
        self._talk = threading.Lock()  # the tutorial server serves one connection at a time

    def exchange(self, request: bytes) -> bytes:
        """One connection: send ``request``, read until the Pico closes. Raises OSError, and
        :class:`NoAnswer` when the request went out but no answer came in time."""
        cfg = self.config
        with self._talk, socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout) as sock:
            sock.sendall(request)
            chunks: list[bytes] = []
            size = 0
            deadline = time.monotonic() + cfg.command_timeout
            while size < MAX_ANSWER:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(MAX_ANSWER)
                except TimeoutError:
                    raise NoAnswer(f"no answer within {cfg.command_timeout:g} s") from None
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

    def query(self) -> bool:
        answer = self.exchange(b"?\n").strip()
        if answer not in (b"on", b"off"):
            self.stats["bad_answers"] += 1
            raise OSError(f"unexpected answer to '?': {answer[:40]!r}")
        on = answer == b"on"
        self.events.led_state(self.device, on)
        return on

    def set_led(self, command: LedCommand) -> bool:
        in_flight = False  # the command itself went out
        try:
            if command is LedCommand.TOGGLE:
                command = LedCommand.OFF if self.query() else LedCommand.ON
            in_flight = True
            self.exchange(command.value.encode() + b"\n")
            in_flight = False
            state = self.query()
        except OSError as exc:
            self.stats["command_errors"] += 1
            self.set_online(False, f"{self.config.host}:{self.config.port}: {exc}")
            if in_flight and isinstance(exc, NoAnswer):  # a Pico that was stuck reads the command when it wakes
                raise CommandError(f"the Pico at {self.config.host}:{self.config.port} sent {exc}; "
                                   f"{MAY_STILL_HAPPEN}") from exc
            raise CommandError(f"cannot reach the Pico at {self.config.host}:{self.config.port}: {exc}") from exc
        self.set_online(True)
        if state != (command is LedCommand.ON):
            raise CommandError(f"the Pico reports the LED {'on' if state else 'off'} after '{command.value}'")
        return state

    def _poll_readings(self) -> None:
        line = self.exchange(b"r\n").decode("ascii", "replace").strip()
        values = []
        for item in line.split():
            name, _, raw = item.partition("=")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                self.stats["bad_values"] += 1
                continue
            values.append((name, value))  # the name is the bridge's to check, as for every link
        if values:
            self.events.reading(self.device, values, now_ms(), None)

    def poll_picogw(self) -> None:
        self.query()
        self._poll_readings()

    def poll_tutorial(self) -> None:
        self.query()

    def poll(self) -> None:
        try:
            self._protocol_poll(self)
        except OSError as exc:
            raise OSError(f"{self.config.host}:{self.config.port}: {exc}") from exc


PROTOCOLS.register(TCP, "picogw", TcpLink.poll_picogw)
PROTOCOLS.register(TCP, "tutorial", TcpLink.poll_tutorial)
