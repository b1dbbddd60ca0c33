"""Publishing: one message, a message tracked to its delivery, and readings many to a write.

Every publish from any thread goes through :class:`Publishing`, which the gateway's
connection (``gateway.mqtt.MqttConnection``) is made of, with its network thread:

- a publish wakes the network thread only when paho's queue was empty, and
  :meth:`Publishing.batch` defers even that to the end of a batch from one thread;
- readings at QoS 0 go out many to a write (:meth:`Publishing.publish_many`): the
  PUBLISH packets are encoded here (``gateway.mqtt_batch``) and handed to paho's
  output queue as one entry, which leans on paho internals that all live in
  ``gateway.paho_internals``. Without that fast path (a paho release moved one of
  them; the connection checks at start-up), each message goes through paho's public
  ``publish`` instead: the same messages, in the same order, slower per message;
- every message handed to paho is counted, ``published`` or ``publish_refused``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties

from gateway import paho_internals as internals
from gateway.mqtt_batch import (
    PUBLISH_QOS0,
    SHORT_LENGTHS,
    Delivery,
    PublicBatch,
    remaining_length,
    topic_field,
)

TOPIC_CACHE = 4096  # encoded topics kept for publish_many (devices x metrics; cleared when full)


class Publishing:
    """The publishing half of the connection; what it needs of the other half is declared here."""

    client: paho.Client
    fast_path: bool  # paho's internals checked and used (gateway.paho_internals)
    stats: Counter[str]
    _topic_fields: dict[str, bytes]  # publish_many's encoded topics
    _local: threading.local  # .batching: this thread defers its wake (see batch())
    _wake: Callable[[], None]  # wakes the network thread

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish many messages from this thread, waking the network thread once at the end.

        Without it, each publish can wake the network thread, which takes the GIL, writes
        that one message and sleeps again: a system call and a thread switch per message.
        Messages other threads publish meanwhile go out with the batch."""
        local = self._local
        local.batching, local.wake = True, False
        try:
            yield
        finally:
            local.batching = False
            if local.wake:
                self._wake()

    def publish_message(self, topic: str, payload: str, qos: int,
                        properties: Properties | None) -> paho.MQTTMessageInfo:
        """Publish and return paho's message info, for callers that track delivery with
        :func:`published`. ValueError for a topic no message may have (:func:`topic_field`)."""
        self._topic_field(topic)
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        if not self.fast_path and qos > 0 and info.rc == paho.MQTT_ERR_NO_CONN:
            # Queued while disconnected: paho sends it on reconnect. Its rc would keep paho's
            # public is_published() raising even once it is acknowledged (see published_public).
            # (The fast path reads paho's flag itself, and callers accept either rc.)
            info.rc = paho.MQTT_ERR_SUCCESS
        # (QoS 1 while disconnected is queued, not refused: paho sends it on reconnect)
        self._count(1, paho.MQTT_ERR_SUCCESS if qos > 0 and info.rc == paho.MQTT_ERR_NO_CONN else info.rc)
        return info

    def _count(self, n: int, rc: int) -> None:
        """Every message handed to paho is counted, by whichever call: ``published`` or ``publish_refused``."""
        self.stats["published" if rc == paho.MQTT_ERR_SUCCESS else "publish_refused"] += n

    def publishable(self, topic: str) -> bool:
        """Whether a message may be published to ``topic`` (see :func:`topic_field`)."""
        try:
            self._topic_field(topic)
        except ValueError:
            return False
        return True

    def _topic_field(self, topic: str) -> bytes:
        """:func:`topic_field`, remembered: readings go to a few topics, over and over."""
        cache = self._topic_fields
        field = cache.get(topic)
        if field is None:
            if len(cache) >= TOPIC_CACHE:
                cache.clear()
            field = cache[topic] = topic_field(topic)
        return field

    def publish_many(self, messages: list[tuple[str, str]]) -> Delivery:
        """Publish ``(topic, payload)`` messages at QoS 0, not retained, as one write.

        paho has no batch API: each ``publish`` builds a message info holding a
        ``threading.Condition``, queues a packet of its own, and the loop sends each
        with its own ``send()``; about 12 µs per message, half the gateway's cost per
        reading (docs/performance.md). Here the PUBLISH packets are encoded once,
        joined, and handed to paho's output queue as one entry: the returned info is
        :func:`published` when paho has written the last byte of the batch, and its
        ``rc`` is ``MQTT_ERR_NO_CONN`` (nothing queued) when there is no connection.
        A reconnect marks an unwritten batch ``MQTT_ERR_CONN_LOST``, as paho does a
        single QoS 0 message. ValueError, before anything is queued, when a topic is not
        one to publish to (:func:`topic_field`).

            info = conn.publish_many([("pico/a/sensor/t", "21.5"), ("pico/a/sensor/h", "40")])

        Without the fast path, each message goes through paho's ``publish`` (same
        messages, same order) and a :class:`PublicBatch` answers for them."""
        if not self.fast_path:
            return self._publish_each(messages)
        client = self.client
        info = paho.MQTTMessageInfo(0)
        cache, short = self._topic_fields, SHORT_LENGTHS
        parts: list[bytes] = []
        for topic, payload in messages:
            field = cache.get(topic) or self._topic_field(topic)
            body = payload.encode()
            size = len(field) + len(body)
            parts += (PUBLISH_QOS0, short[size] if size < 128 else remaining_length(size), field, body)
        if messages and client.socket() is None:
            info.rc = paho.MQTT_ERR_NO_CONN
            self._count(len(messages), info.rc)
            return info
        rc = internals.queue_publishes(client, b"".join(parts), info)
        if rc:  # (not a plain assignment: a reconnect meanwhile may have marked it CONN_LOST)
            info.rc = rc
        self._count(len(messages), rc)
        return info

    def _publish_each(self, messages: list[tuple[str, str]]) -> PublicBatch:
        for topic, _ in messages:
            self._topic_field(topic)  # every topic checked before any message goes
        if messages and self.client.socket() is None:
            self._count(len(messages), paho.MQTT_ERR_NO_CONN)
            return PublicBatch([], paho.MQTT_ERR_NO_CONN)
        infos: list[paho.MQTTMessageInfo] = []
        with self.batch():  # one wake of the network thread for the lot
            for topic, payload in messages:
                info = self.client.publish(topic, payload, qos=0)
                infos.append(info)
                if info.rc:
                    break  # the connection dropped: the rest would not go either
        sent = len(infos) - (1 if infos and infos[-1].rc else 0)
        self._count(sent, paho.MQTT_ERR_SUCCESS)
        self._count(len(messages) - sent, paho.MQTT_ERR_NO_CONN)
        return PublicBatch(infos)

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False when paho refused it (e.g. QoS 0 while offline)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self._count(1, info.rc)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def _wake_soon(self) -> None:
        local = self._local
        if getattr(local, "batching", False):
            local.wake = True
        else:
            self._wake()
