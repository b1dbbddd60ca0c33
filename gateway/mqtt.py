"""The gateway's MQTT connection: paho-mqtt with its known pitfalls designed around.

- Subscriptions are remembered and renewed in every on_connect (a new session
  after a broker restart has none).
- Every callback is wrapped: an exception inside a paho callback would end the
  network thread while ``is_connected()`` still says True.
- The last will publishes ``offline`` on the bridge status topic, retained.
- paho is driven by our own network thread through its external-loop API
  (``loop_read``/``loop_write``/``loop_misc``), not ``loop_start``: paho's own
  thread is woken by a byte on a socketpair for *every* publish, which cost the
  gateway a system call and a thread hand-off per reading. Here a publish from
  any thread wakes the loop only when paho's queue was empty, and the loop
  writes the whole queue before it sleeps again (docs/performance.md).
- Readings at QoS 0 go out many to a write (:meth:`MqttConnection.publish_many`),
  and a faster client takes three per-message costs out of paho's QoS 1 path; both
  lean on paho internals, which all live in ``gateway.paho_internals`` and are
  checked at start-up. When that check fails (a paho release moved one), the
  connection uses paho's public API instead, logs that once with paho's version,
  and works the same, only slower per message. Nothing else here touches paho's
  privates.
- The client id is derived from ``gateway_id``. mosquitto drops the older of two
  connections with one client id, silently: when the broker keeps closing ours soon
  after accepting it, the log says once, in plain words, that another client
  probably uses the id, naming it, and the retries slow down (the will each drop
  publishes makes Home Assistant show the gateway unavailable meanwhile).
- Username/password (read from ``mqtt.password_file``, never logged) and TLS
  (verification on unless ``tls.insecure``); a refused password, a missing
  authorisation or a certificate that fails verification is logged once as an
  error saying what to check, counted, and retried with backoff (1 s doubling to
  30 s): it never ends the process.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway import paho_internals as internals
from gateway.backoff import Backoff
from gateway.config import MqttConfig
from gateway.log_once import Once
from gateway.mqtt_batch import (
    PUBLISH_QOS0,
    SHORT_LENGTHS,
    Delivery,
    PublicBatch,
    published,
    published_public,
    remaining_length,
    topic_field,
)
from gateway.progress import Heartbeat

log = logging.getLogger("gateway.mqtt")
_fallback_logged = Once()

__all__ = ["Delivery", "MqttConnection", "PublicBatch", "apply_security", "published", "published_public",
           "remaining_length", "topic_field"]

Handler = Callable[[str, bytes, bool], None]
RawHandler = Callable[[paho.MQTTMessage], None]
SESSION_TAKEN_OVER = 142  # MQTT v5 reason codes
UNSPECIFIED_ERROR = 128  # (paho's reason for a connection the broker closed without a DISCONNECT)
BAD_USER_OR_PASSWORD = 134
NOT_AUTHORIZED = 135
TICK = 1.0  # seconds the network loop sleeps at most: keepalive pings are checked this often
CONNECT_TIME = 30.0  # seconds a connection attempt may block in paho: a slow name lookup, a TCP and a TLS timeout
STOP_WRITE = 2.0  # seconds the loop keeps writing queued packets (the DISCONNECT) at stop
DISCONNECT_TIME = 0.3  # seconds of stop()'s budget kept for writing the DISCONNECT once the acks are waited for
TOPIC_CACHE = 4096  # encoded topics kept for publish_many (devices x metrics; cleared when full)
MATCH_CACHE = 1024  # received topics whose matching subscriptions are kept (cleared when full)
MATCH_TOPIC_MAX = 256  # characters; longer topics are matched each time, never kept
FALLBACK_INFLIGHT = 20  # QoS 1 messages unacknowledged at once without the fast path: paho's default, and
# the Receive Maximum mosquitto announces by default (paho can change its limit only before connecting)
KICK_WINDOW = 120.0  # seconds: a connection the broker closes sooner, without a reason, may have been taken over
KICKS = 3  # such closes in a row, each followed by a connection at the first attempt: another client has our id
KICK_REPORT = 600.0  # seconds between two reports of a client id conflict that goes on


Remover = Callable[[], None]


def _add_hook(hooks: list[Callable[[], None]], hook: Callable[[], None]) -> Remover:
    hooks.append(hook)

    def remove() -> None:
        if hook in hooks:
            hooks.remove(hook)
    return remove


def _matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return paho.topic_matches_sub(topic_filter, topic)


def apply_security(client: paho.Client, cfg: MqttConfig) -> None:
    """Username, password (from its file) and TLS onto a paho client; SecretError when unusable."""
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.read_password())
    if cfg.tls.enabled:
        client.tls_set_context(cfg.tls.context())
        if cfg.tls.insecure:
            log.warning("mqtt.tls.insecure = true: the broker's certificate is NOT verified; anyone on the "
                        "network path can pose as the broker")


def _options(qos: int) -> SubscribeOptions:
    # Retain-as-published keeps the retain flag on live messages too, so a handler
    # can refuse every retained command, not only those replayed at subscribe time.
    return SubscribeOptions(qos=qos, retainAsPublished=True)


def _no_delay(client: paho.Client, userdata: object, sock: object) -> None:
    """Nagle's algorithm holds a small packet (a command's answer) until the broker
    acknowledges the previous one, up to 40 ms with delayed ACKs: turn it off."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):  # TLS too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttConnection:
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
        self._subscriptions: list[tuple[str, int, Handler | RawHandler, bool]] = []
        # topic -> the subscriptions it matches: paho's topic_matches_sub costs ~12 us a filter,
        # a third of the network thread's time per message under a command flood (issue 14).
        self._matches: dict[str, list[tuple[str, int, Handler | RawHandler, bool]]] = {}
        self._clean_start = clean_start
        self._connect_props: Properties | None = None
        if session_expiry or receive_maximum:
            self._connect_props = Properties(PacketTypes.CONNECT)
            if session_expiry:
                self._connect_props.SessionExpiryInterval = session_expiry
            if receive_maximum:
                self._connect_props.ReceiveMaximum = receive_maximum
        self._failing = ""  # the last connection failure, logged once per streak
        self._refused = ""  # the broker's last refusal (credentials, TLS), logged once per streak
        self._connected_at = 0.0  # monotonic time of the last connection
        self._kicks = 0  # connections closed by the broker without a reason, soon after it accepted them, in a row
        self._kicks_unreported = 0  # of them, since the conflict was last reported
        self._kick_reported_at: float | None = None  # when the client id conflict was last reported
        self._inflight_warned = False  # (without the fast path) the broker allows fewer in flight than we send
        self._manual_ack = manual_ack
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._session = False  # connected, and the subscriptions renewed (under _lock)
        self._late_hooks: list[Callable[[], None]] = []  # connect hooks added since: to run for this connection
        self._on_disconnect_hooks: list[Callable[[], None]] = []
        self._after_io_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._backoff = Backoff(first=1.0, cap=30.0)
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

    def on_connect(self, hook: Callable[[], None]) -> Remover:
        """Run ``hook`` after every (re)connection, once the subscriptions are renewed; added
        while connected, it also runs soon (on the network thread) for this connection, once.
        Returns what removes it (Home Assistant's pattern: whoever adds a hook can take it back)."""
        with self._lock:  # (with _on_connect's copy of the hooks: each connection runs a hook once)
            remove = _add_hook(self._on_connect_hooks, hook)
            late = self._session
            if late:
                self._late_hooks.append(hook)
        if late:
            self._wake()
        return remove

    def on_disconnect(self, hook: Callable[[], None]) -> Remover:
        """Run ``hook`` (on paho's thread) whenever the connection is lost; returns its remover."""
        return _add_hook(self._on_disconnect_hooks, hook)

    def after_io(self, hook: Callable[[], None]) -> Remover:
        """Run ``hook`` on the network thread after every round of reading and writing:
        where a caller tracking :func:`published` messages learns that some may be done.
        It must be quick; it runs once per round, not per message. Returns its remover."""
        return _add_hook(self._after_io_hooks, hook)

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

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> Remover:
        """``handler(topic, payload, retained)`` for every message matching ``topic_filter``,
        from now on and after every reconnect. Returns what unsubscribes it again::

            remove = conn.subscribe("pico/+/cmd/led", on_command)
            remove()   # the broker is told once no other handler wants the filter
        """
        return self._subscribe((topic_filter, qos, handler, False))

    def subscribe_messages(self, topic_filter: str, handler: RawHandler, qos: int = 1) -> Remover:
        """Like subscribe, but ``handler(msg)`` gets paho's message (properties, mid, qos).
        ``$share/<group>/<filter>`` subscribes to a shared subscription."""
        return self._subscribe((topic_filter, qos, handler, True))

    def _subscribe(self, entry: tuple[str, int, Handler | RawHandler, bool]) -> Remover:
        with self._lock:  # (with _on_connect's copy: a subscription made while it connects is not lost)
            self._subscriptions.append(entry)
            self._matches.clear()
            live = self._session
        if live:
            self.client.subscribe(entry[0], options=_options(entry[1]))

        def remove() -> None:
            with self._lock:
                kept = [sub for sub in self._subscriptions if sub is not entry]
                if len(kept) == len(self._subscriptions):
                    return  # removed before
                self._subscriptions = kept
                self._matches.clear()
                wanted = any(sub[0] == entry[0] for sub in kept)
            if not wanted and self.connected.is_set():
                self.client.unsubscribe(entry[0])
        return remove

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message received with ``manual_ack``."""
        self.client.ack(mid, qos)

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False when paho refused it (e.g. QoS 0 while offline)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self._count(1, info.rc)
        return info.rc == paho.MQTT_ERR_SUCCESS

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
        return bool(self._refused)

    def stop(self, last_words: list[tuple[str, str]] = (), timeout: float = STOP_WRITE + 1) -> None:
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
    def _wake_soon(self) -> None:
        local = self._local
        if getattr(local, "batching", False):
            local.wake = True
        else:
            self._wake()

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
                if self._kick_reported_at is not None:
                    self._conflict_over()
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
            self._connect_failed(exc)
        except Exception:
            self.stats["connect_failures"] += 1
            log.exception("cannot connect to %s:%s (retrying with backoff)", self.cfg.host, self.cfg.port)

    def _round(self, client: paho.Client, sock: socket.socket) -> None:
        # Bytes select() cannot see: decrypted by TLS, or in the fast client's read buffer.
        pending = self._buffered() + (sock.pending() if isinstance(sock, ssl.SSLSocket) else 0)
        readable, _, _ = select.select([sock, self._wake_r], [sock] if client.want_write() else [], [],
                                       0 if pending else TICK)
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if sock in readable or pending:
            client.loop_read()
        if client.socket() is sock and client.want_write():
            client.loop_write()  # whatever is queued, publishes from any thread included
        client.loop_misc()  # keepalive: PINGREQ, and a dead broker noticed
        if self._late_hooks:
            self._run_late_hooks()
        for hook in tuple(self._after_io_hooks):  # (a hook may be removed meanwhile)
            hook()

    def _run_late_hooks(self) -> None:
        """Connect hooks added while connected, for this connection (each on its own: one that
        raises must not keep the others from running)."""
        with self._lock:
            late, self._late_hooks = self._late_hooks, []
            hooks = self._on_connect_hooks
            late = [hook for hook in late if hook in hooks]  # (removed meanwhile: not run)
        for hook in late:
            try:
                hook()
            except Exception as exc:
                self._callback_failed(hook, exc)

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
            self.stats["connect_failures"] += 1
            self._kicks = 0  # (the broker answers, but refuses: not a connection taken over)
            where = f"{self.cfg.host}:{self.cfg.port}"
            if reason.value == BAD_USER_OR_PASSWORD:
                self.stats["auth_failures"] += 1
                self._refusal(reason.value, "broker %s refused our user name or password (user %r, password from "
                              "mqtt.password_file%s): check both, and the broker's password_file; retrying with "
                              "backoff", where, self.cfg.username,
                              "" if self.cfg.password_file else ", which is not set")
            elif reason.value == NOT_AUTHORIZED:
                # mosquitto 2.0 answers a wrong password with this code too.
                self.stats["auth_failures"] += 1
                if self.cfg.username:
                    self._refusal(reason.value, "broker %s refused user %r: not authorized (a wrong password, or a "
                                  "user the broker does not know or allow): check mqtt.username, the file "
                                  "mqtt.password_file names, and the broker's password_file; retrying with backoff",
                                  where, self.cfg.username)
                else:
                    self._refusal(reason.value, "broker %s refused an anonymous connection: not authorized; set "
                                  "mqtt.username and mqtt.password_file (docs/security.md); retrying with backoff",
                                  where)
            else:
                self._refusal(reason.value, "broker %s refused the connection: %s; retrying with backoff", where,
                              reason)
            return
        self._failing = self._refused = ""
        self._connected_at = time.monotonic()
        if not self._kicks:  # (while the broker keeps closing new connections, the retries slow down instead)
            self._backoff.reset()
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
        with self._lock:
            subs = list(self._subscriptions)
            hooks = tuple(self._on_connect_hooks)
            self._session, self._late_hooks = True, []
        if subs:
            client.subscribe([(f, _options(q)) for f, q, _, _ in subs])
        self.connected.set()
        for hook in hooks:
            hook()

    def _refusal(self, kind: object, msg: str, *args: object) -> None:
        """Log the broker's refusal (of our credentials, our TLS) as an error once per streak:
        each retry meets the same answer, and is counted; the repeats go to the debug log."""
        self._kicks = 0
        self._failing = ""
        if str(kind) != self._refused:
            self._refused = str(kind)
            log.error(msg, *args)
        else:
            log.debug(msg, *args)

    def _connect_failed(self, exc: OSError) -> None:
        where = f"{self.cfg.host}:{self.cfg.port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            self.stats["tls_failures"] += 1
            self._refusal("tls verification", "TLS: the certificate of broker %s failed verification: %s; check "
                          "mqtt.tls.ca_file (%s) and that mqtt.host matches the name in the broker's certificate; "
                          "retrying with backoff", where, exc.verify_message or exc,
                          self.cfg.tls.ca_file or "the system's CAs")
        elif isinstance(exc, ssl.SSLError):
            self.stats["tls_failures"] += 1
            self._refusal("tls", "TLS handshake with broker %s failed: %s; is it a TLS listener, and does it need "
                          "a client certificate (mqtt.tls.certfile/keyfile)? retrying with backoff", where,
                          exc.reason or exc)
        else:
            self.stats["connect_failures"] += 1
            self._kicks = 0  # the broker is away: its closing our connection was not another client's doing
            self._refused = ""
            text = f"{exc}" if exc else "unknown error"
            if text != self._failing:
                self._failing = text
                log.warning("cannot reach broker %s: %s; retrying with backoff", where, text)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       reason: ReasonCode, properties: Properties | None) -> None:
        was = self.connected.is_set()
        with self._lock:
            self._session, self._late_hooks = False, []  # (the next connection runs every hook)
        self.connected.clear()
        lasted = time.monotonic() - self._connected_at
        # mosquitto closes the older of two connections with one client id without a word (2.0) or
        # with "session taken over" (MQTT v5 reason 142): no DISCONNECT, "unspecified error", soon
        # after it accepted us. A broker going away looks the same, but then reconnecting fails,
        # which ends the streak (_connect_failed).
        taken_over = reason.value == SESSION_TAKEN_OVER
        if taken_over or (was and reason.value == UNSPECIFIED_ERROR and lasted < KICK_WINDOW
                          and not getattr(flags, "is_disconnect_packet_from_server", False)):
            self._kicks = max(self._kicks + 1, KICKS if taken_over else 0)
        elif was:
            self._kicks = 0
            self._backoff.reset()
        if self._kicks >= KICKS:
            self.stats["client_id_conflicts"] += 1
            self._report_conflict(taken_over)
        elif was and reason.value != 0:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        if was:
            self.stats["disconnects"] += 1
        for hook in tuple(self._on_disconnect_hooks):
            hook()

    def _report_conflict(self, taken_over: bool) -> None:
        """Another client uses our client id: say so once, then every KICK_REPORT seconds at most."""
        now = time.monotonic()
        self._kicks_unreported += 1
        if self._kick_reported_at is None:
            cause = ("the broker dropped us because another client connected with our client id %r" if taken_over
                     else f"the broker closed our connection {self._kicks} times in a row soon after accepting it: "
                          "another client is most likely connected with our client id %r (mosquitto then drops "
                          "the older connection; its log says \"Client <id> already connected, closing old "
                          "connection\")")
            log.error(cause + ". Is a second gateway running with the same gateway_id, or does another program use "
                      "this client id? Give each its own (mqtt.client_id). Each drop publishes our will, so Home "
                      "Assistant shows this gateway unavailable meanwhile; retrying less and less often (up to "
                      "every %g s)", self.client_id, self._backoff.cap)
        elif now - self._kick_reported_at >= KICK_REPORT:
            log.error("the broker still drops our connection: %d more time(s) in the last %.0f minutes; another "
                      "client most likely uses our client id %r", self._kicks_unreported,
                      (now - self._kick_reported_at) / 60, self.client_id)
        else:
            return
        self._kick_reported_at = now
        self._kicks_unreported = 0

    def _conflict_over(self) -> None:
        """After a reported client id conflict: once a connection has held for KICK_WINDOW, say it is over."""
        if self.connected.is_set() and time.monotonic() - self._connected_at >= KICK_WINDOW:
            log.info("the connection as %r has held for %.0f s: the client id conflict is over", self.client_id,
                     KICK_WINDOW)
            self._kick_reported_at = None
            self._kicks = self._kicks_unreported = 0
            self._backoff.reset()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.stats["publish_rejected"] += 1  # the broker refused it (e.g. its ACL): no retry helps
            log.warning("the broker refused a message: %s", reason)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        subs = self._matches.get(topic)
        if subs is None:
            with self._lock:
                subs = [sub for sub in self._subscriptions if _matches(sub[0], topic)]
                if len(topic) <= MATCH_TOPIC_MAX:  # (a flood of odd topics must not fill memory)
                    if len(self._matches) >= MATCH_CACHE:
                        self._matches.clear()
                    self._matches[topic] = subs
        owned = False  # a raw handler took the message, and with it the duty to acknowledge it
        for _, _, handler, raw in subs:
            # Each handler on its own: one that raises must not keep the message from the others.
            try:
                if raw:
                    owned = True
                    handler(msg)  # type: ignore[call-arg]
                else:
                    handler(topic, msg.payload, bool(msg.retain))  # type: ignore[call-arg]
            except Exception as exc:
                self._callback_failed(handler, exc)
        if self._manual_ack and not owned and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
