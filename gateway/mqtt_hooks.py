"""What others hang on the connection: subscriptions and hooks, each with its remover.

Home Assistant's pattern (``async_subscribe`` returns its own remover): whoever adds
a subscription or a hook can take it back, and a part of the gateway that stops
removes every one it added (gateway/features.py)::

    remove = conn.subscribe("pico/+/cmd/led", on_command)
    remove()   # the broker is told once no other handler wants the filter

- Subscriptions are remembered and renewed at every connect (a new session after a
  broker restart has none); one made while connected is sent at once. Retain-as-
  published keeps the retain flag on live messages too, so a handler can refuse
  every retained command, not only those replayed at subscribe time.
- Connect hooks run after every connect, once the subscriptions are renewed; one
  added while connected also runs, once, for the connection in place (on the
  network thread, as every connect hook does): a part that starts after the
  connection still announces itself.
- A received message goes to every matching handler, each on its own (one that
  raises does not keep the message from the others); which subscriptions a topic
  matches is remembered (paho's ``topic_matches_sub`` costs ~12 µs a filter).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

Handler = Callable[[str, bytes, bool], None]
RawHandler = Callable[[paho.MQTTMessage], None]
Hook = Callable[[], None]
Remover = Callable[[], None]
Entry = tuple[str, int, Handler | RawHandler, bool]  # (filter, qos, handler, raw: it takes paho's message)
Failed = Callable[[Callable[..., object], Exception], None]  # how a handler's exception is counted and logged

MATCH_CACHE = 1024  # received topics whose matching subscriptions are kept (cleared when full)
MATCH_TOPIC_MAX = 256  # characters; longer topics are matched each time, never kept


def _add(hooks: list[Hook], hook: Hook) -> Remover:
    hooks.append(hook)

    def remove() -> None:
        if hook in hooks:
            hooks.remove(hook)
    return remove


def matches(topic_filter: str, topic: str) -> bool:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return paho.topic_matches_sub(topic_filter, topic)


def options(qos: int) -> SubscribeOptions:
    return SubscribeOptions(qos=qos, retainAsPublished=True)


class Hooks:
    """One connection's subscriptions and hooks. ``connected`` is the connection's own flag."""

    def __init__(self, client: paho.Client, connected: threading.Event, wake: Hook, failed: Failed) -> None:
        self.client = client
        self.connected = connected
        self._wake = wake
        self._failed = failed
        self._lock = threading.Lock()
        self._subscriptions: list[Entry] = []
        self._matches: dict[str, list[Entry]] = {}  # topic -> the subscriptions it matches
        self._session = False  # connected, and the subscriptions renewed (under _lock)
        self._on_connect: list[Hook] = []
        self.late: list[Hook] = []  # connect hooks added since the connect: to run for this connection
        self.on_disconnect: list[Hook] = []
        self.after_io: list[Hook] = []

    # -- any thread ------------------------------------------------------------------
    def add_on_connect(self, hook: Hook) -> Remover:
        with self._lock:  # (with connect()'s copy of the hooks: each connection runs a hook once)
            remove = _add(self._on_connect, hook)
            late = self._session
            if late:
                self.late.append(hook)
        if late:
            self._wake()
        return remove

    def add_on_disconnect(self, hook: Hook) -> Remover:
        return _add(self.on_disconnect, hook)

    def add_after_io(self, hook: Hook) -> Remover:
        return _add(self.after_io, hook)

    def subscribe(self, entry: Entry) -> Remover:
        with self._lock:  # (with connect()'s copy: a subscription made while it connects is not lost)
            self._subscriptions.append(entry)
            self._matches.clear()
            live = self._session
        if live:
            self.client.subscribe(entry[0], options=options(entry[1]))

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

    # -- the network thread --------------------------------------------------------------
    def connect(self) -> tuple[Hook, ...]:
        """A connection was accepted: renew the subscriptions; returns the connect hooks to run."""
        with self._lock:
            subs = list(self._subscriptions)
            hooks = tuple(self._on_connect)
            self._session, self.late = True, []
        if subs:
            self.client.subscribe([(f, options(q)) for f, q, _, _ in subs])
        return hooks

    def disconnect(self) -> None:
        with self._lock:
            self._session, self.late = False, []  # (the next connection runs every hook)

    def run_late(self) -> None:
        """Connect hooks added while connected, for this connection (each on its own: one that
        raises must not keep the others from running)."""
        with self._lock:
            late, self.late = self.late, []
            hooks = self._on_connect
            late = [hook for hook in late if hook in hooks]  # (removed meanwhile: not run)
        for hook in late:
            try:
                hook()
            except Exception as exc:
                self._failed(hook, exc)

    def dispatch(self, msg: paho.MQTTMessage) -> bool:
        """Hand ``msg`` to every matching handler; True when a raw handler took it (and with
        it the duty to acknowledge it, under manual acknowledgement)."""
        topic = msg.topic
        subs = self._matches.get(topic)
        if subs is None:
            with self._lock:
                subs = [sub for sub in self._subscriptions if matches(sub[0], topic)]
                if len(topic) <= MATCH_TOPIC_MAX:  # (a flood of odd topics must not fill memory)
                    if len(self._matches) >= MATCH_CACHE:
                        self._matches.clear()
                    self._matches[topic] = subs
        owned = False
        for _, _, handler, raw in subs:
            # Each handler on its own: one that raises must not keep the message from the others.
            try:
                if raw:
                    owned = True
                    handler(msg)  # type: ignore[call-arg,arg-type]  # (raw: a RawHandler; mypy cannot narrow)
                else:
                    handler(topic, msg.payload, bool(msg.retain))  # type: ignore[call-arg,arg-type]  # (a Handler)
            except Exception as exc:
                self._failed(handler, exc)
        return owned
