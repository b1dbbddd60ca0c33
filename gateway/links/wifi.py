"""A Pico W that publishes to the broker itself (umqtt): see docs/links.md.

Nothing to open: the Pico publishes its readings, ``state/led`` and ``status``
(its own last will) and subscribes to ``cmd/led`` itself. The gateway listens to
that device's tree, stores its readings in SQLite like any other Pico's, and
tracks its availability; it re-publishes nothing and never re-sends commands.
"""

from __future__ import annotations

from typing import Any, Literal

from gateway import payloads
from gateway.domain import CommandError, LedCommand, now_ms, parse_value
from gateway.links.base import DeviceConfig, Link, LinkEvents
from gateway.links.simulation import Description, Simulation

MAX_HELLO_BYTES = 1024


class WifiConfig(DeviceConfig):
    transport: Literal["wifi"]


class WifiSimulation(Simulation):
    """The virtual Pico W joins a simulated network and the test broker: it is ready once
    connected, and reached through the broker (the gateway's config needs no change)."""

    ready_key = "mqtt"
    ready_value = "connected"
    demo_devices = ({"id": "balcony", "transport": "wifi"},)

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"WIFI": {"broker": broker[0], "port": int(broker[1]), "base": desc.get("base", "pico"),
                         "user": desc.get("mqtt_user"), "mqtt_password": desc.get("mqtt_password"),
                         "client_id": desc.get("client_id")}}, {}

    def endpoint(self, state: Any, broker: tuple[str, int]) -> Any:
        return tuple(broker)


WIFI_NETWORK = {"ssid": "", "password": "", "broker": "127.0.0.1", "port": 1883,
                "base": "pico", "user": None, "mqtt_password": None, "client_id": None}
"""config.py's WIFI section, with the firmware's defaults (the network, and for the wifi
link the broker it publishes to)."""


class WifiLink(Link):
    transport = "wifi"
    board = "Raspberry Pi Pico W"
    needs_wifi = True
    Config = WifiConfig
    publishes_itself = True
    firmware = "wifi"
    firmware_config = {"WIFI": WIFI_NETWORK}
    simulation = WifiSimulation()

    def __init__(self, config: WifiConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._running = True
        # Subscribed now, before the broker connection exists: the subscriptions then go
        # out in the first on_connect, ahead of the gateway's "online", so a subscriber
        # that sees the gateway online knows its Pico W is being listened to.
        topics = events.topics
        events.subscribe(topics.sensor(self.device, "+"), self._on_sensor)
        events.subscribe(topics.state(self.device), self._on_state)
        events.subscribe(topics.status(self.device), self._on_status)
        events.subscribe(topics.hello(self.device), self._on_hello)

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    def set_led(self, command: LedCommand) -> bool:
        raise CommandError("a wifi Pico takes its commands from the broker itself")

    def _on_sensor(self, topic: str, payload: bytes, retained: bool) -> None:
        if not self._running or retained:
            return  # a retained reading is old news (and never ours to store twice)
        metric = topic.rsplit("/", 1)[-1]  # any topic level: the bridge checks it, as for every link
        value = parse_value(payload)
        if value is None:
            self.stats["bad_values"] += 1
            return
        self.stats["frames"] += 1
        self.events.reading(self.device, [(metric, value)], now_ms(), None)

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._running and payload in (b"on", b"off"):
            self.events.led_state(self.device, payload == b"on")

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._running and payload in (b"online", b"offline"):
            self.set_online(payload == b"online", "its own status topic")

    def _on_hello(self, topic: str, payload: bytes, retained: bool) -> None:
        """Its retained hello (docs/topics.md): the firmware version it names."""
        firmware = payloads.hello_firmware(payloads.decode_hello(payload, MAX_HELLO_BYTES))
        if firmware is None:
            if payload:  # (empty: the hello was cleared)
                self.stats["bad_hello"] += 1
                if self.stats["bad_hello"] == 1:
                    self.log.warning("its hello is not our firmware's JSON with a \"fw\" version: %r (counted "
                                     "as bad_hello, logged once)", payload[:80])
            return
        self.events.firmware(self.device, firmware)
