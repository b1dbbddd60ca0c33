"""The gateway's MQTT connection: paho-mqtt with its known pitfalls designed around.

- Subscriptions are remembered and renewed in every on_connect (a new session
  after a broker restart has none): ``gateway.mqtt_hooks``.
- Every callback is wrapped: an exception inside a paho callback would end the
  network thread while ``is_connected()`` still says True.
- The last will publishes ``offline`` on the bridge status topic, retained.
- paho is driven by our own network thread through its external-loop API
  (``loop_read``/``loop_write``/``loop_misc``), not ``loop_start``: paho's own
  thread is woken by a byte on a socketpair for *every* publish, which cost the
  gateway a system call and a thread hand-off per reading. Here a publish from
  any thread wakes the loop only when paho's queue was empty, and the loop
  writes the whole queue before it sleeps again (docs/performance.md).
- Publishing is ``gateway.mqtt_publish``'s: readings at QoS 0 go out many to a
  write, and a faster client takes three per-message costs out of paho's QoS 1
  path; both lean on paho internals, which all live in ``gateway.paho_internals``
  and are checked at start-up. When that check fails (a paho release moved one),
  the connection uses paho's public API instead, logs that once with paho's
  version, and works the same, only slower per message.
- Hooks (subscriptions, connect, disconnect, after-I/O) each return their remover;
  one added while connected takes effect for the connection in place (``gateway.mqtt_hooks``).
- The client id is derived from ``gateway_id``; username/password (read from
  ``mqtt.password_file``, never logged) and TLS (verification on unless
  ``tls.insecure``). Whatever the broker refuses or closes is logged once, in plain
  words, counted, and retried with backoff (1 s doubling to 30 s): it never ends
  the process (``gateway.mqtt_failures``).

    conn = MqttConnection(cfg.mqtt, client_id="pico-gateway-pi", will=("pico/bridge/pi/status", "offline"))
    conn.subscribe("pico/+/cmd/led", handler)   # handler(topic, payload, retained)
    conn.start(); conn.publish("pico/x/status", "online", qos=1, retain=True)
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import paho_internals as internals
from gateway.backoff import Backoff
from gateway.config import MqttConfig
from gateway.log_once import Once
from gateway.mqtt_batch import Delivery, PublicBatch, published, published_public, remaining_length, topic_field
from gateway.mqtt_failures import ConnectionFailures
from gateway.mqtt_hooks import Handler, Hook, Hooks, RawHandler, Remover
from gateway.mqtt_publish import Publishing
from gateway.progress import Heartbeat

log = logging.getLogger("gateway.mqtt")
_fallback_logged = Once()

__all__ = ["Delivery", "MqttConnection", "PublicBatch", "apply_security", "published", "published_public",
           "remaining_length", "topic_field"]

TICK = 1.0  # seconds the network loop sleeps at most: keepalive pings are checked this often
CONNECT_TIME = 30.0  # seconds a connection attempt may block in paho: a slow name lookup, a TCP and a TLS timeout
STOP_WRITE = 2.0  # seconds the loop keeps writing queued packets (the DISCONNECT) at stop
DISCONNECT_TIME = 0.3  # seconds of stop()'s budget kept for writing the DISCONNECT once the acks are waited for
FALLBACK_INFLIGHT = 20  # QoS 1 messages unacknowledged at once without the fast path: paho's default, and
# the Receive Maximum mosquitto announces by default (paho can change its limit only before connecting)


def apply_security(client: paho.Client, cfg: MqttConfig) -> None:
    """Username, password (from its file) and TLS onto a paho client; SecretError when unusable."""
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.read_password())
    if cfg.tls.enabled:
        client.tls_set_context(cfg.tls.context())
        if cfg.tls.insecure:
            log.warning("mqtt.tls.insecure = true: the broker's certificate is NOT verified; anyone on the "
                        "network path can pose as the broker")


def _no_delay(client: paho.Client, userdata: object, sock: object) -> None:
    """Nagle's algorithm holds a small packet (a command's answer) until the broker
    acknowledges the previous one, up to 40 ms with delayed ACKs: turn it off."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):  # TLS too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttConnection(Publishing):
    def __init__(self, cfg: MqttConfig, client_id: str, will: tuple[str, str] | None,
                 clean_start: bool = True, session_expiry: int = 0, receive_maximum: int | None = None,
                 manual_ack: bool = False, report_refusals: bool = True, fast_path: bool = True) -> None:
        """``clean_start=False`` with ``session_expiry`` seconds: a persistent session (the
        broker keeps QoS 1 messages for us while we are away); ``manual_ack``: QoS 1
        messages are acknowledged only by :meth:`ack` (store first, then acknowledge).
        ``report_refusals``: count and log QoS 1 messages the broker refuses (its ACL);
        this installs paho's ``on_publish``, which makes paho build two objects for every
        QoS 0 message written too (~10 µs, a sixth of a reading's cost under load), so a
        gateway publishing readings at QoS 0 turns it off.
        ``fast_path=False``: paho's public API only, as when the check of paho's internals
        fails (``gateway.paho_internals``).
        Raises SecretError when the password or a TLS file cannot be used."""
        self.cfg = cfg
        self.client_id = client_id
        self.stats: Counter[str] = Counter()
        self.connected = threading.Event()
        self._clean_start = clean_start
        self._connect_props: Properties | None = None
        if session_expiry or receive_maximum:
            self._connect_props = Properties(PacketTypes.CONNECT)
            if session_expiry:
                self._connect_props.SessionExpiryInterval = session_expiry
            if receive_maximum:
                self._connect_props.ReceiveMaximum = receive_maximum
        self._inflight_warned = False  # (without the fast path) the broker allows fewer in flight than we send
        self._manual_ack = manual_ack
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._backoff = Backoff(first=1.0, cap=30.0)
        self._failures = ConnectionFailures(cfg, client_id, self.stats, self._backoff)
        self._loop_errors = Once()  # kinds of loop error logged already
        self._callback_errors = Once()  # kinds of callback and handler error logged already
        self.heartbeat = Heartbeat("mqtt", TICK)
        self._topic_fields: dict[str, bytes] = {}  # publish_many's encoded topics
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        problem = internals.problem() if fast_path else "turned off by the caller"
        self.fast_path = problem is None
        client_class = internals.FastClient if self.fast_path else paho.Client
        self.client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        self._buffered: Callable[[], int] = getattr(self.client, "buffered", lambda: 0)
        if problem is not None:
            self.client.max_inflight_messages_set(FALLBACK_INFLIGHT)  # (only possible before connecting)
            if _fallback_logged.first(problem):
                log.warning("paho-mqtt %s: the fast MQTT path is off (%s); using paho's public API instead: the "
                            "same messages, at a higher CPU cost per message (docs/performance.md)",
                            internals.paho_version(), problem)
        self.client.suppress_exceptions = True  # second line of defence behind _guard
        self._hooks = Hooks(self.client, self.connected, self._wake, self._callback_failed)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        apply_security(self.client, cfg)
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_message = self._guard(self._on_message)
        if report_refusals:
            self.client.on_publish = self._guard(self._on_publish)
        self.client.on_socket_open = self._guard(_no_delay)
        # paho calls this when a packet is queued while none was (from any thread): wake the loop.
        self._local = threading.local()  # .batching: this thread defers its wake (see batch())
        self.client.on_socket_register_write = lambda client, userdata, sock: self._wake_soon()

    def on_connect(self, hook: Hook) -> Remover:
        """Run ``hook`` after every (re)connection, once the subscriptions are renewed; added
        while connected, it also runs soon (on the network thread) for this connection, once.
        Returns what removes it."""
        return self._hooks.add_on_connect(hook)

    def on_disconnect(self, hook: Hook) -> Remover:
        """Run ``hook`` (on the network thread) whenever the connection is lost; returns its remover."""
        return self._hooks.add_on_disconnect(hook)

    def after_io(self, hook: Hook) -> Remover:
        """Run ``hook`` on the network thread after every round of reading and writing:
        where a caller tracking :func:`published` messages learns that some may be done.
        It must be quick; it runs once per round, not per message. Returns its remover."""
        return self._hooks.add_after_io(hook)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> Remover:
        """``handler(topic, payload, retained)`` for every message matching ``topic_filter``,
        from now on and after every reconnect. Returns what unsubscribes it again::

            remove = conn.subscribe("pico/+/cmd/led", on_command)
            remove()   # the broker is told once no other handler wants the filter
        """
        return self._hooks.subscribe((topic_filter, qos, handler, False))

    def subscribe_messages(self, topic_filter: str, handler: RawHandler, qos: int = 1) -> Remover:
        """Like subscribe, but ``handler(msg)`` gets paho's message (properties, mid, qos).
        ``$share/<group>/<filter>`` subscribes to a shared subscription."""
        return self._hooks.subscribe((topic_filter, qos, handler, True))

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message received with ``manual_ack``."""
        self.client.ack(mid, qos)

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                  clean_start=self._clean_start, properties=self._connect_props)
        self._thread = threading.Thread(target=self._network, name="mqtt", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The network thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def refused(self) -> bool:
        """The broker answers but refuses us (credentials, TLS): an error said so, with what to
        check; not the moment to add that the broker is not reachable."""
        return self._failures.refused()

    def stop(self, last_words: Sequence[tuple[str, str]] = (), timeout: float = STOP_WRITE + 1) -> None:
        """Publish ``last_words`` (retained, QoS 1), wait for their acknowledgements, disconnect:
        all within ``timeout`` seconds, whatever the broker does (a broker that stopped
        answering costs the budget once, not once per message). Without a connection, or
        when the DISCONNECT does not reach the broker, it sends our will instead."""
        deadline = time.monotonic() + timeout
        infos = [self.client.publish(t, p, qos=1, retain=True) for t, p in last_words]
        acks_by = deadline - min(DISCONNECT_TIME, timeout / 2)  # the rest is the DISCONNECT's
        for info in infos:  # (all are out at once: waiting for one is waiting for the others too)
            left = acks_by - time.monotonic()
            if left <= 0 or not self.connected.is_set():
                break
            try:
                info.wait_for_publish(timeout=left)
            except (RuntimeError, ValueError):
                pass  # queued while not connected: the broker will send our will instead
        self.client.disconnect()  # queues DISCONNECT; the loop writes it and ends
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self.alive():  # (a thread stuck in a connection attempt, or still writing to a broker that
            # does not read, keeps them and ends with the process: it is a daemon thread)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1

    # -- the network thread ----------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full (the loop is awake anyway) or closed (stopped)

    def _network(self) -> None:
        """Connect (with backoff), then read, write and keep alive until stopped."""
        client = self.client
        stop_deadline = None
        while True:
            sock = client.socket()
            # A connection attempt waits out its backoff, then paho's connect (a name lookup, TCP, TLS).
            self.heartbeat.beat(None if sock is not None else self._backoff.cap + CONNECT_TIME)
            if self._stopping.is_set():
                stop_deadline = stop_deadline or time.monotonic() + STOP_WRITE
                if sock is None or not client.want_write() or time.monotonic() > stop_deadline:
                    return
            if sock is None:
                self._connect()
                continue
            try:
                self._round(client, sock)
                if self._failures.conflict_reported_at is not None:
                    self._failures.conflict_over(self.connected.is_set())
            except Exception as exc:  # paho or a hook failed: count, log (once per kind), carry on
                self.stats["loop_errors"] += 1
                if self._loop_errors.first(f"{type(exc).__name__}: {exc}"[:200]):
                    log.exception("error in the MQTT network loop (survived; counted as loop_errors)")
                self._stopping.wait(0.1)

    def _connect(self) -> None:
        if self.stats["connect_attempts"]:
            if self._stopping.wait(self._backoff.next()):
                return
        self.stats["connect_attempts"] += 1
        try:
            self.client.reconnect()
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            self._failures.connect_failed(exc)
        except Exception:
            self.stats["connect_failures"] += 1
            log.exception("cannot connect to %s:%s (retrying with backoff)", self.cfg.host, self.cfg.port)

    def _round(self, client: paho.Client, sock: paho.SocketLike) -> None:
        # Bytes select() cannot see: decrypted by TLS, or in the fast client's read buffer.
        pending = self._buffered() + (sock.pending() if isinstance(sock, ssl.SSLSocket) else 0)
        fd = sock.fileno()
        readable, _, _ = select.select([fd, self._wake_r], [fd] if client.want_write() else [], [],
                                       0 if pending else TICK)
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if fd in readable or pending:
            client.loop_read()
        if client.socket() is sock and client.want_write():
            client.loop_write()  # whatever is queued, publishes from any thread included
        client.loop_misc()  # keepalive: PINGREQ, and a dead broker noticed
        hooks = self._hooks
        if hooks.late:
            hooks.run_late()
        for hook in tuple(hooks.after_io):  # (a hook may be removed meanwhile)
            hook()

    # -- paho callbacks (network thread) -------------------------------------
    def _guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: object) -> None:
            try:
                callback(*args)
            except Exception as exc:
                self._callback_failed(callback, exc)

        return guarded

    def _callback_failed(self, callback: Callable[..., object], exc: Exception) -> None:
        """Count it; log it with its traceback once per callback and kind (a handler failing on
        every message must not write a line per message). Call from an ``except`` block."""
        self.stats["callback_errors"] += 1
        name = getattr(callback, "__qualname__", repr(callback))
        if self._callback_errors.first((name, f"{type(exc).__name__}: {exc}"[:200])):
            log.exception("error in MQTT callback %s (survived; counted as callback_errors)", name)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self._failures.connect_refused(reason)
            return
        self._failures.connected()
        # paho does not honour the broker's Receive Maximum (MQTT v5; absent means 65,535):
        # more unacknowledged QoS 1 messages than it allows is a protocol error, and
        # fewer (paho's own limit is 20) leave the outbox's window idle while acks travel.
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if self.fast_path:
            internals.set_inflight_limit(client, receive_maximum or 65535)
        elif receive_maximum and receive_maximum < client.max_inflight_messages and not self._inflight_warned:
            self._inflight_warned = True
            log.warning("broker %s:%s allows only %d unacknowledged QoS 1 messages, and without the fast path "
                            "the gateway sends up to %d (paho fixes its limit before connecting): the broker may "
                            "drop the connection; set max_inflight_messages %d or more in mosquitto's config",
                            self.cfg.host, self.cfg.port, receive_maximum, client.max_inflight_messages,
                            client.max_inflight_messages)
        log.info("connected to %s:%s as %s%s", self.cfg.host, self.cfg.port, self.client_id,
                 " (TLS)" if self.cfg.tls.enabled else "")
        self.stats["connects"] += 1
        hooks = self._hooks.connect()
        self.connected.set()
        for hook in hooks:
            hook()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       reason: ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        self._hooks.disconnect()
        self.connected.clear()
        self._failures.disconnected(was, reason, bool(getattr(flags, "is_disconnect_packet_from_server", False)))
        for hook in tuple(self._hooks.on_disconnect):
            hook()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.stats["publish_rejected"] += 1  # the broker refused it (e.g. its ACL): no retry helps
            log.warning("the broker refused a message: %s", reason)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        owned = self._hooks.dispatch(msg)  # (a raw handler that took it acknowledges it itself)
        if self._manual_ack and not owned and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
