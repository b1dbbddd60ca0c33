"""Every use of paho-mqtt's private internals, in one place, checked before it is trusted.

The gateway's fast MQTT path (docs/performance.md) leans on paho 2.x internals that
paho does not promise to keep, and its minor releases have rewritten some of them
(``_handle_pubackcomp`` between 2.1 and 2.2). Used blindly, a paho upgrade that moved
one would leave the daemon looking healthy while its QoS 0 readings went nowhere. So:

- everything private lives here, and nowhere else in the gateway:
  :class:`FastClient` (one ``recv()`` for many packets, a lighter PUBACK, queued
  packets joined into one ``send()``), :func:`queue_publishes` (readings handed to
  paho's output queue as one write), :func:`is_published` and
  :func:`set_inflight_limit`;
- :func:`problem` checks once per process, on a throwaway client and without a
  network, that each of them is there and behaves as this module expects. When
  anything is missing or different it says what, and ``gateway.mqtt`` uses paho's
  public API instead (slower per message, same messages) and logs that once.

``PICO_GATEWAY_PAHO_PUBLIC=1`` in the environment turns the fast path off: a way to
rule it out when chasing a problem, and how the tests run the fallback.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import socket
from collections import deque
from importlib import metadata
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

PUBLIC_ONLY_ENV = "PICO_GATEWAY_PAHO_PUBLIC"
RECV_CHUNK = 65536  # bytes FastClient asks the socket for at once
MERGE_MAX = 65536  # bytes FastClient joins into one queued entry at most

# The private methods the fast path overrides or calls, with the parameters it passes.
_SIGNATURES = {
    "_sock_recv": ("self", "bufsize"),
    "_handle_pubackcomp": ("self", "cmd"),
    "_packet_queue": ("self", "command", "packet", "mid", "qos", "info"),
    "_do_on_publish": ("self", "mid", "reason_code", "properties"),
}
# The keys of an entry in paho's output queue that FastClient reads or writes.
_PACKET_KEYS = {"command", "mid", "qos", "pos", "to_process", "packet", "info"}


def paho_version() -> str:
    try:
        return metadata.version("paho-mqtt")
    except metadata.PackageNotFoundError:
        return getattr(paho, "__version__", "unknown")


def is_published(info: paho.MQTTMessageInfo) -> bool:
    """Whether paho has written (QoS 0) or the broker acknowledged (QoS 1) a message.

    Not ``info.is_published()``: that raises for a QoS 1 message queued while the
    connection was down, even after paho has sent it on reconnect and it was
    acknowledged; the flag it guards is the answer."""
    return info._published


def mark_published(info: paho.MQTTMessageInfo) -> None:
    info._set_as_published()


def set_inflight_limit(client: paho.Client, limit: int) -> None:
    """How many QoS 1 messages may await their acknowledgement, on an open connection.

    paho's public setter refuses an open connection, but the limit a broker allows
    (its Receive Maximum) is known only from its CONNACK. Between two positive values
    paho's flow control stays consistent: each acknowledgement compares against the
    limit anew."""
    client._max_inflight_messages = limit


def queue_publishes(client: paho.Client, packets: bytes, info: paho.MQTTMessageInfo) -> paho.MQTTErrorCode:
    """Hand ready-encoded QoS 0 PUBLISH packets to paho's output queue as one entry, sent
    with one write; ``info`` is marked published once its last byte is written, or
    ``MQTT_ERR_CONN_LOST`` (and published) when a reconnect finds it unwritten, as paho
    does a QoS 0 message of its own. An empty ``packets``: ``info`` is published at once
    (paho would drop an empty entry unsent)."""
    if not packets:
        mark_published(info)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
    return client._packet_queue(paho.PUBLISH, packets, 0, 0, info)


class FastClient(paho.Client):
    """paho's client, with three per-message costs of QoS 1 taken out (docs/performance.md,
    "How the gateway keeps a reading cheap"); everything else is paho's.

    - Reading: paho asks the socket for a packet's type byte, then each byte of its
      length, then its body: three ``recv()`` calls per PUBACK. Here one ``recv()``
      fills a buffer the next ones are served from; :meth:`buffered` tells the network
      loop that bytes wait there which ``select()`` cannot see (as an SSL socket's
      ``pending()`` does).
    - A plain PUBACK (success, or "no matching subscribers", without properties) skips
      paho's decoder, which builds a ``ReasonCode`` and a ``Properties`` for each;
      ``on_publish`` gets shared ones (read them, never change them). Any other PUBACK
      (a refusal, properties) goes through paho's own handling.
    - Writing: paho sends each queued packet with its own ``send()``; here runs of
      queued packets that need nothing done once written are joined first
      (:meth:`_merge_queued`), so the QoS 1 messages paho releases as acks come in go
      out together.

    Overrides paho's private ``_sock_recv`` and ``_handle_pubackcomp`` and rewrites
    entries of its private ``_out_packet`` queue; :func:`problem` checks each before
    the gateway uses this class."""

    _PUBACK_SUCCESS = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}
    _NO_PROPERTIES = Properties(PacketTypes.PUBACK)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx = bytearray()
        self._rx_sock: object = None  # the socket the buffered bytes came from

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not consumed yet."""
        return len(self._rx) if self._rx_sock is self._sock else 0

    def _sock_recv(self, bufsize: int) -> bytes:
        rx = self._rx
        if self._rx_sock is not self._sock:  # a new connection: what the last one left is void
            self._rx_sock = self._sock
            rx.clear()
        if not rx:
            data = super()._sock_recv(RECV_CHUNK)  # BlockingIOError when there is nothing
            if len(data) <= bufsize:  # all of it wanted (or b"": the broker closed)
                return data
            rx += data
        out = bytes(rx[:bufsize])
        del rx[:bufsize]
        return out

    def loop_write(self) -> paho.MQTTErrorCode:
        self._merge_queued()
        return super().loop_write()

    def _merge_queued(self) -> None:
        """Join runs of queued packets that need nothing done once written (all but a QoS 0
        PUBLISH, whose info is marked published, and DISCONNECT, which closes the socket)
        into one entry of at most MERGE_MAX bytes: one ``send()`` for a run of QoS 1
        messages instead of one each. An entry already merged, or partly written, stays
        as it is, so a socket that takes nothing for a while costs no copying. Only this
        (the network) thread takes from the queue; others only append, to the right."""
        queue = self._out_packet
        count = len(queue)
        if count < 2:
            return
        taken = list(itertools.islice(queue, count))  # built first: nothing is lost if this fails
        merged: list[Any] = []
        run: list[Any] = []
        size = 0

        def close_run() -> None:
            if len(run) == 1:
                merged.append(run[0])
            elif run:
                data = b"".join(p["packet"] for p in run)
                merged.append({**run[0], "packet": data, "to_process": len(data), "pos": 0, "info": None,
                               "merged": True})
            run.clear()

        for packet in taken:
            command = packet["command"] & 0xF0
            if (packet["pos"] or packet.get("merged") or command == paho.DISCONNECT
                    or (command == paho.PUBLISH and packet["qos"] == 0)):
                close_run()
                merged.append(packet)
                continue
            if size + len(packet["packet"]) > MERGE_MAX:
                close_run()
            if not run:
                size = 0
            run.append(packet)
            size += len(packet["packet"])
        close_run()
        if len(merged) == count:
            return  # nothing joined
        for _ in range(count):
            queue.popleft()
        queue.extendleft(reversed(merged))

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> paho.MQTTErrorCode:
        packet = self._in_packet["packet"]
        # The id, then nothing (success), or a reason code, or that and an empty property
        # list (MQTT 5 §3.4.2.1). mosquitto sends the reason code: 0x10 when no one subscribes.
        size = len(packet)
        reason = self._PUBACK_SUCCESS.get(packet[2] if size >= 3 else 0)
        if (cmd != "PUBACK" or reason is None or not 2 <= size <= 4 or (size == 4 and packet[3])
                or self._protocol != paho.MQTTv5):  # (3.1.1 allows exactly 2 bytes: paho checks)
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:  # (an ack for a message no longer out is ignored, as paho does)
                return self._do_on_publish(mid, reason, self._NO_PROPERTIES)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS


def problem() -> str | None:
    """Why the fast path cannot be used with this paho (None: it can), checked once per
    process; the environment variable is read each time."""
    if os.environ.get(PUBLIC_ONLY_ENV, "").strip() not in ("", "0"):
        return f"turned off by {PUBLIC_ONLY_ENV}={os.environ[PUBLIC_ONLY_ENV]}"
    return _self_test()


def recheck() -> None:
    """Forget the check's result: the next :func:`problem` checks paho again (after paho was
    patched, as the tests of the fallback do)."""
    _self_test.cache_clear()


@functools.cache
def _self_test() -> str | None:
    try:
        return _check()
    except Exception as exc:  # an internal that moved fails in any way at all
        return f"{type(exc).__name__}: {exc}"


def _check() -> str | None:
    for name, wanted in _SIGNATURES.items():
        method = getattr(paho.Client, name, None)
        if method is None:
            return f"paho.Client.{name} is gone"
        params = tuple(inspect.signature(method).parameters)
        if params[:len(wanted)] != wanted:
            return f"paho.Client.{name}{params} is not {name}{wanted}"
    if "_published" not in getattr(paho.MQTTMessageInfo, "__slots__", ()) or not hasattr(
            paho.MQTTMessageInfo, "_set_as_published"):
        return "paho.MQTTMessageInfo has no _published flag or _set_as_published()"
    info = paho.MQTTMessageInfo(1)
    fresh = is_published(info)
    mark_published(info)
    if fresh or not is_published(info):
        return "MQTTMessageInfo._set_as_published() does not set _published"

    client = FastClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_socket_register_write = lambda *args: None  # paho then queues without writing
    for name, kind in (("_sock", type(None)), ("_out_packet", deque), ("_in_packet", dict), ("_out_messages", dict),
                       ("_max_inflight_messages", int)):
        if not isinstance(getattr(client, name, ...), kind):
            return f"paho.Client().{name} is not a {kind.__name__}"
    if client._protocol != paho.MQTTv5 or not hasattr(client, "_out_message_mutex"):
        return "paho.Client()._protocol or ._out_message_mutex is gone"
    set_inflight_limit(client, 1234)
    if client.max_inflight_messages != 1234:
        return "paho.Client()._max_inflight_messages is not what max_inflight_messages reads"
    return _check_queue(client) or _check_puback(client) or _check_recv(client)


def _check_queue(client: FastClient) -> str | None:
    """The output queue: entries as FastClient reads them, joined as it means to."""
    packets = [(paho.PUBLISH | 2, b"A", 1, 1, None), (paho.PUBLISH | 2, b"B", 2, 1, None),
               (paho.PUBLISH, b"C", 3, 0, paho.MQTTMessageInfo(3)), (paho.DISCONNECT, b"D", 0, 0, None)]
    for command, data, mid, qos, info in packets:
        client._packet_queue(command, bytearray(data), mid, qos, info)
    queue = client._out_packet
    if len(queue) != 4 or not all(isinstance(e, dict) and _PACKET_KEYS <= e.keys() for e in queue):
        return f"paho.Client()._out_packet entries are not {sorted(_PACKET_KEYS)}"
    client._merge_queued()
    if [bytes(e["packet"]) for e in queue] != [b"AB", b"C", b"D"]:
        return "paho's output queue cannot be joined as FastClient expects"
    queue.clear()
    return None


def _check_puback(client: FastClient) -> str | None:
    """A PUBACK in ``_in_packet`` reaches ``on_publish`` and marks the message published:
    the plain one through FastClient's path, a refusal through paho's own."""
    acked: list[tuple[int, int]] = []
    client.on_publish = lambda c, userdata, mid, reason, properties: acked.append((mid, reason.value))
    for reason in (0x00, 0x87):
        info = client.publish("paho/self/test", b"x", qos=1)  # not connected: paho keeps it for later
        client._in_packet.update({"command": paho.PUBACK, "remaining_length": 4,
                                  "packet": bytearray(info.mid.to_bytes(2, "big") + bytes((reason, 0)))})
        client._handle_pubackcomp("PUBACK")
        if acked[-1:] != [(info.mid, reason)] or not is_published(info):
            return f"a PUBACK (reason {reason:#04x}) handed to _handle_pubackcomp did not complete its message"
    client.on_publish = None
    return None


def _check_recv(client: FastClient) -> str | None:
    """``_sock_recv`` reads ``_sock``, and raises BlockingIOError when it has nothing."""
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        client._sock = ours
        theirs.sendall(b"abc")
        got = [client._sock_recv(1), client._sock_recv(2)]
        if got != [b"a", b"bc"]:
            return f"_sock_recv read {got}, not [b'a', b'bc']"
        try:
            client._sock_recv(1)
        except BlockingIOError:
            return None
        return "_sock_recv does not raise BlockingIOError on a socket with nothing to read"
    finally:
        client._sock = None
        ours.close()
        theirs.close()
