"""The gateway made of the daemon's own parts, in the test's process: cheaper to start
than a gateway process, and a test can look at its counters and coalescers."""

from __future__ import annotations

from pathlib import Path

from mqtt_helpers import Broker

from gateway.bridge import Bridge
from gateway.config import MqttConfig
from gateway.diagnostics import Diagnostics
from gateway.features import Lifecycle, Step
from gateway.links.uart import UartConfig, UartLink
from gateway.mqtt import MqttConnection
from gateway.ownership import Ownership
from gateway.store import Store
from gateway.topics import Topics


class InProcessGateway:
    """``pico-gateway run``'s parts (gateway/daemon.py), in this process: uart devices
    (id -> port), diagnostics every ``interval`` s."""

    def __init__(self, broker: Broker, tmp_path: Path, gateway_id: str, devices: dict[str, str],
                 interval: float = 3600) -> None:
        topics = Topics("pico")
        self.mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), f"pico-gateway-{gateway_id}",
                                   (topics.bridge_status(gateway_id), "offline"))
        self.store = Store(tmp_path / f"{gateway_id}.db")
        self.bridge = Bridge(gateway_id, topics, self.store, self.mqtt)
        for device, port in devices.items():
            self.bridge.add(UartLink(UartConfig(id=device, transport="uart", port=port), self.bridge))
        self.diagnostics = Diagnostics(self.bridge, interval)
        self.ownership = Ownership(self.bridge)
        self.lifecycle = Lifecycle(4.0)
        self.stopped = False

    def start(self) -> InProcessGateway:
        """The daemon's parts in the daemon's order (gateway/daemon.py)."""
        self.lifecycle.start([Step("mqtt", self.mqtt.start, lambda: self.mqtt.stop(self.bridge.last_words())),
                              self.diagnostics, self.ownership, self.bridge])
        assert self.mqtt.wait_connected(10)
        return self

    def stop(self) -> None:
        """A clean stop, in the daemon's order: the devices' last words, then the bridge's."""
        if self.stopped:
            return
        self.stopped = True
        self.lifecycle.stop()
        self.store.close()
