"""Exponential retry delays, shared by the links and the MQTT connection.

    >>> b = Backoff(first=1, cap=30)
    >>> b.next(), b.next(), b.next()
    (1, 2, 4)
    >>> b.reset(); b.next()
    1
"""

from __future__ import annotations


class Backoff:
    """Exponential reconnect delays: 0.5 s, 1 s, 2 s ... capped, reset on success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first
