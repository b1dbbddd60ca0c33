"""Home Assistant MQTT discovery: every Pico, and the gateway itself, as an HA device.

Two forms, by ``homeassistant.mode``:

* ``device`` (the default; Home Assistant 2024.11 or later): one retained
  message per device, its entities under ``cmps``, on
  ``<prefix>/device/<node>/config``;
* ``entity`` (older Home Assistant, openHAB): one retained message per entity,
  on ``<prefix>/<platform>/<node>/<key>/config``, each with the same entity
  options plus the device (``dev``) and origin (``o``) blocks.

``<node>`` is ``<gateway_id>`` for the gateway (one ``binary_sensor``, device
class ``connectivity``, on ``<base>/bridge/<gateway_id>/status``) and
``<gateway_id>_<device>`` for each Pico (a ``sensor`` per metric, a ``switch``
for the LED, and diagnostic sensors read from the JSON the gateway publishes on
``<base>/<device>/diagnostics``); ``<key>`` is the entity's key under ``cmps``.
Home Assistant identifies a discovered entity by node and key in both forms,
which is what lets it hand an entity over from one form to the other.

Entities are available while both the gateway (bridge status) and the Pico
(device status) say ``online``; the link counters only need the gateway.
Unique ids are ``<gateway_id>_<device>_<component>``, stable across restarts
and the same in both forms.

Home Assistant forgets discovered entities it has not seen when it restarts
without a persistent broker session, so the configs are retained, published
again after every (re)connect, and again a short random time after
``<prefix>/status`` says ``online`` (spreading the load when several gateways
answer the same birth message). However many ``online`` arrive, one republish
is pending at most, and two are at least ``republish_delay`` (and 1 s) apart.

After each connect the retained configs under the prefix are read: this
gateway's configs of devices that left the config are cleared (Home Assistant
removes them), and those of the other form (the mode was switched) are handed
over as Home Assistant documents (``{"migrate_discovery": true}`` to each, the
new form published, then the old cleared), so the entities keep their names,
areas and history.

The class only needs a ``publish``, a ``subscribe`` and an ``on_connect``
callable; the daemon hands it its MqttConnection's. It is a Feature
(gateway/features.py): :meth:`Discovery.start` subscribes and hooks the connect,
:meth:`Discovery.stop` removes both and cancels what is pending::

    discovery = Discovery(config.homeassistant, config.gateway_id, config.mqtt.base_topic,
                          config.devices, publish=mqtt.publish, subscribe=mqtt.subscribe,
                          on_connect=mqtt.on_connect)
    discovery.start()

One module, past 400 lines: what the configs say (topics, ids, payloads) and when
they go out (connects, Home Assistant's birth message, new metrics and firmware,
the stale scan and the hand-over between forms) read and change the same state,
the metrics and firmware seen per device and the configs found on the broker; a
third of its length is the tables of entity options.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from gateway import __version__
from gateway.coalesce import Coalesced
from gateway.domain import StrictModel
from gateway.features import Feature, Remover
from gateway.links import LINKS
from gateway.links.base import DeviceConfig
from gateway.log_once import Once
from gateway.topics import Topics, is_metric

log = logging.getLogger("gateway.discovery")

ORIGIN_NAME = "pico-gateway"
MANUFACTURER = "pico-gateway"
Handler = Callable[[str, bytes, bool], None]
Publish = Callable[[str, str, int, bool], object]
Subscribe = Callable[[str, Handler], Remover | None]
OnConnect = Callable[[Callable[[], None]], Remover]

MIN_REPUBLISH_SPACING = 1.0  # seconds between two republishes for HA's birth message, at least
MAX_METRICS = 32  # per device: a misbehaving Wi-Fi Pico must not grow a config without end
PLATFORMS = ("sensor", "switch", "binary_sensor")  # every platform our entities use
# Home Assistant's hand-over of a discovered entity from one topic form to the other: it
# unloads the entity and keeps its settings for the config that comes next on the other form.
MIGRATE = '{"migrate_discovery":true}'
MIGRATE_WAIT = 2.0  # seconds between the hand-over messages and the new form (HA unloads meanwhile)
MAX_SEEN = 4096  # retained configs of ours remembered per scan (forged ones must not fill memory)
FIRMWARE_VERSION = re.compile(r"[0-9A-Za-z._+-]{1,32}")

# Metrics our firmware has before the gateway has seen a reading (other firmware: its link says).
PICOGW_METRICS = ("temp", "uptime", "mem_free")

# metric -> entity options (full HA key names). Others: a plain measurement.
METRIC_OPTIONS: dict[str, dict[str, Any]] = {
    "temp": {"name": "Temperature", "device_class": "temperature", "state_class": "measurement",
             "unit_of_measurement": "°C", "suggested_display_precision": 1},
    "uptime": {"name": "Uptime", "device_class": "duration", "state_class": "total_increasing",
               "unit_of_measurement": "s"},
    "mem_free": {"name": "Free memory", "device_class": "data_size", "state_class": "measurement",
                 "unit_of_measurement": "B", "entity_category": "diagnostic"},
}

# key of the diagnostics JSON (gateway.payloads.DIAGNOSTIC_KEYS) -> (component id, entity options)
DIAGNOSTICS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("seq_gaps", "seq_gaps", {"name": "Sequence gaps", "state_class": "total_increasing", "icon": "mdi:counter"}),
    ("rejected", "errors", {"name": "Errors", "state_class": "total_increasing", "icon": "mdi:alert-circle-outline"}),
    ("last_seen_ms", "last_seen", {"name": "Last seen", "device_class": "timestamp"}),
    ("reconnects", "reconnects", {"name": "Reconnects", "state_class": "total_increasing",
                                  "icon": "mdi:lan-disconnect"}),
    ("commands_failed", "commands_failed", {"name": "Failed commands", "state_class": "total_increasing"}),
    ("backlog", "backlog", {"name": "Backlog", "state_class": "measurement"}),
    ("frames", "frames", {"name": "Frames received", "state_class": "total_increasing",
                          "enabled_by_default": False}),
    ("commands_ok", "commands_ok", {"name": "Commands carried out", "state_class": "total_increasing",
                                    "enabled_by_default": False}),
)


def _topic_prefix(value: str) -> str:
    if not value or any(c in value for c in "#+\0") or value.startswith("/") or value.endswith("/"):
        raise ValueError("must be a topic prefix without wildcards or leading/trailing '/'")
    return value


class DiscoveryConfig(StrictModel):
    """``[homeassistant]`` in the config file."""

    enabled: bool = True
    mode: Literal["device", "entity"] = Field(
        "device", description="'device': one config per device (Home Assistant 2024.11 or later); "
                              "'entity': one config per entity (older Home Assistant, openHAB)")
    prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")
    republish_delay: float = Field(5.0, ge=0, le=300,
                                   description="max random delay (s) before re-publishing after HA's birth message")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _topic_prefix(value)


def known_metrics(device: DeviceConfig) -> tuple[str, ...]:
    """The metrics a Pico has by its protocol and link, before any reading."""
    if device.protocol == "picogw":
        return PICOGW_METRICS
    return LINKS[device.transport].default_metrics(device.protocol)


def model(device: DeviceConfig) -> str:
    link = LINKS[device.transport]
    return f"{link.board} ({device.transport}, {link.software(device.protocol)})"


class Discovery(Feature):
    name = "discovery"

    def __init__(self, config: DiscoveryConfig, gateway_id: str, base_topic: str,
                 devices: Sequence[DeviceConfig], publish: Publish, subscribe: Subscribe,
                 *, on_connect: OnConnect | None = None, sw_version: str = __version__,
                 migrate_wait: float = MIGRATE_WAIT) -> None:
        """``on_connect``: where :meth:`start` hooks :meth:`on_connect` (None: the caller does)."""
        super().__init__()
        self.config = config
        self.prefix = config.prefix
        self.gateway_id = gateway_id
        self.topics = Topics(base_topic)  # the tree the entities point at
        self.devices = {d.id: d for d in devices}
        self._publish = publish
        self._subscribe = subscribe
        self._on_connect = on_connect
        self.sw_version = sw_version
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # a device's configs made and sent in one step (publish_device)
        self._metrics: dict[str, list[str]] = {d.id: list(known_metrics(d)) for d in devices}
        self._firmware: dict[str, str] = {}
        self._published_topics: dict[str, tuple[str, ...]] = {}  # device -> its config topics last published
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()
        self._republish_spacing = max(MIN_REPUBLISH_SPACING, config.republish_delay)
        self._republish = Coalesced(self._republish_all, "ha-republish", spacing=self._republish_spacing,
                                    delay=lambda: random.uniform(0, self.config.republish_delay))
        self._started = False
        self._stale_scan: float | None = None
        self._migrate_wait = migrate_wait
        self._seen: dict[str, str] = {}  # retained config topics of ours (any form) -> their node
        self._bad_firmware = Once(limit=1000)  # devices whose bad firmware version was logged
        self.stats = {"published": 0, "removed": 0, "handed_over": 0, "republish_requests": 0, "republished": 0,
                      "bad_firmware": 0}

    # -- topics and ids --------------------------------------------------------------
    @property
    def gateway_identifier(self) -> str:
        """The gateway's HA device identifier; every Pico names it as via_device."""
        return f"pico-gateway_{self.gateway_id}"

    def object_id(self, device: str) -> str:
        return f"{self.gateway_id}_{device}"

    def device_topic(self, device: str) -> str:
        """The device-form topic of a Pico."""
        return f"{self.prefix}/device/{self.object_id(device)}/config"

    def gateway_topic(self) -> str:
        """The device-form topic of the gateway."""
        return f"{self.prefix}/device/{self.gateway_id}/config"

    def entity_topic(self, platform: str, node: str, key: str) -> str:
        """The entity-form topic of one entity (``node``: the gateway_id, or a Pico's object id)."""
        return f"{self.prefix}/{platform}/{node}/{key}/config"

    def ha_status_topic(self) -> str:
        return f"{self.prefix}/status"

    def bridge_status(self) -> str:
        return self.topics.bridge_status(self.gateway_id)

    def diagnostics_topic(self, device: str) -> str:
        return self.topics.diagnostics(device)

    def unique_id(self, device: str, component: str) -> str:
        return f"{self.gateway_id}_{device}_{component}"

    # -- payloads ----------------------------------------------------------------------
    def _origin(self) -> dict[str, Any]:
        return {"name": ORIGIN_NAME, "sw": self.sw_version}

    def _availability(self, device: str | None) -> dict[str, Any]:
        entries = [{"topic": self.bridge_status(), "payload_available": "online", "payload_not_available": "offline"}]
        if device is not None:
            entries.append({"topic": self.topics.status(device), "payload_available": "online",
                            "payload_not_available": "offline"})
        return {"availability": entries, "availability_mode": "all"}

    def metrics(self, device: str) -> list[str]:
        with self._lock:
            return list(self._metrics.get(device, ()))

    def device_payload(self, device_id: str) -> dict[str, Any]:
        device = self.devices[device_id]
        # A Pico that publishes for itself (wifi) talks to the broker: its entities do not depend on the gateway.
        pico_avail = self._availability(device_id)
        if LINKS[device.transport].publishes_itself:
            pico_avail = {"availability": pico_avail["availability"][1:], "availability_mode": "all"}
        cmps: dict[str, dict[str, Any]] = {}
        for metric in self.metrics(device_id):
            options = METRIC_OPTIONS.get(metric) or {
                "name": metric.replace("_", " ").capitalize(), "state_class": "measurement"}
            cmps[metric] = {"p": "sensor", "unique_id": self.unique_id(device_id, metric),
                            "state_topic": self.topics.sensor(device_id, metric), **options, **pico_avail}
        cmps["led"] = {
            "p": "switch", "name": "LED", "unique_id": self.unique_id(device_id, "led"), "icon": "mdi:led-on",
            "command_topic": self.topics.command(device_id), "state_topic": self.topics.state(device_id),
            "payload_on": "on", "payload_off": "off", "state_on": "on", "state_off": "off",
            "qos": 1, "retain": False, **pico_avail,
        }
        if not LINKS[device.transport].publishes_itself:  # the gateway has no link of its own to such a Pico
            gateway_avail = self._availability(None)
            for key, component, options in DIAGNOSTICS:
                if key == "last_seen_ms":
                    template = ("{{ (value_json.last_seen_ms / 1000) | timestamp_custom('%Y-%m-%dT%H:%M:%S+00:00', "
                                "false) if value_json.last_seen_ms is number else None }}")
                else:
                    template = "{{ value_json." + key + " }}"
                cmps[component] = {"p": "sensor", "unique_id": self.unique_id(device_id, component),
                                   "state_topic": self.diagnostics_topic(device_id), "value_template": template,
                                   "entity_category": "diagnostic", **options, **gateway_avail}
        dev: dict[str, Any] = {"ids": [self.object_id(device_id)], "name": device_id, "mf": MANUFACTURER,
                               "mdl": model(device), "via_device": self.gateway_identifier}
        with self._lock:
            firmware = self._firmware.get(device_id)
        if firmware:
            dev["sw"] = firmware
        return {"dev": dev, "o": self._origin(), "cmps": cmps}

    def gateway_payload(self) -> dict[str, Any]:
        return {
            "dev": {"ids": [self.gateway_identifier], "name": f"pico-gateway {self.gateway_id}",
                    "mf": MANUFACTURER, "mdl": "pico-gateway", "sw": self.sw_version},
            "o": self._origin(),
            "cmps": {
                "connectivity": {
                    "p": "binary_sensor", "name": "Connectivity", "device_class": "connectivity",
                    "unique_id": self.unique_id("bridge", "connectivity"), "entity_category": "diagnostic",
                    "state_topic": self.bridge_status(), "payload_on": "online", "payload_off": "offline",
                },
            },
        }

    def _in_mode(self, node: str, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """topic -> config of one device's payload, in the configured form."""
        if self.config.mode == "device":
            return {f"{self.prefix}/device/{node}/config": payload}
        shared = {"dev": payload["dev"], "o": payload["o"]}  # (every entity names its device)
        return {self.entity_topic(cmp["p"], node, key): {**{k: v for k, v in cmp.items() if k != "p"}, **shared}
                for key, cmp in payload["cmps"].items()}

    def device_configs(self, device_id: str) -> dict[str, dict[str, Any]]:
        """What is published for a Pico, topic -> config, in the configured form."""
        return self._in_mode(self.object_id(device_id), self.device_payload(device_id))

    def gateway_configs(self) -> dict[str, dict[str, Any]]:
        """What is published for the gateway itself, topic -> config, in the configured form."""
        return self._in_mode(self.gateway_id, self.gateway_payload())

    # -- publishing --------------------------------------------------------------------
    def _send(self, configs: dict[str, dict[str, Any]]) -> None:
        for topic, payload in configs.items():
            self._publish(topic, json.dumps(payload, separators=(",", ":"), ensure_ascii=False), 1, True)
            self.stats["published"] += 1

    def publish_device(self, device_id: str) -> None:
        """Publish the device's configs, and clear those it published before and no longer
        has (a reload gave it another link, whose entities differ)."""
        if not self.config.enabled:
            return
        # Made and handed to the connection in one step: a config made on one thread
        # (connect: every device) must not reach the broker after a newer one made on
        # another (a hello's firmware, a new metric, a reload) and replace it as the
        # retained one, nor after a reload's clearing of a removed device.
        with self._send_lock:
            if device_id not in self.devices:
                return  # (removed meanwhile)
            configs = self.device_configs(device_id)
            with self._lock:
                old = self._published_topics.get(device_id, ())
                self._published_topics[device_id] = tuple(configs)
            for topic in sorted(set(old) - set(configs)):
                self._publish(topic, "", 1, True)
                self.stats["removed"] += 1
            self._send(configs)

    def publish_all(self) -> None:
        if not self.config.enabled:
            return
        self._send(self.gateway_configs())
        for device_id in list(self.devices):  # (a reload may change them meanwhile)
            self.publish_device(device_id)

    def set_device(self, device: DeviceConfig) -> None:
        """A device added to the config, or changed, while the gateway runs: its configs are
        published again; those the new one no longer has (another link's entities) are cleared."""
        with self._lock:
            self.devices[device.id] = device
            metrics = self._metrics.setdefault(device.id, [])
            metrics += [m for m in known_metrics(device) if m not in metrics]
        if self._started:
            self.publish_device(device.id)

    def remove_device(self, device_id: str) -> None:
        """A device that left the config while the gateway runs: its configs are cleared
        (Home Assistant removes the device and its entities)."""
        with self._send_lock:  # (no config of it made before may follow the clearing: publish_device)
            if device_id not in self.devices:
                return
            topics: list[str] = []
            if self.config.enabled and self._started:  # (entity form: what was published may name more metrics)
                topics = sorted(set(self.device_configs(device_id)) | set(self._published_topics.get(device_id, ())))
            with self._lock:
                del self.devices[device_id]
                self._metrics.pop(device_id, None)
                self._firmware.pop(device_id, None)
                self._published_topics.pop(device_id, None)
            for topic in topics:
                self._publish(topic, "", 1, True)
                self.stats["removed"] += 1
        if topics:
            log.info("removing the Home Assistant device %s: no longer in the config", self.object_id(device_id))

    def start(self, stale_scan: float | None = 3.0) -> None:
        """Before the MQTT connection starts: subscribe to HA's status and to the retained
        device configs. Each connect then publishes everything (:meth:`on_connect`), and
        ``stale_scan`` seconds later (time for the broker to deliver the retained configs)
        clears those of devices that left the config (None: leave that to the caller's
        ``remove_stale``)."""
        if not self.config.enabled:
            log.info("Home Assistant discovery is off (homeassistant.enabled = false)")
            return
        self.hook(self._subscribe(self.ha_status_topic(), self._on_ha_status))
        # Both forms, whichever is configured: a switched mode leaves the other one's behind.
        self.hook(self._subscribe(f"{self.prefix}/device/+/config", self._on_config))
        for platform in PLATFORMS:
            self.hook(self._subscribe(f"{self.prefix}/{platform}/+/+/config", self._on_config))
        self._started, self._stale_scan = True, stale_scan
        if self._on_connect is not None:  # (last: the subscriptions are out when it runs)
            self.hook(self._on_connect(self.on_connect))

    def on_connect(self) -> None:
        """After every connect to the broker, the first included: publish everything, and
        look for stale configs among the retained ones the subscriptions deliver."""
        if not self._started or self._stopped.is_set():
            return
        self.publish_all()
        if self._stale_scan is not None:
            self._later(self._stale_scan, self.remove_stale)

    def metric_seen(self, device: str, metric: str) -> None:
        """A reading of ``metric`` arrived; publish the device again if it is new."""
        if not self.config.enabled or device not in self.devices:
            return
        if metric in self._metrics.get(device, ()):  # the hot path, every reading: no lock
            return
        if self._stopped.is_set():  # (links still report while they stop)
            return
        with self._lock:
            metrics = self._metrics.setdefault(device, [])
            if metric in metrics:
                return
            if not is_metric(metric) or len(metrics) >= MAX_METRICS:
                return
            metrics.append(metric)
        log.info("device %s has a new metric %r: publishing its discovery config again", device, metric)
        self.publish_device(device)

    def firmware_seen(self, device: str, version: str) -> None:
        """The Pico's hello said which firmware it runs: shown as the device's software version."""
        if not self.config.enabled or device not in self.devices or not version or self._stopped.is_set():
            return  # (version "": the hello named none)
        if not FIRMWARE_VERSION.fullmatch(version):
            self.stats["bad_firmware"] += 1
            if self._bad_firmware.first(device):
                log.warning("device %s: its hello names firmware %r, not a version (1 to 32 letters, digits or "
                            "'._+-'); not shown in Home Assistant, counted as bad_firmware, logged once",
                            device, version[:40])
            return
        with self._lock:
            if self._firmware.get(device) == version:
                return
            self._firmware[device] = version
        self.publish_device(device)

    def remove_stale(self) -> list[str]:
        """Deal with the retained configs of ours found since the last scan that this run
        does not publish: those of devices that left the config are cleared (Home Assistant
        removes the device); those of the other form (the mode was switched) are handed over,
        then cleared (:meth:`_hand_over`). Returns the topics cleared or handed over."""
        with self._lock:
            seen, self._seen = self._seen, {}
        current = {self.gateway_id} | {self.object_id(d) for d in list(self.devices)}
        gone = sorted(topic for topic, node in seen.items() if node not in current)
        other_form = sorted(topic for topic, node in seen.items()
                            if node in current and self._form(topic) != self.config.mode)
        for node in sorted({seen[topic] for topic in gone}):
            log.info("removing the Home Assistant device %s: no longer in the config", node)
        for topic in gone:
            self._publish(topic, "", 1, True)
            self.stats["removed"] += 1
        if other_form:
            log.info("Home Assistant discovery is in %s mode now: handing %d config(s) of the other mode over "
                     "to it, then clearing them", self.config.mode, len(other_form))
            for topic in other_form:
                self._publish(topic, MIGRATE, 1, False)  # (not retained: it must not outlive the hand-over)
            self._later(self._migrate_wait, lambda: self._hand_over(other_form))
        return gone + other_form

    def _hand_over(self, old: list[str]) -> None:
        """Second half of a mode switch: the new form again (Home Assistant ignored it while
        the old one held the entities), then the old form cleared."""
        self.publish_all()
        for topic in old:
            self._publish(topic, "", 1, True)
            self.stats["handed_over"] += 1

    def _form(self, topic: str) -> str:
        return "device" if topic.startswith(f"{self.prefix}/device/") else "entity"

    def stop(self) -> None:
        self._stopped.set()
        self.unhook()
        self._republish.stop()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()

    # -- subscriptions (MQTT thread) -------------------------------------------------------
    def _on_ha_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload.strip().lower() != b"online" or self._stopped.is_set():
            return
        self.stats["republish_requests"] += 1
        # However many arrive (a flow stuck in a loop sends thousands), one republish pending.
        if self._republish.request():
            log.info("Home Assistant is online: publishing discovery again within %.1f s",
                     max(self.config.republish_delay, self._republish_spacing))

    def _later(self, delay: float, action: Callable[[], object]) -> None:
        def run() -> None:
            if not self._stopped.is_set():
                try:
                    action()
                except Exception:  # a timer thread must not die silently
                    log.exception("Home Assistant discovery: %s failed", getattr(action, "__name__", action))

        timer = threading.Timer(delay, run)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _republish_all(self) -> None:
        self.stats["republished"] += 1
        self.publish_all()

    def _on_config(self, topic: str, payload: bytes, retained: bool) -> None:
        """A config under our prefix, in either form: note it if it is one of ours."""
        parts = topic[len(self.prefix) + 1:].split("/")  # device/<node>/config, <platform>/<node>/<key>/config
        if len(parts) not in (3, 4):
            return
        node = parts[1]
        if node != self.gateway_id and not node.startswith(self.gateway_id + "_"):
            return  # (the cheap test first: every other integration's configs arrive here too)
        if not payload:  # cleared (by us, or by someone deleting the device in HA)
            with self._lock:
                self._seen.pop(topic, None)
            return
        if not retained:
            return  # the scan is about what the broker keeps
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(data, dict):
            return
        origin = data.get("o") or data.get("origin") or {}
        dev = data.get("dev") or data.get("device") or {}
        # Both checks: gateway "pi" must not touch gateway "pi_x"'s devices, nor gateway "pi_x" itself.
        if not isinstance(origin, dict) or origin.get("name") != ORIGIN_NAME or not isinstance(dev, dict):
            return
        ids = dev.get("ids") or dev.get("identifiers") or []
        ids = [ids] if isinstance(ids, str) else ids if isinstance(ids, list) else []  # (HA takes either)
        if dev.get("via_device") != self.gateway_identifier and self.gateway_identifier not in ids:
            return
        with self._lock:
            if topic in self._seen or len(self._seen) < MAX_SEEN:
                self._seen[topic] = node
