"""The MQTT topic tree, in one place (documented in docs/topics.md).

    >>> t = Topics("pico")
    >>> t.sensor("greenhouse", "temp")
    'pico/greenhouse/sensor/temp'
    >>> t.parse_command("pico/greenhouse/cmd/led")
    ('greenhouse', 'led')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRIC_PATTERN = "[a-z][a-z0-9_]{0,23}"
"""A metric name, the last level of ``<base>/<device>/sensor/<metric>``: what
docs/protocol.md allows a picogw field key, for every link alike (docs/topics.md).
No ``/``, ``+``, ``#``, dots or capitals: a name is one plain topic level."""
_METRIC = re.compile(METRIC_PATTERN + r"\Z")


def is_metric(name: str) -> bool:
    """Whether ``name`` may be a metric: ``temp``, ``mem_free`` yes; ``Temp``, ``a#``,
    ``Temp/../x``, ``""`` and anything longer than 24 characters no.

        >>> is_metric("temp"), is_metric("Temp/../x"), is_metric("a" * 25)
        (True, False, False)
    """
    return _METRIC.match(name) is not None


@dataclass(frozen=True)
class Topics:
    base: str = "pico"

    def sensor(self, device: str, metric: str) -> str:
        return f"{self.base}/{device}/sensor/{metric}"

    def state(self, device: str, what: str = "led") -> str:
        return f"{self.base}/{device}/state/{what}"

    def command(self, device: str, what: str = "led") -> str:
        return f"{self.base}/{device}/cmd/{what}"

    def result(self, device: str, what: str = "led") -> str:
        """Where the outcome of each command is published (JSON, not retained)."""
        return f"{self.base}/{device}/result/{what}"

    def status(self, device: str) -> str:
        return f"{self.base}/{device}/status"

    def diagnostics(self, device: str) -> str:
        """A device's link counters, JSON, retained (gateway/diagnostics.py)."""
        return f"{self.base}/{device}/diagnostics"

    def bridge_diagnostics(self, gateway_id: str) -> str:
        return f"{self.base}/bridge/{gateway_id}/diagnostics"

    def bridge_status(self, gateway_id: str) -> str:
        return f"{self.base}/bridge/{gateway_id}/status"

    def bridge_refresh(self, gateway_id: str) -> str:
        """Any message here (not retained) asks the gateway to publish its diagnostics now."""
        return f"{self.base}/bridge/{gateway_id}/diagnostics/refresh"

    def all_bridge_statuses(self) -> str:
        return f"{self.base}/bridge/+/status"

    def parse_bridge_status(self, topic: str) -> str | None:
        """The gateway_id of ``<base>/bridge/<gateway_id>/status``, else None."""
        parts = self._levels(topic, 3)
        return parts[1] if parts and parts[0] == "bridge" and parts[2] == "status" else None

    def bridge_conflicts(self, gateway_id: str) -> str:
        """Devices this gateway owns that another gateway claims too (JSON, retained)."""
        return f"{self.base}/bridge/{gateway_id}/conflicts"

    def recorder_status(self, recorder_id: str) -> str:
        return f"{self.base}/bridge/{recorder_id}/recorder"

    def owner(self, device: str) -> str:
        """The gateway_id of the gateway that owns ``device`` (retained)."""
        return f"{self.base}/{device}/owner"

    def hello(self, device: str) -> str:
        """Our firmware's retained hello on a Pico W: ``{"proto": 1, "fw": ..., "metrics": [...]}``."""
        return f"{self.base}/{device}/hello"

    def reading(self, device: str) -> str:
        """A Pico W's readings as JSON, each kept on the Pico until the gateway stored it."""
        return f"{self.base}/{device}/reading"

    def stored(self, device: str) -> str:
        """The gateway to a Pico W: its readings stored up to a sequence number (JSON)."""
        return f"{self.base}/{device}/stored"

    def time(self, device: str) -> str:
        """The gateway to a Pico W: the time, and whether to send its kept readings again (JSON)."""
        return f"{self.base}/{device}/time"

    def all_hellos(self) -> str:
        """Our firmware's retained hello on a Pico W (what adoption listens for)."""
        return f"{self.base}/+/hello"

    def all_owners(self) -> str:
        return f"{self.base}/+/owner"

    def all_sensors(self) -> str:
        return f"{self.base}/+/sensor/+"

    def parse_owner(self, topic: str) -> str | None:
        """The device of ``<base>/<device>/owner``, else None."""
        parts = self._levels(topic, 2)
        return parts[0] if parts and parts[1] == "owner" else None

    def parse_sensor(self, topic: str) -> tuple[str, str] | None:
        """(device, metric) for ``<base>/<device>/sensor/<metric>``, else None."""
        parts = self._levels(topic, 3)
        return (parts[0], parts[2]) if parts and parts[1] == "sensor" else None

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """(device, what) for ``<base>/<device>/cmd/<what>``, else None."""
        parts = self._levels(topic, 3)
        return (parts[0], parts[2]) if parts and parts[1] == "cmd" else None

    def _levels(self, topic: str, count: int) -> list[str] | None:
        """The ``count`` non-empty levels of ``topic`` below the base, else None."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        return parts if len(parts) == count and all(parts) else None
