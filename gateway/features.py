"""One lifecycle for the parts of a running gateway: start in order, stop in reverse.

Every part around the bridge (Home Assistant discovery, diagnostics, adoption of
Wi-Fi Picos, the watch on other gateways' claims, systemd's watchdog) is a
:class:`Feature`: its constructor takes what it needs and does nothing else;
:meth:`Feature.start` adds its hooks (MQTT subscriptions, connect hooks) and
starts its threads; :meth:`Feature.stop` ends them and removes every hook it
added, so a message on one of its topics has no effect after its stop. Each
hook is added through :meth:`Feature.hook`, which keeps the remover that
``MqttConnection.subscribe`` / ``on_connect`` / ``on_disconnect`` / ``after_io``
return::

    class Echo(Feature):
        name = "echo"

        def __init__(self, mqtt: MqttConnection) -> None:
            super().__init__()
            self.mqtt = mqtt

        def start(self) -> None:
            self.hook(self.mqtt.subscribe("pico/echo", self._on_echo))

:class:`Lifecycle` starts a list of parts in one loop and stops them in reverse
order in one loop, within one time budget: a stop that raises is logged and the
others still run; a stop that does not return within what is left of the budget
(at least its ``stop_floor``) is logged, counted and left to end with the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger("gateway.features")

Remover = Callable[[], None]
STOP_FLOOR = 0.1  # seconds each stop may take at least, even when the budget is spent
STOP_GRACE = 0.2  # seconds a stop bounded by the budget itself is given beyond it, to return


class Part(Protocol):
    """What :class:`Lifecycle` runs: a name, start, stop, and the least time its stop gets."""

    name: str
    stop_floor: float

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Feature:
    """Base of the parts around the bridge; a subclass names itself and overrides
    :meth:`start` (adding hooks with :meth:`hook`) and, when it has threads or final
    messages, :meth:`stop` (calling ``super().stop()`` to remove its hooks)."""

    name = "feature"
    stop_floor = STOP_FLOOR

    def __init__(self) -> None:
        self._removers: list[Remover] = []
        self._hooks_lock = threading.Lock()

    def hook(self, remover: Remover | None) -> None:
        """Keep what removes a hook this feature added; :meth:`stop` calls it. (None: the
        hook came with no remover, as from a test's stand-in for a connection.)"""
        if remover is not None:
            with self._hooks_lock:
                self._removers.append(remover)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.unhook()

    def unhook(self) -> None:
        """Remove every hook added so far, the last first."""
        with self._hooks_lock:
            removers, self._removers = self._removers, []
        for remove in reversed(removers):
            remove()


class Step:
    """A part made of two callables, for what is not a Feature (the MQTT connection,
    systemd's watchdog)."""

    def __init__(self, name: str, start: Callable[[], object], stop: Callable[[], object],
                 stop_floor: float = STOP_FLOOR) -> None:
        self.name = name
        self.stop_floor = stop_floor
        self._start, self._stop = start, stop

    def start(self) -> None:
        self._start()

    def stop(self) -> None:
        self._stop()


class Lifecycle:
    """Starts parts in order; stops those started in reverse, within ``budget`` seconds."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.started: list[Part] = []
        self.stats: Counter[str] = Counter()
        self._deadline: float | None = None

    def start(self, parts: Sequence[Part]) -> None:
        """Start each in turn. When one raises, those already started are stopped (in
        reverse) and the error goes on to the caller: a half-started gateway does not run."""
        for part in parts:
            try:
                part.start()
            except BaseException:
                log.error("starting %s failed; stopping what had started", part.name)
                self.stop()
                raise
            self.started.append(part)

    def time_left(self, floor: float = 0.0) -> float:
        """Seconds left of the stop's budget (the whole budget before the stop), at least ``floor``."""
        deadline = self._deadline if self._deadline is not None else time.monotonic() + self.budget
        return max(floor, deadline - time.monotonic())

    def stop(self) -> None:
        """Stop every part started, the last first, each on a thread of its own so that
        none can hold up the others or the end of the budget."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.budget
        while self.started:
            part = self.started.pop()
            self._stop_one(part)

    def _stop_one(self, part: Part) -> None:
        failed: list[BaseException] = []

        def run() -> None:
            try:
                part.stop()
            except BaseException as exc:  # (logged below, on the stopping thread: in order)
                failed.append(exc)

        allowed = self.time_left(part.stop_floor) + STOP_GRACE
        thread = threading.Thread(target=run, name=f"stop-{part.name}", daemon=True)
        thread.start()
        thread.join(allowed)
        if thread.is_alive():
            self.stats["stops_abandoned"] += 1
            log.warning("%s did not stop within %.1f s; left to end with the process", part.name, allowed)
        elif failed:
            self.stats["stop_failures"] += 1
            exc = failed[0]
            log.error("stopping %s failed (the others still stop): %s: %s", part.name, type(exc).__name__, exc,
                      exc_info=exc)
