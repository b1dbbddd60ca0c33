"""Per-device health counters, published where people and Home Assistant can see them.

Every ``interval`` seconds (and at stop) the gateway publishes, retained:

* ``<base>/<device>/diagnostics``: ``{"online", "frames", "rejected", "noise",
  "seq_gaps", "reconnects", "commands_ok", "commands_failed", "backlog",
  "last_seen_ms", "counters": {every raw counter of the link}}``
* ``<base>/bridge/<gateway_id>/diagnostics``: the outbox, MQTT and store counters.

Counters count since the gateway started. See docs/topics.md.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.bridge import Bridge

REJECTED = ("malformed", "corrupt", "overlong", "bad_values", "unknown_type", "bad_answers", "bad_metric")


def device_report(link_stats: Counter[str], online: bool, backlog: int, last_seen_ms: int | None) -> dict:
    return {
        "online": online,
        "frames": link_stats["frames"],
        "rejected": sum(link_stats[k] for k in REJECTED),
        "noise": link_stats["noise"],
        "seq_gaps": link_stats["seq_gaps"],
        "reconnects": link_stats["went_offline"],
        "commands_ok": link_stats["commands_ok"],
        "commands_failed": link_stats["commands_failed"],
        "backlog": backlog,
        "last_seen_ms": last_seen_ms,
        "counters": dict(sorted(link_stats.items())),
    }


class Diagnostics:
    def __init__(self, bridge: Bridge, interval: float) -> None:
        self.bridge = bridge
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diagnostics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def publish(self) -> None:
        bridge = self.bridge
        backlog = bridge.outbox.store.count_unsent_by_device()
        for device, link in list(bridge.links.items()):
            report = device_report(link.stats, link.online, backlog.get(device, 0), bridge.last_seen.get(device))
            bridge.mqtt.publish(bridge.topics.diagnostics(device), json.dumps(report), qos=1, retain=True)
        summary = {
            "backlog": sum(backlog.values()),
            "outbox": dict(sorted(bridge.outbox.stats.items())),
            "mqtt": dict(sorted(bridge.mqtt.stats.items())),
            "bridge": dict(sorted(bridge.stats.items())),
        }
        bridge.mqtt.publish(bridge.topics.bridge_diagnostics(bridge.gateway_id), json.dumps(summary),
                            qos=1, retain=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except Exception:  # never let reporting take anything down
                self.bridge.stats["diagnostics_errors"] += 1
