"""Per-device health counters, published where people and Home Assistant can see them.

Every ``interval`` seconds (and at stop) the gateway publishes, retained:

* ``<base>/<device>/diagnostics``: ``gateway.payloads.DeviceDiagnostics``, the
  link's counters (``"counters"``: every raw one), plus the fields the link adds of
  its own (``Link.diagnostic_fields``; a tutorial UART Pico's ``led_state``)
* ``<base>/bridge/<gateway_id>/diagnostics``: ``gateway.payloads.BridgeDiagnostics``,
  the outbox, MQTT and store counters, and
  ``"health"``: ``{"state": "healthy" | "unhealthy" | "stopped", "problem": why not
  healthy (e.g. "the outbox loop has not turned for 42.0 s (bound 30.0 s)"), "at_ms",
  "loops": {"mqtt": {"idle_s", "bound_s", "stalled"}, "outbox": ..., "serial": ...,
  "link-<device>": ...}}``, the watchdog's view (gateway/progress.py). Also published
  within HEALTH_CHECK seconds of a change of state, not only every ``interval``; and
  ``"disk"``: the database's size, the bytes written per day and the days until the
  disk or ``store.max_size_mb`` is full (gateway/disk_budget.py).

A message on ``<base>/bridge/<gateway_id>/diagnostics/refresh`` (not retained; any
payload) asks for both at once: ``pico-gateway status`` sends one, so that it shows
the counters of now, not of up to ``interval`` seconds ago. Anyone who may publish
can send it, so a burst of requests is one publish, and publishes are
REFRESH_SPACING seconds apart at least (gateway/coalesce.py).

At stop (after the bridge's: its links' last counters, the backlog once the outbox
has flushed) both are published once more, with health ``"stopped"``.

Counters count since the gateway started, but ``seq_gaps``, which counts for as long
as the database lives (gateway/kept_counters.py). See docs/topics.md.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway import payloads
from gateway.coalesce import Coalesced
from gateway.features import Feature
from gateway.log_once import Once
from gateway.payloads import Health
from gateway.store import StoreBusy

if TYPE_CHECKING:
    from gateway.bridge import Bridge
    from gateway.disk_budget import DiskBudgetMeter
    from gateway.kept_counters import KeptCounters

log = logging.getLogger("gateway.diagnostics")

STORE_WAIT = 1.0  # seconds the backlog count waits for the database writer
HEALTH_CHECK = 5.0  # seconds between health checks: a change of state is published this soon
REFRESH_SPACING = 1.0  # seconds between two publishes that refresh requests ask for
FINAL_STORE_WAIT = 0.2  # seconds the final backlog count waits for the database writer (part of the stop budget)


def health_report(bridge: Bridge, stopped: bool = False) -> Health:
    """The bridge's health and each loop's last turn, as published (see above)."""
    if stopped:
        return {"state": "stopped", "problem": "", "at_ms": time.time_ns() // 1_000_000, "loops": {}}
    ok, problem = bridge.health()
    now = time.monotonic()
    return {"state": "healthy" if ok else "unhealthy", "problem": problem, "at_ms": time.time_ns() // 1_000_000,
            "loops": {hb.loop: hb.report(now) for hb in bridge.heartbeats()}}


def _state(health: Health) -> tuple[object, ...]:
    """What makes a health report news: its state and which loops are stalled (a stall's
    duration grows by the second; that alone is not worth a message)."""
    stalled = tuple(sorted(loop for loop, report in health["loops"].items() if report["stalled"]))
    return health["state"], stalled, "" if stalled else health["problem"]


class Diagnostics(Feature):
    name = "diagnostics"
    stop_floor = 0.1 + FINAL_STORE_WAIT * 2  # the loop's end, the backlog count, the kept counters' save

    def __init__(self, bridge: Bridge, interval: float, log_health: bool = False,
                 kept: KeptCounters | None = None, disk: DiskBudgetMeter | None = None) -> None:
        """``log_health``: log each change of health (the daemon asks for it when systemd's
        watchdog, which logs them itself, is not active). ``kept``: the counters saved at
        each publish (gateway/kept_counters.py). ``disk``: the disk budget to publish."""
        super().__init__()
        self.kept = kept
        self.disk = disk
        self._disk: payloads.DiskBudget | None = None  # the last report
        self.bridge = bridge
        self.interval = interval
        self.log_health = log_health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diagnostics", daemon=True)
        self._published: tuple[object, ...] = ()  # the health last published
        self._logged: tuple[object, ...] = ()  # and logged
        self._backlog: int | None = None  # the last count (None: not counted yet)
        self._backlog_by_device: dict[str, int] = {}
        self._next_publish = 0.0  # time.monotonic() of the next periodic round
        self._errors_logged = Once()
        self._publishing = threading.Lock()  # one round at a time: the loop's, a refresh's, the last
        self._refresh = Coalesced(self._refreshed, "diagnostics-refresh", spacing=REFRESH_SPACING)

    def start(self) -> None:
        self.hook(self.bridge.mqtt.subscribe(self.bridge.topics.bridge_refresh(self.bridge.gateway_id),
                                             self._on_refresh))
        self._thread.start()

    def stop(self) -> None:
        """End the rounds, then publish the final counters, retained, with health "stopped"."""
        self._stop.set()
        self.unhook()
        self._refresh.stop()
        self._thread.join(timeout=0.1)  # (a round waiting for the store ends on its own; the stop must not wait)
        try:
            self.publish(store_wait=FINAL_STORE_WAIT)
        except sqlite3.Error as exc:  # (the backlog count needs the database)
            log.error("final diagnostics not published: %s", exc)

    def set_interval(self, interval: float) -> None:
        """A new ``diagnostics_interval`` (a reload): the next round is at most that far off."""
        self.interval = interval
        self._next_publish = min(self._next_publish, time.monotonic() + interval)

    def forget(self, device: str) -> None:
        """Clear the retained counters of a device no longer bridged (a reload removed it):
        after any round in progress, which may still have had it."""
        with self._publishing:
            self.bridge.mqtt.publish(self.bridge.topics.diagnostics(device), "", qos=1, retain=True)

    def _on_refresh(self, topic: str, payload: bytes, retained: bool) -> None:
        """The MQTT thread: a request for fresh counters (the round itself runs elsewhere)."""
        if retained:  # it would ask again at every connect: not a request anyone is waiting on
            self.bridge.stats["diagnostics_refresh_retained"] += 1
            if self._errors_logged.first("retained refresh"):
                log.warning("ignoring a retained message on %s (a refresh request must not be retained); "
                            "delete it: mosquitto_pub -r -n -t %s", topic, topic)
            return
        self.bridge.stats["diagnostics_refresh_requests"] += 1
        self._refresh.request()

    def _refreshed(self) -> None:
        if not self._stop.is_set() and not self.bridge.stopping:  # (stopping links are not news: the final round is)
            self._guarded(self.publish)

    def publish(self, health: Health | None = None, store_wait: float = STORE_WAIT) -> None:
        """Publish every device's counters and the bridge's summary, retained; the backlog
        counts wait ``store_wait`` seconds at most for the database writer."""
        with self._publishing:
            self._publish(health, store_wait)

    def _publish(self, health: Health | None, store_wait: float) -> None:
        bridge = self.bridge
        health = health or health_report(bridge, stopped=self._stop.is_set())
        if health["state"] == "unhealthy":
            # The stalled loop may be the outbox, holding the store: say so before asking the store.
            self._publish_summary(self._backlog, health)
        try:  # (bounded: a commit the disk does not answer holds the store, and must not hold this too)
            backlog = bridge.outbox.store.count_unsent_by_device(wait=store_wait)
            self._backlog_by_device = backlog
            self._backlog = sum(backlog.values())
        except StoreBusy:  # the counters matter most then: publish them with the last backlog known
            bridge.stats["diagnostics_store_busy"] += 1
            backlog = self._backlog_by_device
        if self.disk is not None and not self._stop.is_set():  # (the final round keeps to the stop's budget)
            try:
                self._disk = self.disk.report(wait=store_wait)
            except StoreBusy:  # (counted above, or the next round's count will be)
                pass
        for device, link in list(bridge.links.items()):
            report = payloads.device_diagnostics(link.stats, link.online, backlog.get(device, 0),
                                                 bridge.last_seen.get(device), time.time_ns() // 1_000_000,
                                                 link.diagnostic_fields)
            bridge.mqtt.publish(bridge.topics.diagnostics(device), payloads.encode(report), qos=1, retain=True)
        self._publish_summary(self._backlog, health)
        if self.kept is not None:
            self.kept.save(bridge.links, wait=store_wait)

    def _publish_summary(self, backlog: int | None, health: Health) -> None:
        bridge = self.bridge
        summary = payloads.bridge_diagnostics(backlog, bridge.outbox.stats, bridge.mqtt.stats, bridge.stats, health,
                                              self._disk)
        bridge.mqtt.publish(bridge.topics.bridge_diagnostics(bridge.gateway_id), payloads.encode(summary),
                            qos=1, retain=True)
        self._published = _state(health)

    def _run(self) -> None:
        self._next_publish = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, min(HEALTH_CHECK, self._next_publish - time.monotonic()))):
            self._guarded(self._turn)

    def _turn(self) -> None:
        if self.bridge.stopping:  # its links stop one by one, which is not ill health: the final round follows
            return
        health = health_report(self.bridge)
        state = _state(health)
        if self.log_health and state != self._logged:
            if health["state"] == "unhealthy":
                log.error("unhealthy: %s", health["problem"])
            elif self._logged:
                log.warning("healthy again")
            self._logged = state
        if state != self._published or time.monotonic() >= self._next_publish:
            self._next_publish = time.monotonic() + self.interval
            self.publish(health)

    def _guarded(self, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # never let reporting take anything down
            self.bridge.stats["diagnostics_errors"] += 1
            if self._errors_logged.first(f"{type(exc).__name__}: {exc}"[:200]):
                log.exception("publishing the diagnostics failed (survived; counted as diagnostics_errors)")
