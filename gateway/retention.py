"""Retention: roll up, age out and bound the readings database, in the background.

Every PASS_INTERVAL seconds (the first one FIRST_DELAY seconds after the start; the
environment variables PICOGW_RETENTION_INTERVAL and PICOGW_RETENTION_DELAY change
them, for tests and benchmarks) the gateway starts a pass in a child process of its own
(``python -I -S gateway/rollups.py``, standard library only, at a lower CPU
priority): it rolls up the readings stored since the last pass, per minute and
per hour, deletes raw readings older than ``store.keep_raw_days`` and roll-ups older
than ``store.keep_rollups_days``, and keeps the database under
``store.max_size_mb``. Its own connection, its own process and transactions of at
most 2000 rows keep it from holding up ingest: the writer's commits wait a few
milliseconds at most for the write lock (measured in docs/performance.md). Unsent
readings are never rolled up or deleted (gateway/rollups.py).

The counters go into the bridge diagnostics (``retention_*``, docs/topics.md). When
``max_size_mb`` made it delete raw readings before their time, the log says which
(how many, from when to when) at most once a day.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from gateway import rollups
from gateway.config import StoreConfig
from gateway.features import Feature
from gateway.log_once import Once
from gateway.stored import iso_utc

log = logging.getLogger("gateway.retention")

PASS_INTERVAL = 60.0  # seconds between the starts of two passes
FIRST_DELAY = 10.0  # seconds after the start before the first pass (PICOGW_RETENTION_DELAY changes it)
SIZE_REPORT_EVERY = 86400.0  # seconds: what max_size_mb deleted is said at most this often
_ROLLUPS = str(Path(rollups.__file__).resolve())
DAY_MS = 86_400_000


def pass_command(config: StoreConfig) -> list[str]:
    """The child process's command line for one pass over ``config.path``."""
    keep_rollups = -1 if config.keep_rollups_days == "forever" else int(float(config.keep_rollups_days) * DAY_MS)
    max_size = -1 if config.max_size_mb is None else int(config.max_size_mb * 1024 * 1024)  # (MiB, as disk_budget)
    return [sys.executable, "-I", "-S", _ROLLUPS, str(config.path), str(int(config.keep_raw_days * DAY_MS)),
            str(keep_rollups), str(max_size)]


class Retention(Feature):
    name = "retention"
    stop_floor = 0.5

    def __init__(self, config: StoreConfig, stats: Counter[str], interval: float = PASS_INTERVAL) -> None:
        """``stats``: the bridge's counters, where the ``retention_*`` ones go."""
        super().__init__()
        self.config = config
        self.stats = stats
        self.interval = float(os.environ.get("PICOGW_RETENTION_INTERVAL", interval))
        self.first_delay = float(os.environ.get("PICOGW_RETENTION_DELAY", FIRST_DELAY))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._errors = Once()
        # What max_size_mb deleted since it was last said: count, oldest ts, newest ts.
        self._size_pending: list[int] = [0, 0, 0]
        self._size_said = -SIZE_REPORT_EVERY

    @property
    def current_pass(self) -> subprocess.Popen[bytes] | None:
        """The child process of the pass in progress, if one is."""
        return self._proc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the loop; a pass in progress is ended (its open transaction is rolled back,
        what it committed stays: the next pass goes on from there)."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        self._thread.join(timeout=0.3)
        super().stop()

    def _run(self) -> None:
        wait = self.first_delay
        while not self._stop.wait(wait):
            started = time.monotonic()
            self.run_pass()
            wait = max(1.0, self.interval - (time.monotonic() - started))

    def run_pass(self) -> dict[str, float] | None:
        """One pass, in a child process; its figures (None when it failed: counted and logged)."""
        with self._lock:
            if self._stop.is_set():
                return None
            proc = self._proc = subprocess.Popen(pass_command(self.config), stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        out, err = proc.communicate()
        with self._lock:
            self._proc = None
        if self._stop.is_set():
            return None
        try:
            result = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = {"error": f"the pass ended with code {proc.returncode}: "
                               f"{err.decode('utf-8', 'replace').strip()[-300:] or 'no output'}"}
        if "error" in result:
            self.stats["retention_errors"] += 1
            if self._errors.first(str(result["error"])[:200]):
                log.error("retention pass on %s failed (tried again in %g s; logged once): %s",
                          self.config.path, self.interval, result["error"])
            return None
        self._count(result)
        return result

    def _count(self, r: dict[str, float]) -> None:
        s = self.stats
        s["retention_passes"] += 1
        s["retention_rolled"] += int(r["rolled"])
        s["retention_deleted_raw"] += int(r["deleted_raw"])
        s["retention_deleted_rollups"] += int(r["deleted_rollups"])
        s["retention_deleted_for_size"] += int(r["deleted_for_size"])
        # The last pass's view (not sums): how long it took, whether unsent readings held it.
        s["retention_last_pass_ms"] = int(r["seconds"] * 1000)
        s["retention_held_by_unsent"] = int(r["held_by_unsent"])
        s["retention_db_used_bytes"] = int(r["used_bytes"])
        if r["deleted_for_size"]:
            pending = self._size_pending
            lo, hi = int(r["size_deleted_from_ts"]), int(r["size_deleted_until_ts"])
            pending[1] = lo if not pending[0] else min(pending[1], lo)
            pending[2] = max(pending[2], hi)
            pending[0] += int(r["deleted_for_size"])
        if r.get("over_size") and self._errors.first("over size"):
            log.error("the database is still above store.max_size_mb = %g after deleting every raw reading it "
                      "may (the rest are not rolled up or not published yet, or the roll-ups alone fill it)",
                      self.config.max_size_mb)
        now = time.monotonic()
        if self._size_pending[0] and now - self._size_said >= SIZE_REPORT_EVERY:
            self._size_said = now
            n, lo, hi = self._size_pending
            self._size_pending = [0, 0, 0]
            log.warning("store.max_size_mb = %g: deleted %d raw reading(s) from %s to %s before their %g days "
                        "(their per-minute and per-hour roll-ups stay); said at most once a day",
                        self.config.max_size_mb, n, iso_utc(lo), iso_utc(hi), self.config.keep_raw_days)
