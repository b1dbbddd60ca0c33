"""What a publish returns and how a batch of readings is put on the wire.

The gateway's connection (``gateway.mqtt``) publishes readings at QoS 0 many to a
write: each PUBLISH packet is encoded here once (:func:`topic_field`,
:func:`remaining_length`) and the joined bytes go to paho's output queue as one
entry. Whatever was published answers :func:`published`, whether it is paho's
``MQTTMessageInfo`` for one message or a batch::

    info = conn.publish_many([("pico/a/sensor/t", "21.5"), ("pico/a/sensor/h", "40")])
    wait_for(lambda: published(info))
"""

from __future__ import annotations

from typing import Protocol

import paho.mqtt.client as paho

from gateway import paho_internals as internals


class Delivery(Protocol):
    """What a publish returns: paho's ``MQTTMessageInfo``, or :class:`PublicBatch`.
    Ask :func:`published` whether it is done; ``rc`` is paho's error code."""

    @property
    def rc(self) -> paho.MQTTErrorCode | int: ...


def published(info: Delivery) -> bool:
    """Whether paho has written (QoS 0) or the broker acknowledged (QoS 1) a message or batch."""
    if type(info) is paho.MQTTMessageInfo:
        return _info_published(info)
    return info.published()  # type: ignore[attr-defined]


def published_public(info: paho.MQTTMessageInfo) -> bool:
    """:func:`published` through paho's public API. ``is_published()`` raises for a
    message whose ``rc`` is an error: one never queued (no connection: not done), or a
    QoS 0 message a reconnect found unwritten (``MQTT_ERR_CONN_LOST``: paho is done with
    it, and its ``rc`` says it was lost). A QoS 1 message queued while disconnected is
    given ``rc`` success by :meth:`MqttConnection.publish_message` (paho keeps it and
    sends it on reconnect), so that this can see its acknowledgement."""
    if info.rc == paho.MQTT_ERR_CONN_LOST:
        return True
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


# The check of paho's internals runs once, at start-up (importing this module).
_info_published = internals.is_published if internals.problem() is None else published_public


class PublicBatch:
    """:meth:`MqttConnection.publish_many` without the fast path: its messages, each
    published with paho's public ``publish``, answering as one. ``rc`` is the first
    error among them (``MQTT_ERR_NO_CONN`` when the connection dropped during the
    batch; ``MQTT_ERR_CONN_LOST`` when a reconnect found one unwritten)."""

    __slots__ = ("_infos", "_rc")

    def __init__(self, infos: list[paho.MQTTMessageInfo], rc: paho.MQTTErrorCode = paho.MQTT_ERR_SUCCESS) -> None:
        self._infos = infos
        self._rc = rc

    @property
    def rc(self) -> paho.MQTTErrorCode | int:
        return self._rc or next((info.rc for info in self._infos if info.rc), paho.MQTT_ERR_SUCCESS)

    def published(self) -> bool:
        return not self._rc and all(published_public(info) for info in self._infos)


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (spec 1.5.5): ``127`` -> ``b"\\x7f"``, ``128`` -> ``b"\\x80\\x01"``."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


SHORT_LENGTHS = [bytes((n,)) for n in range(128)]  # the length of a reading's packet: one byte
PUBLISH_QOS0 = b"\x30"  # PUBLISH, QoS 0, not retained, not a duplicate


def topic_field(topic: str) -> bytes:
    """A PUBLISH packet's variable header for ``topic`` in MQTT v5: the topic as a
    length-prefixed UTF-8 string, then an empty property list.
    ValueError for a topic a publish may not use (empty, a wildcard, a NUL, too long)."""
    raw = topic.encode()
    if not raw or len(raw) > 65535 or b"+" in raw or b"#" in raw or b"\0" in raw:
        raise ValueError(f"not a topic to publish to: {topic!r}")
    return len(raw).to_bytes(2, "big") + raw + b"\x00"
