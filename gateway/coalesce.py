"""One run for a burst of requests: at most one run pending, and runs spaced apart.

A trigger anyone on the broker can send (Home Assistant's birth message, an owner
claim) must not cost a run, or a thread, per message: 5,000 ``online`` in a second
are one discovery republish, not 5,000. Requests that arrive while a run is
pending are absorbed by it; one that arrives while a run is under way schedules
the next, ``spacing`` seconds after the last began (it may have read the state
too early)::

    republish = Coalesced(discovery.publish_all, "ha-republish", spacing=5.0,
                          delay=lambda: random.uniform(0, 5))
    republish.request()   # from any thread; returns at once
    republish.stop()      # a pending run is cancelled

A pending run waits on one ``threading.Timer``: a burst costs one thread, alive
until its run is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("gateway.coalesce")


class Coalesced:
    def __init__(self, action: Callable[[], object], name: str, spacing: float = 0.0,
                 delay: Callable[[], float] = lambda: 0.0) -> None:
        """``delay()``: seconds from a request to its run (at least; ``spacing`` may add)."""
        self._action = action
        self.name = name
        self._spacing = spacing
        self._delay = delay
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last_run: float | None = None  # time.monotonic() when the last run began
        self._stopped = False
        self.stats: Counter[str] = Counter()  # requests, absorbed, runs, errors

    def request(self) -> bool:
        """Ask for a run; False when one was pending already and takes this request too."""
        with self._lock:
            if self._stopped:
                return False
            self.stats["requests"] += 1
            if self._timer is not None:
                self.stats["absorbed"] += 1
                return False
            now = time.monotonic()
            due = now + max(0.0, self._delay())
            if self._last_run is not None:
                due = max(due, self._last_run + self._spacing)
            timer = self._timer = threading.Timer(due - now, self._run)
            timer.name, timer.daemon = self.name, True
            timer.start()
        return True

    def pending(self) -> bool:
        with self._lock:
            return self._timer is not None

    def _run(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._timer = None
            self._last_run = time.monotonic()
        self.stats["runs"] += 1
        try:
            self._action()
        except Exception:  # a timer thread must not die silently
            self.stats["errors"] += 1
            log.exception("%s failed", self.name)

    def stop(self) -> None:
        """Cancel a pending run; later requests are ignored."""
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
