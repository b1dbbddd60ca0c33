"""Link counters that count for as long as the database lives, not for one run.

``seq_gaps`` (readings lost on the wire, from sequence numbers) is only worth
watching if it never goes back to 0: a loss a week ago must still show after the
gateway restarted. Its value is kept in the store's ``counters`` table: read once,
before the links start (their counters go on from there), and written whenever the
diagnostics are published (every ``diagnostics_interval`` and at stop) if it
changed. A gateway killed outright loses at most the counts since the last
publish.

    kept = KeptCounters(store)
    kept.restore(bridge.links)      # before bridge.start()
    kept.save(bridge.links, wait=1.0)
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.links.base import Link
    from gateway.store import Store

log = logging.getLogger("gateway.kept_counters")

KEPT = ("seq_gaps",)


class KeptCounters:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._restored = False
        self._saved: dict[tuple[str, str], int] = {}
        self._save_failed = False

    def restore(self, links: Mapping[str, Link]) -> None:
        """Add the kept values to the links' counters. Call it before the links start:
        their threads count into the same Counters. If the store cannot say, nothing is
        ever saved in this run (saving would overwrite the kept totals with this run's)."""
        try:
            kept = self.store.counters()
        except sqlite3.Error as exc:
            log.error("cannot read the kept counters (%s): %s count from 0 in this run and are not saved",
                      exc, ", ".join(KEPT))
            return
        for (device, name), value in kept.items():
            link = links.get(device)
            if link is not None and name in KEPT:
                link.stats[name] += value
        self._saved = dict(kept)
        self._restored = True

    def restore_device(self, device: str, link: Link) -> None:
        """A device a reload added: its kept values, as :meth:`restore` gives them at a
        start. Nothing when this run's restore failed (it saves nothing, so the kept
        totals of the others stay as they are)."""
        if not self._restored:
            return
        try:
            kept = self.store.counters()
        except sqlite3.Error as exc:
            log.error("cannot read the kept counters of %s (%s): they count from 0", device, exc)
            return
        for (owner, name), value in kept.items():
            if owner == device and name in KEPT:
                link.stats[name] += value
                self._saved[(owner, name)] = value

    def save(self, links: Mapping[str, Link], wait: float | None = None) -> None:
        """Write the values that changed since the last save; ``wait``: seconds to wait
        for the database writer (a store error is logged once and tried again next time)."""
        if not self._restored:
            return
        values = {(device, name): link.stats[name] for device, link in list(links.items()) for name in KEPT}
        changed = {key: value for key, value in values.items() if value != self._saved.get(key, 0)}
        if not changed:
            return
        try:
            self.store.keep_counters(changed, wait=wait)
        except sqlite3.Error as exc:  # (StoreBusy included: a commit the disk does not answer)
            if not self._save_failed:
                log.warning("cannot save the kept counters yet (%s); trying again at the next diagnostics", exc)
            self._save_failed = True
            return
        self._save_failed = False
        self._saved.update(changed)
