"""Test helpers: a recording MQTT client, and waiting on a condition with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mosquitto import PrivateBroker, free_port  # noqa: F401  (re-exported for tests)

Broker = PrivateBroker


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Recorder:
    """An MQTT client that records every message it receives, for assertions."""

    broker: Broker
    topics: list[str] = field(default_factory=lambda: ["#"])
    messages: list[paho.MQTTMessage] = field(default_factory=list)
    username: str | None = None  # for a broker with a password file
    password: str | None = None
    ca_file: str | None = None  # TLS, verified against this CA
    certfile: str | None = None  # a client certificate, for require_certificate
    keyfile: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        if self.ca_file:
            self.client.tls_set(ca_certs=self.ca_file, certfile=self.certfile, keyfile=self.keyfile)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, 10, "subscription")

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append(msg)

    def received(self) -> list[paho.MQTTMessage]:
        """Every message so far, in order (a copy: the network thread keeps appending)."""
        with self._lock:
            return list(self.messages)

    def on(self, topic: str) -> list[str]:
        """Payloads received on ``topic`` (exact, or a filter with + and #), in order."""
        with self._lock:
            return [m.payload.decode(errors="replace") for m in self.messages if paho.topic_matches_sub(topic, m.topic)]

    def last(self, topic: str) -> str | None:
        payloads = self.on(topic)
        return payloads[-1] if payloads else None

    def wait(self, topic: str, payload: str | None = None, count: int = 1, timeout: float = 10.0) -> list[str]:
        def got() -> list[str] | None:
            found = [p for p in self.on(topic) if payload is None or p == payload]
            return found if len(found) >= count else None

        return wait_for(got, timeout, f"{count} message(s) {payload!r} on {topic}")  # type: ignore[return-value]

    def mark(self, topic: str) -> int:
        """How many messages ``topic`` has had so far: pass it to ``wait_new``."""
        return len(self.on(topic))

    def wait_new(self, topic: str, payload: str, mark: int, timeout: float = 10.0) -> None:
        """Wait for ``payload`` on ``topic`` among the messages after ``mark``."""
        wait_for(lambda: payload in self.on(topic)[mark:], timeout, f"a new {payload!r} on {topic}")

    def publish(self, topic: str, payload: str | bytes, retain: bool = False, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes the network thread, which loop_stop would wait up to 1 s for
        self.client.loop_stop()
