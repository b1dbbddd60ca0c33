"""Health means progress: every loop of the gateway proves, turn by turn, that it still turns.

A thread can be alive and do nothing: a deadlock, a read that never returns, a hook
that blocks. So each loop (the MQTT network loop, the outbox's database writer, the
serial thread, each polling link's thread) owns a :class:`Heartbeat` and beats it
once per turn. A beat stores the time and how long the loop expects its next turn to
take at most; the loop is *stalled* when it has not beaten again within
:meth:`Heartbeat.bound` of that: twice the expected time, and at least ``slack``
(10 s) more than it, so a turn that is merely slow (a loaded Pi, an SD card's fsync)
never reads as stalled.

A loop that sleeps on purpose says so in its beat: a polling link beats with its
poll's own timeouts before it polls, and with its sleep (the poll interval, or a
backoff of up to a minute) before it sleeps.

A beat costs one ``time.monotonic()`` and one attribute store, no lock: the
watchdog and the diagnostics read the last beat from their own threads.

    heartbeat = Heartbeat("outbox", expected=0.5)
    while running:
        heartbeat.beat()          # or heartbeat.beat(expected=60) before a long sleep
        turn()
    first_stall([heartbeat])      # from another thread: None, or a Stall naming it
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.payloads import LoopReport

SLACK = 10.0  # seconds a turn may overrun what its loop expects, at least


@dataclass(frozen=True)
class Stall:
    """A loop that has not turned within its bound."""

    loop: str
    idle_s: float  # seconds since its last turn began
    bound_s: float

    def __str__(self) -> str:
        return f"the {self.loop} loop has not turned for {self.idle_s:.1f} s (bound {self.bound_s:.1f} s)"


class Heartbeat:
    """The last turn of one loop. ``loop`` names it as its thread is named (``mqtt``,
    ``outbox``, ``serial``, ``link-<device>``); ``expected`` is the longest its turn
    takes, sleeping included, when it is well."""

    __slots__ = ("loop", "expected", "slack", "_last")

    def __init__(self, loop: str, expected: float, slack: float = SLACK) -> None:
        self.loop = loop
        self.expected = expected
        self.slack = slack
        self._last: tuple[float, float] | None = None  # (monotonic time, expected); None: not started

    def beat(self, expected: float | None = None) -> None:
        """A turn begins; the next one begins within ``expected`` seconds (default: the loop's)."""
        # One tuple, one store: a reader on another thread never sees a time with another beat's bound.
        self._last = (time.monotonic(), self.expected if expected is None else expected)

    def bound(self, expected: float) -> float:
        return expected + max(self.slack, expected)

    def _overdue(self, now: float | None) -> tuple[float, float] | None:
        """(seconds since the last turn began, the bound for it); None before the first turn."""
        last = self._last
        if last is None:
            return None
        return (time.monotonic() if now is None else now) - last[0], self.bound(last[1])

    def stall(self, now: float | None = None) -> Stall | None:
        """A Stall when the loop is overdue, else None (also before its first turn)."""
        overdue = self._overdue(now)
        if overdue is None or overdue[0] <= overdue[1]:
            return None
        return Stall(self.loop, *overdue)

    def report(self, now: float | None = None) -> LoopReport:
        """For the diagnostics: seconds since its last turn, its bound now, and whether it is stalled."""
        overdue = self._overdue(now)
        if overdue is None:
            return {"idle_s": None, "bound_s": None, "stalled": False}
        idle, bound = overdue
        return {"idle_s": round(idle, 1), "bound_s": round(bound, 1), "stalled": idle > bound}


def first_stall(heartbeats: Iterable[Heartbeat]) -> Stall | None:
    """The first stalled loop among ``heartbeats``, or None when all of them turn."""
    now = time.monotonic()
    for heartbeat in heartbeats:
        stall = heartbeat.stall(now)
        if stall is not None:
            return stall
    return None
