"""How big the database is, how much the gateway writes, and when the disk will be full.

Published in the bridge diagnostics (``"disk"``, gateway/payloads.py ``DiskBudget``)
and shown by ``pico-gateway status``:

* the database's size: its pages in use (``page_count - freelist_count``: what the
  readings take), and its files on disk (the database, its WAL and its -shm);
* what the gateway writes, in bytes per day: the kernel's ``write_bytes`` of the
  gateway and of its database writer process (``/proc/<pid>/io``: the file pages
  they dirtied, which the disk, an SD card's flash, has to write: WAL, checkpoints
  and all). A writer that ended was waited for by the gateway, and the kernel adds
  its count to the gateway's, so the sum only grows;
* the growth of the pages in use per day, and from it the days until the database
  reaches ``store.max_size_mb`` (where the oldest raw readings start to go) or its
  filesystem is full, whichever comes first.

Rates are over a window of the last WINDOW seconds (shorter after a start, and not
given until MIN_SPAN seconds are covered): a rate over the process's whole life
would still show a backlog's burst of writes days later.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

from gateway import payloads
from gateway.payloads import DiskBudget
from gateway.store import Store

WINDOW = 86400.0  # seconds the rates are measured over, at most
MIN_SPAN = 2.0  # seconds the window must cover before a rate is given
MAX_SAMPLES = 2000  # samples kept over the window, one per WINDOW / MAX_SAMPLES at most
DAY = 86400.0


def written_bytes(pid: int | str = "self") -> int | None:
    """``write_bytes`` of a process (and of the children it has waited for), or None
    where /proc does not say (not Linux, or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def on_disk(path: Path) -> int:
    """Bytes of the database's files: the database, its WAL and its WAL index."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total


def free_space(path: Path) -> int | None:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class DiskBudgetMeter:
    """Samples the database's size and the gateway's writes (at each diagnostics round)
    and reports the rates over the window; not thread-safe (the diagnostics' lock)."""

    def __init__(self, store: Store, max_size_mb: float | None, window: float = WINDOW,
                 min_span: float = MIN_SPAN) -> None:
        self.store = store
        self.max_bytes = None if max_size_mb is None else int(max_size_mb * 1024 * 1024)
        self.window = window
        self.min_span = min_span
        self._samples: deque[tuple[float, int | None, int]] = deque()  # (monotonic, written, used bytes)

    def written(self) -> int | None:
        """Bytes the gateway and its database writer have written so far (None: /proc does not say)."""
        own = written_bytes()
        if own is None:
            return None
        pid = self.store.writer_pid  # (none between writers: the ended one is in our own count)
        return own + ((written_bytes(pid) if pid is not None else None) or 0)

    def report(self, wait: float | None = None) -> DiskBudget:
        """Sample now and report; StoreBusy (from the store) when the writer is busy
        for longer than ``wait``."""
        used = self.store.size(wait=wait)
        now = time.monotonic()
        written = self.written()
        samples = self._samples
        # One sample per window/MAX_SAMPLES at most (the rates use the oldest one and now),
        # and the oldest goes once the next one also covers the window.
        if not samples or now - samples[-1][0] >= self.window / MAX_SAMPLES:
            samples.append((now, written, used))
        while len(samples) > 1 and samples[1][0] <= now - self.window:
            samples.popleft()
        t0, written0, used0 = samples[0]
        span = now - t0
        per_day = written_day = None
        if span >= self.min_span:
            per_day = (used - used0) / span * DAY
            if written is not None and written0 is not None:
                written_day = (written - written0) / span * DAY
        free = free_space(self.store.path)
        days, full_at = None, None
        if per_day is not None and per_day > 0:
            candidates = []
            if self.max_bytes is not None:
                candidates.append((max(0, self.max_bytes - used) / per_day, "max_size_mb"))
            if free is not None:
                candidates.append((free / per_day, "disk"))
            if candidates:
                days, full_at = min(candidates)
        return payloads.disk_budget(used, on_disk(self.store.path), free, written_day, per_day, days, full_at,
                                    round(span, 1), self.max_bytes)
