"""Commands waiting for their answer, matched by id."""

from __future__ import annotations

import threading


class PendingAnswers:
    """Command ids waiting for their answer, shared by a sender and a reader thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[threading.Event, list[object]]] = {}

    def expect(self, key: int) -> None:
        with self._lock:
            self._waiting[key] = (threading.Event(), [])

    def resolve(self, key: int, answer: object) -> bool:
        """Hand ``answer`` to whoever waits for ``key``; False if nobody does."""
        with self._lock:
            slot = self._waiting.get(key)
        if slot is None:
            return False
        slot[1].append(answer)
        slot[0].set()
        return True

    def wait(self, key: int, timeout: float) -> object | None:
        """The answer, or None after ``timeout`` seconds. Always forgets ``key``."""
        with self._lock:
            slot = self._waiting.get(key)
        try:
            if slot is None or not slot[0].wait(timeout):
                return None
            return slot[1][0]
        finally:
            self.forget(key)

    def forget(self, key: int) -> None:
        with self._lock:
            self._waiting.pop(key, None)
