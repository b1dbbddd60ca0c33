"""A protocol session over a byte stream, and the byte link it runs over.

A session (picogw, tutorial) turns bytes into events and commands into bytes. It
knows its link only through :class:`ByteLink`: a way to write (blocking, or not at
all), availability, counters and where to report. A serial port is one such link;
any other byte stream (a BLE UART, a TCP stream) can carry the same sessions.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from gateway.protocols.registry import ProtocolKind

if TYPE_CHECKING:
    from gateway.domain import LedCommand
    from gateway.store import Row


class SessionConfig(Protocol):
    """The device's settings a session reads (seconds)."""

    @property
    def command_timeout(self) -> float: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def offline_after(self) -> float: ...


class SessionEvents(Protocol):
    """Where a session reports (the bridge, through the link)."""

    def readings(self, device: str, rows: list[Row]) -> None: ...
    def led_state(self, device: str, on: bool) -> None: ...
    def firmware(self, device: str, version: str) -> None: ...


class ByteLink(Protocol):
    """What a session needs of the link that carries its bytes."""

    stats: Counter[str]
    diagnostic_fields: dict[str, object]
    log: logging.Logger

    @property
    def device(self) -> str: ...
    @property
    def config(self) -> SessionConfig: ...
    @property
    def events(self) -> SessionEvents: ...

    def write(self, data: bytes) -> None:
        """Send bytes, blocking a bounded time; CommandError when they cannot be sent."""

    def write_nowait(self, data: bytes) -> bool:
        """Send bytes if that can be done at once; False (counted by the link) if not."""

    def set_online(self, online: bool, reason: str = "") -> None: ...


class SerialSession(ABC):
    """One protocol spoken over an open byte stream. Driven by the link's reader thread:
    ``connected``, ``received``, ``poll`` and ``disconnected`` must not block."""

    def __init__(self, link: ByteLink) -> None:
        self.link = link

    def connected(self) -> None:  # noqa: B027  (optional: a session may ignore it)
        """The stream has just been opened."""

    def disconnected(self) -> None:  # noqa: B027  (optional: a session may ignore it)
        """The stream is closed (unplugged, failed, or stopping)."""

    @abstractmethod
    def received(self, data: bytes) -> None: ...

    def poll(self, now: float) -> None:  # noqa: B027  (optional: a session may ignore it)
        """Called every few tens of milliseconds while the stream is open."""

    def stored(self, rows: list[Row]) -> None:  # noqa: B027  (optional: most sessions acknowledge nothing)
        """The store has these readings of this link's device on disk (committed now, or
        refused as stored already). Called on the committing thread: must not block."""

    @abstractmethod
    def set_led(self, command: LedCommand) -> bool: ...


def tell_stored(links: Mapping[str, object], stored: list[Row], refused: list[Row]) -> None:
    """A store's ``on_stored``: hand each serial session (or, without one, each link) its
    device's newest row on disk, of the rows that name a boot (those a Pico may send
    again, and is told about: the newest says it all, as a Pico's readings of a boot are
    stored in order), and count per device the ones refused as stored already
    (``duplicates_refused``)."""
    newest: dict[str, Row] = {}
    for rows in (stored, refused):  # the last one stored, else the last one refused
        for row in reversed(rows):  # (a dict lookup per row: this runs for every commit)
            if len(row) > 5 and row[0] not in newest:
                newest[row[0]] = row
    for row in refused:
        link = links.get(row[0])
        if link is not None:
            link.stats["duplicates_refused"] += 1  # type: ignore[attr-defined]  # every Link counts in stats
    for device, row in newest.items():
        link = links.get(device)
        session = getattr(link, "session", None)
        if isinstance(session, SerialSession):
            session.stored([row])
        elif link is not None:
            link.stored([row])  # type: ignore[attr-defined]  # every Link has stored (a no-op for most)


SessionFactory = Callable[[ByteLink], SerialSession]
SERIAL: ProtocolKind[SessionFactory] = ProtocolKind("serial")
"""Protocols spoken over a byte stream (the uart link, and the usb link's picogw)."""
