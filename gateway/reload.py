"""Reading the config again without a restart: ``systemctl reload pico-gateway`` (SIGHUP).

The signal handler only wakes the reload thread (a handler runs between two
bytecodes of the main thread, which must not stop links or wait on the broker);
the thread then:

1. tells systemd ``RELOADING=1`` (with ``MONOTONIC_USEC``, as ``Type=notify-reload``
   wants it);
2. reads the file with the same validation as ``check-config`` and ``run``
   (:func:`gateway.config.load_runnable`). A file with problems changes nothing:
   every problem is logged with its key, and the running config stays;
3. compares the devices by id with those running: removed devices stop (their
   retained status, LED state, claim, diagnostics and Home Assistant configs are
   cleared), changed ones (any key) get a new link, added ones start. The links
   of the others are not touched: their readings go on without a gap;
4. applies ``diagnostics_interval``; the settings that only a restart can change
   (:data:`RESTART_ONLY`: the broker connection, the database, the gateway's id,
   Home Assistant's discovery, adoption) are named in the log, with "restart
   needed", and keep their running values;
5. tells systemd ``READY=1``, whatever the outcome.

A SIGHUP during a reload asks for one more after it. See docs/systemd.md, "Reload".
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import BaseModel

from gateway.config import ConfigError, GatewayConfig, load_runnable
from gateway.features import Feature
from gateway.links.base import DeviceConfig

if TYPE_CHECKING:
    from gateway.bridge import Bridge
    from gateway.diagnostics import Diagnostics
    from gateway.discovery import Discovery
    from gateway.kept_counters import KeptCounters
    from gateway.systemd import Notifier

log = logging.getLogger("gateway.reload")

RESTART_ONLY = ("gateway_id", "mqtt", "store", "homeassistant", "adopt_wifi_picos")
"""Top-level settings a reload does not apply: the connection, the database and the
parts built on them are made once, at the start."""
STOP_JOIN = 0.5  # seconds the stop waits for a reload in progress: a reload takes milliseconds, and the
# gateway's whole stop has 4 s (daemon.STOP_BUDGET); one still running then is left to end with the process


@dataclass
class Changes:
    """What a new config changes, compared with the running one."""

    added: list[DeviceConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[DeviceConfig] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)  # keys, e.g. "store.path"
    diagnostics_interval: float | None = None  # the new one, when it changed

    def summary(self) -> str:
        parts = [f"{what} {', '.join(ids)}" for what, ids in (
            ("added", [d.id for d in self.added]), ("removed", self.removed),
            ("restarted", [d.id for d in self.changed])) if ids]
        if self.diagnostics_interval is not None:
            parts.append(f"diagnostics_interval {self.diagnostics_interval:g} s")
        parts.append(f"{len(self.unchanged)} device(s) unchanged")
        return "; ".join(parts)


def restart_keys(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The keys of :data:`RESTART_ONLY` whose values differ, section keys one by one."""
    keys: list[str] = []
    for name in RESTART_ONLY:
        old_value, new_value = getattr(running, name), getattr(new, name)
        if old_value == new_value:
            continue
        if isinstance(old_value, BaseModel):
            keys += [f"{name}.{key}" for key in type(old_value).model_fields
                     if getattr(old_value, key) != getattr(new_value, key)]
        else:
            keys.append(name)
    return keys


def compare(running: GatewayConfig, new: GatewayConfig) -> Changes:
    """What applying ``new`` over ``running`` does (devices by id, in the new file's order)."""
    old = {d.id: d for d in running.devices}
    changes = Changes(removed=[d for d in old if new.device(d) is None], restart_needed=restart_keys(running, new))
    for device in new.devices:
        before = old.get(device.id)
        if before is None:
            changes.added.append(device)
        elif before != device:
            changes.changed.append(device)
        else:
            changes.unchanged.append(device.id)
    if new.diagnostics_interval != running.diagnostics_interval:
        changes.diagnostics_interval = new.diagnostics_interval
    return changes


def applied(running: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """What runs after ``new`` is applied: ``new``, but for the settings that wait for a restart."""
    return new.model_copy(update={name: getattr(running, name) for name in RESTART_ONLY})


class Reloader(Feature):
    """Reloads ``path`` on SIGHUP (or :meth:`request`), into the running parts."""

    name = "reload"
    stop_floor = STOP_JOIN

    def __init__(self, path: str | Path, running: GatewayConfig, bridge: Bridge, discovery: Discovery,
                 diagnostics: Diagnostics, kept: KeptCounters, notifier: Notifier) -> None:
        super().__init__()
        self.path = path
        self.running = running
        self.bridge = bridge
        self.discovery = discovery
        self.diagnostics = diagnostics
        self.kept = kept
        self.notifier = notifier
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reload", daemon=True)

    def start(self) -> None:
        self._thread.start()
        # Only the main thread may install handlers (a test running the daemon in a thread
        # calls request() instead). The handler stays after the stop (which runs on another
        # thread, where handlers cannot be changed): a SIGHUP then wakes nobody.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._on_signal)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        super().stop()
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN)

    def request(self) -> None:
        """Ask for a reload (what SIGHUP does); it runs on the reload thread."""
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._wake.set()  # (nothing else here: see the module's docstring)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping.is_set():
                return
            self._wake.clear()
            try:
                self.reload()
            except Exception:  # the thread must live on for the next SIGHUP
                log.exception("reload failed unexpectedly; the gateway runs on")

    def reload(self) -> Changes | None:
        """Read the file and apply it; the changes applied, or None when it was refused."""
        began = time.monotonic()
        self.notifier.reloading("reloading the config")
        log.info("reloading %s", self.path)
        status = f"running: {len(self.bridge.links)} device(s)"
        try:
            try:
                new, _ = load_runnable(self.path, running=True)  # (its notes were for check-config)
            except ConfigError as exc:
                self.bridge.stats["reloads_refused"] += 1
                log.error("reload refused: %s has %d problem(s); the running config stays", self.path,
                          len(exc.problems))
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                status += f"; reload refused: {len(exc.problems)} problem(s) in {self.path}"
                return None
            changes = compare(self.running, new)
            self._apply(changes)
            self.running = applied(self.running, new)
            status = f"running: {len(self.bridge.links)} device(s)"
            if changes.restart_needed:
                log.warning("reload: %s changed: restart needed (systemctl restart pico-gateway); the running "
                            "value(s) stay until then", ", ".join(changes.restart_needed))
                status += f"; restart needed for {', '.join(changes.restart_needed)}"
            log.info("reloaded %s in %.0f ms: %s", self.path, (time.monotonic() - began) * 1000, changes.summary())
            return changes
        finally:
            self.bridge.stats["reloads"] += 1  # (published in the bridge diagnostics)
            self.notifier.ready(status)

    def _apply(self, changes: Changes) -> None:
        bridge, discovery = self.bridge, self.discovery
        # Removed first, then the changed: a port one of them held may be another's now.
        if changes.removed:
            bridge.remove_devices(changes.removed)
            for device_id in changes.removed:
                self.diagnostics.forget(device_id)
                discovery.remove_device(device_id)
        added = [d for d in changes.added if d.id not in bridge.links]
        # (one already bridged was adopted, gateway/adoption.py: now the config says what it is)
        restarted = changes.changed + [d for d in changes.added if d.id in bridge.links]
        if restarted:
            bridge.restart_devices(restarted)
        for device in added:
            link = bridge.add_device(device)
            self.kept.restore_device(device.id, link)  # (seq_gaps goes on from the database's, as at a start)
            bridge.start_device(device.id)
        for device in restarted + added:
            discovery.set_device(device)
        if changes.diagnostics_interval is not None:
            self.diagnostics.set_interval(changes.diagnostics_interval)
