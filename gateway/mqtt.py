"""The gateway's MQTT connection: paho-mqtt with its known pitfalls designed around.

- Subscriptions are remembered and renewed in every on_connect (a new session
  after a broker restart has none).
- Every callback is wrapped: an exception inside a paho callback would end the
  network thread while ``is_connected()`` still says True.
- The last will publishes ``offline`` on the bridge status topic, retained.
- The client id is derived from ``gateway_id``; if the broker drops us because
  another client took that id, the log says so in plain words.

    >>> conn = MqttConnection(cfg.mqtt, client_id="pico-gateway-pi", will=("pico/bridge/pi/status", "offline"))
    >>> conn.subscribe("pico/+/cmd/led", handler)   # handler(topic, payload, retained)
    >>> conn.start(); conn.publish("pico/x/status", "online", qos=1, retain=True)
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import MqttConfig

log = logging.getLogger("gateway.mqtt")

Handler = Callable[[str, bytes, bool], None]
SESSION_TAKEN_OVER = 142  # MQTT v5 reason code


def _options(qos: int) -> SubscribeOptions:
    # Retain-as-published keeps the retain flag on live messages too, so a handler
    # can refuse every retained command, not only those replayed at subscribe time.
    return SubscribeOptions(qos=qos, retainAsPublished=True)


class MqttConnection:
    def __init__(self, cfg: MqttConfig, client_id: str, will: tuple[str, str]) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.stats: Counter[str] = Counter()
        self.connected = threading.Event()
        self._subscriptions: list[tuple[str, int, Handler]] = []
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._on_disconnect_hooks: list[Callable[[], None]] = []
        self._on_published: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        self.client.suppress_exceptions = True  # second line of defence behind _guard
        self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_message = self._guard(self._on_message)
        self.client.on_publish = self._guard(self._on_publish)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every (re)connection, once the subscriptions are renewed."""
        self._on_connect_hooks.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (on paho's thread) whenever the connection is lost."""
        self._on_disconnect_hooks.append(hook)

    def on_published(self, callback: Callable[[int], None]) -> None:
        """``callback(mid)`` when a message left for good: QoS 0 written, QoS 1 acknowledged."""
        self._on_published = callback

    def publish_message(self, topic: str, payload: str, qos: int, properties: Properties | None) -> tuple[int, int]:
        """Publish and return paho's (rc, mid), for callers that track acknowledgements."""
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        return info.rc, info.mid

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self.client.subscribe(topic_filter, options=_options(qos))

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False when paho refused it (e.g. QoS 0 while offline)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.stats["publish_refused"] += 1
            return False
        self.stats["published"] += 1
        return True

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def alive(self) -> bool:
        """paho's network thread is running (it dies silently on a callback error)."""
        thread = getattr(self.client, "_thread", None)  # set by loop_start()
        return thread is not None and thread.is_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, last_words: list[tuple[str, str]] = ()) -> None:
        """Publish ``last_words`` (retained, QoS 1), wait briefly for them, disconnect."""
        infos = [self.client.publish(t, p, qos=1, retain=True) for t, p in last_words]
        for info in infos:
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass  # not connected: the broker will send our will instead
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread) -------------------------------------
    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: object) -> None:
            try:
                callback(*args)
            except Exception:
                self.stats["callback_errors"] += 1
                log.exception("error in MQTT callback %s (survived)", callback.__name__)

        return guarded

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.stats["connect_failures"] += 1
            log.error("broker %s:%s refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        log.info("connected to %s:%s as %s", self.cfg.host, self.cfg.port, self.client_id)
        self.stats["connects"] += 1
        with self._lock:
            subs = list(self._subscriptions)
        if subs:
            client.subscribe([(f, _options(q)) for f, q, _ in subs])
        self.connected.set()
        for hook in self._on_connect_hooks:
            hook()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       reason: ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if reason.value == SESSION_TAKEN_OVER:
            self.stats["taken_over"] += 1
            log.error("the broker dropped us because another client connected with client id %r: "
                      "is a second gateway running with the same gateway_id?", self.client_id)
        elif was and reason.value != 0:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        if was:
            self.stats["disconnects"] += 1
        for hook in self._on_disconnect_hooks:
            hook()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.stats["publish_rejected"] += 1  # the broker refused it (e.g. its ACL): no retry helps
            log.warning("the broker refused a message: %s", reason)
        if self._on_published is not None:
            self._on_published(mid)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            subs = list(self._subscriptions)
        for topic_filter, _, handler in subs:
            if paho.topic_matches_sub(topic_filter, msg.topic):
                handler(msg.topic, msg.payload, bool(msg.retain))
