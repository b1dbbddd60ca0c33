"""How ``pico-gateway simulate`` gives a device of one link a virtual Pico.

Each link class names its :class:`Simulation` (``Link.simulation``). The simulator
(gateway/simulator/fleet.py) asks it what is particular to the link: what goes into
the virtual Pico's ``config.py`` and its simulation knobs, which entry of the virtual
Pico's state file (``pico.json``) says that it is ready and where it is reached, what
two virtual Picos cannot share, what the link puts in front of the virtual Pico (if
anything), and how the device's gateway config is pointed at it. Nothing here starts
a process: the simulator does, the same way for every link.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

Description = Mapping[str, Any]
"""A virtual Pico's description: the device's config keys, plus the simulator's own
(``read_interval``, ``sim``, ``firmware``, ...): see gateway/simulator/fleet.py."""

Broker = tuple[str, int]

STOCK = "stock"
"""``Simulation.tutorial`` for a link whose tutorial is stock MicroPython (a bare REPL)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for a virtual Pico's server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Simulation:
    """What the simulator needs to know of one link (the defaults suit a Pico on a serial port)."""

    ready_key: ClassVar[str] = "uart"
    """The virtual Pico's state entry that holds its endpoint once it is ready (``pico.json``:
    ``uart``, ``usb``, ``i2c_socket``, ``tcp``, ``mqtt``; see gateway/simulator/pico.py)."""
    ready_value: ClassVar[str | None] = None
    """The value that entry must have to be ready (None: any value but null)."""
    tutorial: ClassVar[str | None] = None
    """What a virtual Pico whose device speaks the tutorial protocol runs: a program of
    ``pico/tutorial/`` (its file name), :data:`STOCK` (MicroPython without a program), or
    None (the tutorial has no program for this link)."""
    stock: ClassVar[bool] = False
    """A Pico with stock MicroPython (a bare REPL) is of use on this link."""
    console: ClassVar[bool] = False
    """Our firmware speaks on the board's USB console (its stdin/stdout): the virtual Pico
    gets one."""
    demo_devices: ClassVar[tuple[dict[str, Any], ...]] = ()
    """The devices ``pico-gateway demo`` shows on this link: gateway config tables, whose
    address keys are placeholders that :meth:`point` replaces."""

    def prepare(self, desc: Description, broker: Broker) -> tuple[dict[str, Any], dict[str, Any]]:
        """(``config.py`` values beyond DEVICE, LINK and READ_INTERVAL; simulation knobs for
        the virtual Pico's sidecar) for the virtual Pico ``desc`` describes."""
        return {}, {}

    def claim(self, desc: Description) -> tuple[str, str] | None:
        """What two virtual Picos on this link cannot share, as ``(what, value)`` for the
        message (an I2C address on the one simulated bus); None when nothing is shared."""
        return None

    def endpoint(self, state: Mapping[str, Any], broker: Broker) -> Any:
        """Where the virtual Pico is reached, from its state (a pty path, ``(host, port)``, ...)."""
        value = state.get(self.ready_key)
        return tuple(value) if isinstance(value, list) else value

    def expose(self, endpoint: Any) -> tuple[Any, Callable[[], None]]:
        """What the gateway reaches once the virtual Pico is ready: its own endpoint (here),
        or something the link puts in front of it (a serial-to-TCP bridge, say), and what
        stops that again when the virtual Pico stops."""
        return endpoint, _nothing

    def point(self, device: dict[str, Any], endpoint: Any) -> dict[str, Any]:
        """The device's gateway config (a TOML table) aimed at the virtual Pico at ``endpoint``."""
        return device


def _nothing() -> None:
    pass


class SerialPortSimulation(Simulation):
    """A Pico on a serial port: its port is the virtual Pico's pty."""

    def point(self, device: dict[str, Any], endpoint: Any) -> dict[str, Any]:
        return {**device, "port": endpoint}
