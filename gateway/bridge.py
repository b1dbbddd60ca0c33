"""The bridge: routes readings from links to the outbox (SQLite, then MQTT), and commands back.

Commands arrive on the MQTT thread, are validated there, and run on a per-device
worker so that a slow Pico never holds up the network thread or another Pico.

The gateway subscribes to the command topic of each device it owns, one by one,
never to ``<base>/+/cmd/led``: a command for a device it does not own never
reaches it (with several gateways on one broker, each hears only its own).
Ownership is announced on the retained ``<base>/<device>/owner`` topic; a device
that another gateway claims too is logged, counted and published, retained, on
``<base>/bridge/<gateway_id>/conflicts`` (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from gateway.commands import PayloadError, parse_led_payload
from gateway.links.base import CommandError, LedCommand, Link
from gateway.log_once import Once
from gateway.mqtt import MqttConnection
from gateway.outbox import Outbox, OutboxSettings
from gateway.progress import Heartbeat, first_stall
from gateway.store import Row, Store
from gateway.topics import Topics

log = logging.getLogger("gateway.bridge")

MAX_PENDING_COMMANDS = 8  # per device; more are refused as busy
LINKS_STOP = 1.0  # seconds Bridge.stop waits for all links together (part of the gateway's stop budget)


class Bridge:
    def __init__(self, gateway_id: str, topics: Topics, store: Store, mqtt: MqttConnection,
                 outbox: OutboxSettings = OutboxSettings()) -> None:
        self.gateway_id = gateway_id
        self.topics = topics
        self.mqtt = mqtt
        self.links: dict[str, Link] = {}
        self.stats: Counter[str] = Counter()
        self.outbox = Outbox(store, mqtt, topics, outbox, self._publishes_itself)
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self.last_seen: dict[str, int] = {}  # device -> ts_ms of its last reading
        self.on_metric: Callable[[str, str], None] | None = None  # discovery learns new metrics
        self._led: dict[str, bool] = {}
        self._online: dict[str, bool] = {}
        self._state_lock = threading.Lock()
        self._logged = Once(limit=10_000)  # (device, kind) warned about already
        self._conflicts: dict[str, set[str]] = {}  # device -> other gateways claiming it
        self._stopping = False
        mqtt.on_connect(self._announce)
        mqtt.subscribe(topics.all_owners(), self._on_owner)

    def _publishes_itself(self, device: str) -> bool:
        # A device no longer in the config may still have unsent readings: publish them.
        link = self.links.get(device)
        return link is not None and link.publishes_itself

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None]) -> None:
        self.mqtt.subscribe(topic_filter, handler)

    def _publishing(self) -> list[str]:
        """Devices whose status and state the gateway publishes (not the wifi ones)."""
        return [d for d, link in list(self.links.items()) if not link.publishes_itself]

    def add(self, link: Link) -> None:
        self.links[link.device] = link
        self._workers[link.device] = ThreadPoolExecutor(1, thread_name_prefix=f"cmd-{link.device}")
        if not link.publishes_itself:  # a wifi Pico subscribes to its own commands
            self.mqtt.subscribe(self.topics.command(link.device, "led"), self._on_command)

    def start(self) -> None:
        self.outbox.start()
        for link in list(self.links.values()):
            link.start()

    def stop(self, links_timeout: float = LINKS_STOP) -> list[tuple[str, str]]:
        """Stop every link at once, waiting up to ``links_timeout`` seconds for all of them,
        then flush readings (the outbox's own bound); returns the retained 'offline' messages
        to send last. A link still stopping at the deadline (a driver call that does not
        return) is logged, counted (``links_abandoned``) and left to end with the process,
        as is a command still running on a worker: neither holds up the stop."""
        self._stopping = True  # our own withdrawn claims must not make us claim again
        deadline = time.monotonic() + links_timeout
        stoppers = [threading.Thread(target=link.stop, name=f"stop-{device}", daemon=True)
                    for device, link in list(self.links.items())]
        for stopper in stoppers:
            stopper.start()
        for worker in self._workers.values():  # queued commands are dropped; a running one finishes on its own
            worker.shutdown(wait=False, cancel_futures=True)
        for stopper in stoppers:
            stopper.join(max(0.0, deadline - time.monotonic()))
        stuck = [s.name.removeprefix("stop-") for s in stoppers if s.is_alive()]
        if stuck:
            self.stats["links_abandoned"] += len(stuck)
            log.warning("link(s) of %s did not stop within %g s; left to end with the process",
                        ", ".join(sorted(stuck)), links_timeout)
        self.outbox.stop()
        last = [(self.topics.status(d), "offline") for d in self._publishing()]
        # Give up our claims (an empty retained message deletes one): a gateway that
        # claims the same device too takes it over instead of seeing a stale claim.
        last += [(self.topics.owner(d), "") for d in self.links]
        return last + [(self.topics.bridge_status(self.gateway_id), "offline")]

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): the writer thread and every link's thread are running, and
        every loop the gateway depends on (MQTT, the writer, each link's) turns within its
        bound (gateway/progress.py). Whether the MQTT thread runs at all is
        :func:`gateway.systemd.gateway_health`'s question."""
        if not self.outbox.alive():
            return False, "the outbox (database writer) thread has died"
        for device, link in list(self.links.items()):
            if not link.alive():
                return False, f"the link thread of device {device!r} has died"
        stall = first_stall(self.heartbeats())
        if stall is not None:
            return False, str(stall)
        return True, ""

    def heartbeats(self) -> list[Heartbeat]:
        """Every loop the gateway depends on, each once (the serial links share one)."""
        links = [hb for link in list(self.links.values()) for hb in link.heartbeats()]
        return list(dict.fromkeys([self.mqtt.heartbeat, self.outbox.heartbeat, *links]))

    # -- LinkEvents (called from link threads) -----------------------------------
    def reading(self, device: str, values: list[tuple[str, float]], ts_ms: int, seq: int | None) -> None:
        if not values:
            self.last_seen[device] = ts_ms  # heard from, though every value was bad
            return
        self.readings(device, [(device, metric, value, ts_ms, seq) for metric, value in values])

    def readings(self, device: str, rows: list[Row]) -> None:
        if not rows:
            return
        self.last_seen[device] = rows[-1][3]
        if self.on_metric is not None:
            for metric in dict.fromkeys(row[1] for row in rows):  # (in order: discovery keeps the first ones)
                self.on_metric(device, metric)
        self.outbox.put(rows)

    def led_state(self, device: str, on: bool) -> None:
        with self._state_lock:
            changed = self._led.get(device) != on
            self._led[device] = on
        if changed and not self.links[device].publishes_itself:
            self.mqtt.publish(self.topics.state(device), "on" if on else "off", qos=1, retain=True)

    def availability(self, device: str, online: bool) -> None:
        with self._state_lock:
            self._online[device] = online
        if not self.links[device].publishes_itself:
            self.mqtt.publish(self.topics.status(device), "online" if online else "offline", qos=1, retain=True)

    # -- MQTT side ------------------------------------------------------------------
    def _announce(self) -> None:
        """After every (re)connect: our own status, then every device's known state."""
        self.mqtt.publish(self.topics.bridge_status(self.gateway_id), "online", qos=1, retain=True)
        own = self._publishing()
        with self._state_lock:
            online = {d: self._online.get(d, False) for d in own}
            led = {d: self._led[d] for d in own if d in self._led}
        for device, is_online in online.items():
            self.mqtt.publish(self.topics.status(device), "online" if is_online else "offline", qos=1, retain=True)
        for device, on in led.items():
            self.mqtt.publish(self.topics.state(device), "on" if on else "off", qos=1, retain=True)
        for device in self.links:
            self.mqtt.publish(self.topics.owner(device), self.gateway_id, qos=1, retain=True)
        self._publish_conflicts()

    def _on_owner(self, topic: str, payload: bytes, retained: bool) -> None:
        """``<base>/<device>/owner``: another gateway claiming a device of ours is a conflict."""
        device = self.topics.parse_owner(topic)
        if device is None or device not in self.links:
            return
        claimant = payload[:64].decode("utf-8", "replace").strip()
        if claimant == self.gateway_id:
            return
        if not claimant:  # a claim was withdrawn (its gateway stopped): ours stands
            if self._stopping:
                return
            self.mqtt.publish(self.topics.owner(device), self.gateway_id, qos=1, retain=True)
            return
        with self._state_lock:
            others = self._conflicts.setdefault(device, set())
            new = claimant not in others
            others.add(claimant)
        if new:
            self.stats["owner_conflicts"] += 1
            log.error("device %r is also claimed by gateway %r: two gateways own the same device id and "
                      "would both store its readings and answer its commands; remove it from one config or "
                      "rename it (its claim: %s)", device, claimant, self.topics.owner(device))
            self._publish_conflicts()

    def conflicts(self) -> dict[str, list[str]]:
        with self._state_lock:
            return {d: sorted(others) for d, others in sorted(self._conflicts.items())}

    def _publish_conflicts(self) -> None:
        body = {"gateway": self.gateway_id, "devices": self.conflicts()}
        self.mqtt.publish(self.topics.bridge_conflicts(self.gateway_id), json.dumps(body), qos=1, retain=True)

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = self.topics.parse_command(topic)
        if parsed is None:
            return
        device, _ = parsed
        link = self.links.get(device)
        if link is None:
            # Not ours; we subscribe to owned devices' topics only, so only a bug brings one here.
            self.stats["commands_not_owned"] += 1
            return
        if link.publishes_itself:
            return  # the Pico subscribes to its own commands
        if retained:
            # A retained command replays on every reconnect ("ghost switching").
            self._answer(device, ok=False, error="retained commands are ignored; publish without retain (-r)")
            return
        try:
            command = parse_led_payload(payload)
        except PayloadError as exc:
            self._answer(device, ok=False, error=str(exc))
            return
        with self._pending_lock:
            if self._pending[device] >= MAX_PENDING_COMMANDS:
                busy = True
            else:
                busy = False
                self._pending[device] += 1
        if busy:
            self._answer(device, ok=False, command=command, error="busy: too many commands waiting for this Pico")
            return
        self._workers[device].submit(self._execute, link, command)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no command is queued or running (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._pending_lock:
                if not +self._pending:
                    return True
            time.sleep(0.001)
        return False

    def _execute(self, link: Link, command: LedCommand) -> None:
        try:
            state = link.set_led(command)
        except CommandError as exc:
            self._answer(link.device, ok=False, command=command, error=str(exc))
        except Exception as exc:  # a link bug must not kill the worker
            log.exception("command %s for %s failed unexpectedly", command.value, link.device)
            self._answer(link.device, ok=False, command=command, error=f"internal error: {type(exc).__name__}")
        else:
            self.led_state(link.device, state)
            self._answer(link.device, ok=True, command=command, state=state)
        finally:
            with self._pending_lock:
                self._pending[link.device] -= 1

    def _answer(self, device: str, ok: bool, command: LedCommand | None = None,
                state: bool | None = None, error: str | None = None) -> None:
        self.stats["commands_ok" if ok else "commands_failed"] += 1
        self.links[device].stats["commands_ok" if ok else "commands_failed"] += 1
        if not ok:
            self._log_once(device, error or "", "command for %s refused: %s", device, error)
        body = {
            "ok": ok,
            "command": command.value if command else None,
            "state": None if state is None else ("on" if state else "off"),
            "error": error,
        }
        self.mqtt.publish(self.topics.result(device), json.dumps(body), qos=1)

    def _log_once(self, device: str, kind: str, msg: str, *args: object) -> None:
        """Warn the first time a device has a given problem; later ones at debug level."""
        level = logging.WARNING if self._logged.first((device[:64], kind[:80])) else logging.DEBUG
        log.log(level, msg, *args)
