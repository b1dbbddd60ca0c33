"""What every link shares: its config base, the events it reports, and its interface.

A *link* is one way of reaching one Pico (a UART, an I2C target, ...). The bridge
talks to every link through :class:`Link` and hears from it through
:class:`LinkEvents`; adding a transport means one new module with a ``Link``
subclass and one line in ``gateway/links/__init__.py``.
"""

from __future__ import annotations

import difflib
import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import Field, field_validator

from gateway.backoff import Backoff
from gateway.domain import RESERVED_IDS, DeviceId, LedCommand, StrictModel
from gateway.links.simulation import Simulation
from gateway.log_once import Once
from gateway.progress import Heartbeat
from gateway.protocols.registry import PROTOCOLS, ProtocolKind

if TYPE_CHECKING:
    from gateway.store import Row
    from gateway.topics import Topics

STOP_JOIN = 10.0  # seconds ThreadedLink.stop waits for the link's thread (the bridge waits less: it stops
# every link at once, in threads of its own, and leaves the ones still stopping at its deadline)


class DeviceConfig(StrictModel):
    """Keys every device has, whatever its transport."""

    id: DeviceId
    transport: str
    protocol: str = Field("picogw", description="what the Pico speaks: one its link registers")
    command_timeout: float = Field(2.0, gt=0, le=60, description="seconds to wait for an ack")

    protocol_kind: ClassVar[ProtocolKind[Any] | None] = None
    """The kind of link whose protocols this transport speaks (its entries in PROTOCOLS,
    gateway/protocols/registry.py); None: any protocol some link speaks."""

    def address_problems(self, label: str) -> tuple[list[str], list[str], tuple[str, ...] | None]:
        """What ``check-config`` and ``run`` find wrong with this device's address, beyond
        validation: (problems, notes, the address it uses, as ``(what, ...)`` with ``what``
        said in a message, e.g. ``("port", "/dev/ttyACM0")``; None when it has none). Two
        devices on one address are refused. ``label`` names the device in messages."""
        return [], [], None

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        kind = cls.protocol_kind
        known = PROTOCOLS.protocols(kind) if kind is not None else PROTOCOLS.all_protocols()
        if value not in known:
            near = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown protocol {value!r}; {hint}expected one of: {', '.join(known) or 'none'}")
        return value

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_IDS:
            raise ValueError(f"'{value}' is reserved for the gateway's own topics")
        return value


class LinkEvents(Protocol):
    """The bridge as a link sees it: where it reports, from its own threads (never
    blocking long), and, for links that live on MQTT themselves (wifi), the topic
    tree and a way to subscribe."""

    topics: Topics

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None]) -> None: ...

    def publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False) -> bool:
        """For a link that talks to its Pico through the broker (wifi): False when the
        message could not be queued (no connection, at QoS 0)."""

    def reading(self, device: str, values: list[tuple[str, float]], ts_ms: int, seq: int | None) -> None:
        """One reading (one or more values taken together)."""

    def readings(self, device: str, rows: list[Row]) -> None:
        """Many readings at once, as the store's rows ``(device, metric, value, ts_ms, seq)``:
        what one serial read brought (a dozen frames under load) costs one call, not a dozen."""

    def led_state(self, device: str, on: bool) -> None: ...

    def firmware(self, device: str, version: str) -> None:
        """The Pico's hello named the firmware it runs."""

    def availability(self, device: str, online: bool) -> None: ...


class Link(ABC):
    """One Pico behind one transport.

    ``start`` returns at once: the link runs its own threads, (re)opens its
    port with backoff and reports through ``events``. ``set_led`` blocks until
    the Pico confirmed the new state (returned) or raises CommandError.
    """

    transport: ClassVar[str]
    Config: ClassVar[type[DeviceConfig]]
    publishes_itself: ClassVar[bool] = False
    """True when the Pico publishes its own readings, state and status (wifi): the
    bridge then stores what it hears but publishes nothing, and leaves commands to it."""
    board: ClassVar[str] = "Raspberry Pi Pico"
    """The board this transport implies (one reached over Wi-Fi is a Pico W), as
    discovery names it in the device's model."""

    firmware: ClassVar[str | None] = None
    """The link of our firmware (``LINK`` in the board's config.py, a ``link_<name>.py`` of
    pico/) that a Pico on this transport runs; None when our firmware has none for it."""
    firmware_config: ClassVar[dict[str, dict[str, Any]]] = {}
    """The sections of config.py that this firmware link reads, with the firmware's
    defaults (gateway/simulator/config_py.py writes them)."""
    simulation: ClassVar[Simulation | None] = None
    """How ``simulate`` gives a device of this link a virtual Pico (None: it cannot)."""

    needs_wifi: ClassVar[bool] = False
    """The Pico joins a Wi-Fi network (flash writes the network into its config.py)."""
    flashed_over_own_port: ClassVar[bool] = False
    """The device's ``port`` is the USB port flash copies the firmware through (usb)."""
    hello_on: ClassVar[Literal["own port", "usb", None]] = None
    """Where flash hears the hello after the reset: on the device's own serial port (uart),
    on the USB port it flashed through (usb), or nowhere it can listen (None)."""

    @classmethod
    def config_py(cls, device: DeviceConfig) -> dict[str, Any]:
        """What flash writes into the board's config.py for this link, beyond the device id,
        the link's name, the reading interval and the Wi-Fi network."""
        return {}

    @classmethod
    def software(cls, protocol: str) -> str:
        """What runs on the Pico, in words, for the device's model in discovery."""
        return "pico-gateway firmware" if protocol == "picogw" else "tutorial program"

    @classmethod
    def default_metrics(cls, protocol: str) -> tuple[str, ...]:
        """The metrics a Pico on this link has before any reading, when the link itself
        decides them (picogw firmware names its own). The tutorial's programs: none."""
        return ()

    def __init__(self, config: DeviceConfig, events: LinkEvents) -> None:
        self.config = config
        self.device = config.id
        self.events = events
        self.stats: Counter[str] = Counter()
        self.diagnostic_fields: dict[str, object] = {}
        """Fields this link adds to its device's diagnostics (gateway/diagnostics.py), such as
        how far the state it shows can be trusted. Replaced whole, never changed in place:
        the diagnostics thread reads it while the link's own thread may set it."""
        self.log = logging.getLogger(f"gateway.link.{config.id}")
        self._online: bool | None = None
        self._online_lock = threading.Lock()

    @property
    def online(self) -> bool:
        return bool(self._online)

    def set_online(self, online: bool, reason: str = "") -> None:
        """Report availability, once per change."""
        with self._online_lock:
            if self._online == online:
                return
            self._online = online
        if online:
            self.log.info("online%s", f" ({reason})" if reason else "")
        else:
            self.stats["went_offline"] += 1
            self.log.warning("offline%s", f": {reason}" if reason else "")
        self.events.availability(self.device, online)

    def alive(self) -> bool:
        """False when the link's own thread has died (the watchdog's question)."""
        thread = getattr(self, "_thread", None)
        return thread is None or thread.is_alive()

    def heartbeats(self) -> list[Heartbeat]:
        """The loops this link depends on, whose turning the watchdog checks (see
        gateway/progress.py); none for a link that lives on the MQTT thread (wifi)."""
        return []

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def set_led(self, command: LedCommand) -> bool: ...

    def stored(self, rows: list[Row]) -> None:  # noqa: B027  (optional: most links acknowledge nothing)
        """The store has these readings of this device on disk (committed now, or refused
        as stored already), for a link whose Pico keeps them until told (wifi; the serial
        links' sessions are told themselves). Called on the committing thread: must not block."""


class ThreadedLink(Link):
    """A link that runs one thread of its own (``_run``), stopped through ``_stop``."""

    def __init__(self, config: DeviceConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"link-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait up to STOP_JOIN seconds for it. A thread still
        inside a call that does not return (a driver, a port) is abandoned, logged and
        counted (``stop_abandoned``): it is a daemon thread and ends with the process; what
        it holds is released then, not by :meth:`closed`, which it could block."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(STOP_JOIN)
            if thread.is_alive():
                self.stats["stop_abandoned"] += 1
                self.log.warning("the link's thread did not end within %g s of being asked to stop; "
                                 "left to end with the process", STOP_JOIN)
                return
            self._thread = None
        self.closed()

    def closed(self) -> None:
        """Release what the link holds, after its thread has ended."""

    @abstractmethod
    def _run(self) -> None: ...


class PollingLink(ThreadedLink):
    """A link that asks the Pico every ``poll_interval`` seconds (i2c, tcp, usb REPL).

    ``poll`` raises OSError when the Pico does not answer: the device goes
    offline and is asked again with backoff (doubling up to ``max_backoff``);
    the first answer brings it back online. Any other exception is a bug (ours, a
    driver's, a library's): it is counted as ``internal_errors``, logged once per
    kind with its traceback, and treated the same way, so that the device comes back
    when the fault goes instead of staying dead behind a healthy-looking process.

    The thread beats its heartbeat (``link-<device>``) before each poll, with the
    poll's own timeouts, and before each sleep, with the sleep: it is stalled only
    when a poll outlasts every timeout it has (see :meth:`poll_timeout`).
    """

    online_reason = "answers polls"
    max_backoff = 60.0
    POLL_EXCHANGES = 6  # exchanges a poll may wait for: its own (tcp: two), a command's ahead of
    # it on the link's lock (a toggle over tcp: three), and one more for a slow name lookup

    def __init__(self, config: DeviceConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self.heartbeat = Heartbeat(f"link-{config.id}", self.poll_timeout())
        self._bugs = Once()  # kinds of internal error logged already

    @abstractmethod
    def poll(self) -> None: ...

    def poll_timeout(self) -> float:
        """The longest one poll may legitimately take, in seconds: POLL_EXCHANGES
        exchanges, each within the link's ``command_timeout`` and ``connect_timeout``."""
        per_exchange = self.config.command_timeout + getattr(self.config, "connect_timeout", 0.0)
        return self.POLL_EXCHANGES * per_exchange

    def heartbeats(self) -> list[Heartbeat]:
        return [self.heartbeat]

    def _run(self) -> None:
        interval: float = self.config.poll_interval  # type: ignore[attr-defined]
        backoff = Backoff(min(interval, 0.5), max(self.max_backoff, interval))
        heartbeat = self.heartbeat
        while not self._stop.is_set():
            heartbeat.beat()
            try:
                self.poll()
                backoff.reset()
                self.set_online(True, self.online_reason)
                delay = interval
            except OSError as exc:
                self.stats["poll_errors"] += 1
                self._offline(str(exc))
                delay = backoff.next()
            except Exception as exc:  # a bug must not end this device's polling for good
                self.stats["internal_errors"] += 1
                if self._bugs.first(f"{type(exc).__name__}: {exc}"[:200]):
                    self.log.exception("error while polling (survived, counted as internal_errors; "
                                       "polling again with backoff)")
                self._offline(f"internal error: {type(exc).__name__}")
                delay = backoff.next()
            heartbeat.beat(delay)
            self._stop.wait(delay)

    def _offline(self, reason: str) -> None:
        try:
            self.set_online(False, reason)
        except Exception:  # reporting went wrong too: counted, and the loop goes on
            self.stats["internal_errors"] += 1
            if self._bugs.first("set_online"):
                self.log.exception("error while reporting the device offline (survived)")
