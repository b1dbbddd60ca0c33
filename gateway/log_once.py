"""Log a kind of problem the first time it happens, not every time: a flood of bad
input must not become a flood of log lines (it is counted anyway).

    >>> once = Once()
    >>> once.first("ValueError: bad frame"), once.first("ValueError: bad frame")
    (True, False)

so that a caller writes::

    if once.first("ValueError: bad frame"):
        log.warning("...")
"""

from __future__ import annotations

from collections.abc import Hashable


class Once:
    """The kinds already seen, at most ``limit`` of them: past that, nothing new is
    reported (distinct kinds chosen by a sender must not grow memory without end)."""

    def __init__(self, limit: int = 100) -> None:
        self._seen: set[Hashable] = set()
        self._limit = limit

    def first(self, kind: Hashable) -> bool:
        """True the first time ``kind`` is asked about (while under the limit)."""
        if kind in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add(kind)
        return True
