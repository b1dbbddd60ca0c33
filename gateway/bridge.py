"""The bridge: routes readings from links to the outbox (SQLite, then MQTT), and commands back.

Commands arrive on the MQTT thread, are validated there, and run on a per-device
worker so that a slow Pico never holds up the network thread or another Pico.

The gateway subscribes to the command topic of each device it owns, one by one,
never to ``<base>/+/cmd/led``: a command for a device it does not own never
reaches it (with several gateways on one broker, each hears only its own).
Ownership is announced on the retained ``<base>/<device>/owner`` topic, and
withdrawn (an empty retained message) in the last words; what another gateway's
claim on the same device means is gateway/ownership.py's business.

Anyone who may publish to the broker can flood these topics (a Node-RED flow in a
loop will), so every path is bounded:

- readings: a metric name must be one plain topic level (gateway/topics.py
  ``is_metric``), checked here once for every link; others are counted per device
  (``bad_metric``) and logged once per device;
- commands: at most MAX_PENDING_COMMANDS wait per device, to be carried out or for
  the broker to acknowledge their answer (paho keeps each answer until then, so
  answers cannot pile up behind a flood the broker is still handing us); more are
  refused at once as busy. Refusal answers go out at REFUSALS_PER_SECOND per device
  at most (a burst of REFUSAL_BURST, as many unacknowledged at most); the rest are
  counted (``refusals_unanswered``) and the next answer says how many. Every
  carried-out command is answered;
- owner claims: see gateway/ownership.py.

The bridge is a Feature (gateway/features.py): its MQTT hooks are added by
:meth:`Bridge.start` and :meth:`Bridge.add`, and removed by :meth:`Bridge.stop`
(a device's own, with the device, by :meth:`Bridge.remove_devices`). A reload
(gateway/reload.py) adds, removes and restarts devices while the others run on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as paho

from gateway import payloads
from gateway.commands import PayloadError, parse_led_payload
from gateway.domain import CommandError, LedCommand
from gateway.features import Feature, Remover
from gateway.links import LINKS
from gateway.links.base import DeviceConfig, Link
from gateway.log_once import Once
from gateway.mqtt import MqttConnection, published
from gateway.outbox import Outbox, OutboxSettings
from gateway.progress import Heartbeat, first_stall
from gateway.protocols import tell_stored
from gateway.store import Row, Store
from gateway.topics import METRIC_PATTERN, Topics, is_metric

log = logging.getLogger("gateway.bridge")

MAX_PENDING_COMMANDS = 8  # per device; more are refused as busy
LINKS_STOP = 1.0  # seconds Bridge.stop waits for all links together (part of the gateway's stop budget)
REFUSALS_PER_SECOND = 5  # refusal answers per device, sustained; the rest are counted, not answered
REFUSAL_BURST = 20  # refusal answers per device before the rate applies
MAX_KNOWN_METRICS = 4096  # metric names remembered as good: the readings' hot path checks a set, not a regex


class Bridge(Feature):
    name = "bridge"
    stop_floor = LINKS_STOP  # (and the outbox's flush, within the stop's budget)

    def __init__(self, gateway_id: str, topics: Topics, store: Store, mqtt: MqttConnection,
                 outbox: OutboxSettings | None = None) -> None:
        super().__init__()
        self.gateway_id = gateway_id
        self.topics = topics
        self.mqtt = mqtt
        self.links: dict[str, Link] = {}
        self.stats: Counter[str] = Counter()
        self.store = store
        self.outbox = Outbox(store, mqtt, topics, outbox or OutboxSettings(), self._publishes_itself)
        self._device_hooks: dict[str, list[Remover]] = {}  # device -> removers of its own subscriptions
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self.last_seen: dict[str, int] = {}  # device -> ts_ms of its last reading
        self.on_metric: Callable[[str, str], None] | None = None  # discovery learns new metrics
        self.on_firmware: Callable[[str, str], None] | None = None  # discovery shows each Pico's firmware
        self._led: dict[str, bool] = {}
        self._online: dict[str, bool] = {}
        self._state_lock = threading.Lock()
        self._logged = Once(limit=10_000)  # (device, kind) warned about already
        self._good_metrics: set[str] = set()
        # Refusal answers, per device: a token bucket, and the refusals not answered since the last answer.
        self._refusal_tokens: dict[str, tuple[float, float]] = {}  # device -> (tokens, at monotonic time)
        self._unanswered: Counter[str] = Counter()
        # Answers the broker has not acknowledged yet, per device (paho keeps each until then):
        # (message info, answer of a carried-out command?). Commands and refusals wait for room.
        self._undelivered: dict[str, deque[tuple[paho.MQTTMessageInfo, bool]]] = {}
        self._undelivered_count = 0
        self._carried_undelivered: Counter[str] = Counter()
        self._refusals_undelivered: Counter[str] = Counter()
        self.stopping = False

    def _publishes_itself(self, device: str) -> bool:
        # A device no longer in the config may still have unsent readings: publish them.
        link = self.links.get(device)
        return link is not None and link.publishes_itself

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, bool], None]) -> None:
        """For a link that hears its device on the broker (wifi); removed at :meth:`stop`, or
        with the device (:meth:`remove_devices`): the device is the filter's level below the base."""
        self._hook_device(self._device_of(topic_filter), self.mqtt.subscribe(topic_filter, handler))

    def _device_of(self, topic_filter: str) -> str | None:
        prefix = self.topics.base + "/"
        level = topic_filter[len(prefix):].split("/", 1)[0] if topic_filter.startswith(prefix) else ""
        return level if level and level not in ("+", "#") else None

    def _hook_device(self, device: str | None, remover: Remover | None) -> None:
        if device is None or remover is None:
            self.hook(remover)
            return
        with self._hooks_lock:
            self._device_hooks.setdefault(device, []).append(remover)

    def _unhook_device(self, device: str) -> None:
        with self._hooks_lock:
            removers = self._device_hooks.pop(device, [])
        for remove in reversed(removers):
            remove()

    def publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False) -> bool:
        """For a link that talks to its Pico through the broker (wifi); any thread."""
        return self.mqtt.publish(topic, payload, qos=qos, retain=retain)

    def _publishing(self) -> list[str]:
        """Devices whose status and state the gateway publishes (not the wifi ones)."""
        return [d for d, link in list(self.links.items()) if not link.publishes_itself]

    def add(self, link: Link) -> None:
        """Bridge ``link`` (not started: :meth:`start`, or :meth:`start_device` once running)."""
        self.links[link.device] = link
        if link.device not in self._workers:  # (a link restarted with a new config keeps its worker)
            self._workers[link.device] = ThreadPoolExecutor(1, thread_name_prefix=f"cmd-{link.device}")
        if not link.publishes_itself:  # a wifi Pico subscribes to its own commands
            self._hook_device(link.device, self.mqtt.subscribe(self.topics.command(link.device, "led"),
                                                               self._on_command))

    def add_device(self, config: DeviceConfig) -> Link:
        """Make the link ``config`` describes and :meth:`add` it (not started)."""
        link = LINKS[config.transport](config, self)
        self.add(link)
        return link

    def start_device(self, device: str) -> None:
        """Announce a device added while the gateway runs (status, claim), and start it."""
        if self.mqtt.connected.is_set():  # (else the next connect announces it, with every other)
            # Before the start: the link's first "online" must come after this status, not before it.
            self.publish_retained(device)
        self.links[device].start()

    def remove_devices(self, devices: list[str], timeout: float = LINKS_STOP) -> None:
        """Stop bridging ``devices`` while the others run on: their links stop, all at once
        (within ``timeout`` seconds, else left behind, as at :meth:`stop`), their subscriptions
        go, and so do their retained status, LED state and our claim (a wifi Pico's own status
        and state are its own). Their readings still unsent are published as usual."""
        links = {d: link for d in devices if (link := self.links.pop(d, None)) is not None}
        for device in links:
            self._unhook_device(device)  # first: a command arriving now finds no link
        self._stop_links(links, timeout)
        for device, link in links.items():
            worker = self._workers.pop(device, None)
            if worker is not None:
                worker.shutdown(wait=False, cancel_futures=True)
            with self._pending_lock:
                self._pending.pop(device, None)  # (its cancelled commands never count themselves down)
            with self._state_lock:
                self._online.pop(device, None)
                self._led.pop(device, None)
            if not link.publishes_itself:
                self.mqtt.publish(self.topics.status(device), "", qos=1, retain=True)
                self.mqtt.publish(self.topics.state(device), "", qos=1, retain=True)
            self.mqtt.publish(self.topics.owner(device), payloads.owner(""), qos=1, retain=True)

    def restart_devices(self, configs: list[DeviceConfig], timeout: float = LINKS_STOP) -> None:
        """Replace each device's link with one made from its new config: the old links stop
        all at once (so a port one of them held is free for another), then the new ones
        start. Each device's counters go on, and so does its command worker."""
        old = {c.id: link for c in configs if (link := self.links.get(c.id)) is not None}
        for device in old:
            self._unhook_device(device)
        self._stop_links(old, timeout)
        for config in configs:
            link = self.add_device(config)
            if config.id in old:
                link.stats.update(old[config.id].stats)
            self.start_device(config.id)

    def start(self) -> None:
        # Picos that keep readings until they are on disk hear of each commit (docs/protocol.md 1.8).
        store = self.store
        store.on_stored = lambda stored, refused: tell_stored(self.links, stored, refused)
        self.hook(lambda: setattr(store, "on_stored", None))
        self.hook(self.mqtt.on_connect(self._announce))
        self.hook(self.mqtt.after_io(self._answers_delivered))
        self.outbox.start()
        for link in list(self.links.values()):
            link.start()

    def stop(self, links_timeout: float = LINKS_STOP) -> None:
        """Stop every link at once, waiting up to ``links_timeout`` seconds for all of them,
        then flush readings (the outbox's own bound), and remove the bridge's hooks: a
        command arriving now has no effect. A link still stopping at the deadline (a driver
        call that does not return) is logged, counted (``links_abandoned``) and left to end
        with the process, as is a command still running on a worker: neither holds up the
        stop. :meth:`last_words` are what to publish last."""
        self.stopping = True
        for worker in list(self._workers.values()):  # queued commands are dropped; a running one finishes
            worker.shutdown(wait=False, cancel_futures=True)
        self._stop_links(dict(self.links), links_timeout)
        self.outbox.stop()
        with self._hooks_lock:
            devices = list(self._device_hooks)
        for device in devices:
            self._unhook_device(device)
        self.unhook()

    def _stop_links(self, links: dict[str, Link], timeout: float) -> None:
        """Stop ``links`` all at once, waiting up to ``timeout`` seconds for all of them; one
        still stopping then is logged, counted (``links_abandoned``) and left behind."""
        deadline = time.monotonic() + timeout
        stoppers = [threading.Thread(target=link.stop, name=f"stop-{device}", daemon=True)
                    for device, link in links.items()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(max(0.0, deadline - time.monotonic()))
        stuck = [s.name.removeprefix("stop-") for s in stoppers if s.is_alive()]
        if stuck:
            self.stats["links_abandoned"] += len(stuck)
            log.warning("link(s) of %s did not stop within %g s; left to end with the process",
                        ", ".join(sorted(stuck)), timeout)

    def last_words(self) -> list[tuple[str, str]]:
        """The retained messages to publish last, once stopped: each device's 'offline', our
        claims withdrawn, then the gateway's own 'offline'."""
        last = [(self.topics.status(d), "offline") for d in self._publishing()]
        # Give up our claims (an empty retained message deletes one): a gateway that
        # claims the same device too takes it over instead of seeing a stale claim.
        last += [(self.topics.owner(d), payloads.owner("")) for d in self.links]
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
        """Every link's readings, on their way to the outbox: the one place a metric name is checked."""
        if not rows:
            return
        self.last_seen[device] = rows[-1][3]  # heard from, even if every name is refused
        metrics = dict.fromkeys(row[1] for row in rows)  # (in order: discovery keeps the first ones)
        good = self._good_metrics
        for metric in metrics:
            if metric not in good and not self._learn_metric(metric):
                rows = self._refuse_bad_metrics(device, rows)
                if not rows:
                    return
                metrics = dict.fromkeys(row[1] for row in rows)
                break
        if self.on_metric is not None:
            for metric in metrics:
                self.on_metric(device, metric)
        self.outbox.put(rows)

    def _learn_metric(self, metric: str) -> bool:
        if not is_metric(metric):
            return False
        if len(self._good_metrics) < MAX_KNOWN_METRICS:  # past that, good names are checked each time
            self._good_metrics.add(metric)
        return True

    def _refuse_bad_metrics(self, device: str, rows: list[Row]) -> list[Row]:
        kept = [row for row in rows if row[1] in self._good_metrics or is_metric(row[1])]
        refused = len(rows) - len(kept)
        link = self.links.get(device)
        if link is not None:
            link.stats["bad_metric"] += refused
        self.stats["bad_metric"] += refused
        if self._logged.first((device[:64], "bad_metric")):
            bad = next(row[1] for row in rows if not is_metric(row[1]))
            log.warning("device %s: reading(s) with metric name %r refused: a metric name is %s (one topic "
                        "level: no '/', '+', '#', capitals or dots); counted as bad_metric, logged once per "
                        "device", device, bad[:40] + ("..." if len(bad) > 40 else ""), METRIC_PATTERN)
        return kept

    def led_state(self, device: str, on: bool) -> None:
        with self._state_lock:
            changed = self._led.get(device) != on
            self._led[device] = on
        link = self.links.get(device)  # (None: removed while it reported)
        if changed and link is not None and not link.publishes_itself:
            self.mqtt.publish(self.topics.state(device), "on" if on else "off", qos=1, retain=True)

    def firmware(self, device: str, version: str) -> None:
        if self.on_firmware is not None:
            self.on_firmware(device, version)

    def availability(self, device: str, online: bool) -> None:
        link = self.links.get(device)
        if link is None:
            return  # removed (a link reports offline as it stops)
        with self._state_lock:
            self._online[device] = online
        if not link.publishes_itself:
            self.mqtt.publish(self.topics.status(device), "online" if online else "offline", qos=1, retain=True)

    # -- MQTT side ------------------------------------------------------------------
    def _announce(self) -> None:
        """After every (re)connect: our own status, then every device's known state and our claim."""
        self.mqtt.publish(self.topics.bridge_status(self.gateway_id), "online", qos=1, retain=True)
        for device in list(self.links):
            self.publish_retained(device)

    def publish_retained(self, device: str) -> None:
        """The device's retained messages as this gateway knows them: status, LED state
        (those a wifi Pico publishes itself excepted), and our claim."""
        link = self.links.get(device)
        if link is None:
            return
        if not link.publishes_itself:
            with self._state_lock:
                online, led = self._online.get(device, False), self._led.get(device)
            self.mqtt.publish(self.topics.status(device), "online" if online else "offline", qos=1, retain=True)
            if led is not None:
                self.mqtt.publish(self.topics.state(device), "on" if led else "off", qos=1, retain=True)
        self.mqtt.publish(self.topics.owner(device), payloads.owner(self.gateway_id), qos=1, retain=True)

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
            self._refuse(device, "retained", error="retained commands are ignored; publish without retain (-r)")
            return
        try:
            command = parse_led_payload(payload)
        except PayloadError as exc:
            self._refuse(device, "payload", error=str(exc))
            return
        with self._pending_lock:
            # Waiting: to be carried out, or for the broker to take the answer (when the broker is
            # slow to acknowledge, e.g. behind a flood it forwards to us, answers must not pile up).
            if self._pending[device] + self._carried_undelivered[device] >= MAX_PENDING_COMMANDS:
                busy = True
            else:
                busy = False
                self._pending[device] += 1
        if busy:
            self._refuse(device, "busy", command, "busy: too many commands waiting for this Pico")
            return
        worker = self._workers.get(device)
        if worker is not None:
            try:
                worker.submit(self._execute, link, command)
                return
            except RuntimeError:  # (its worker shut down: removed by a reload as the command arrived)
                pass
        with self._pending_lock:  # not carried out (a removal may have dropped the count already)
            if self._pending.get(device):
                self._pending[device] -= 1

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
            self._refuse(link.device, str(exc), command, str(exc))
        except Exception as exc:  # a link bug must not kill the worker
            log.exception("command %s for %s failed unexpectedly", command.value, link.device)
            self._refuse(link.device, "internal", command, f"internal error: {type(exc).__name__}")
        else:
            self.led_state(link.device, state)
            self._answer(link.device, ok=True, command=command, state=state)
        finally:
            with self._pending_lock:
                self._pending[link.device] -= 1

    def _refuse(self, device: str, kind: str, command: LedCommand | None = None, error: str = "") -> None:
        """A command not carried out: counted, logged once per ``kind``, and answered unless this
        device's refusal answers exceed their rate, or REFUSAL_BURST of them wait for the broker
        (then counted as refusals_unanswered, and said in the next answer)."""
        self.stats["commands_failed"] += 1
        link = self.links.get(device)
        counts = link.stats if link is not None else Counter()  # (removed meanwhile: the bridge's count only)
        counts["commands_failed"] += 1
        self._log_once(device, kind, "command for %s refused: %s", device, error)
        now = time.monotonic()
        with self._pending_lock:
            tokens, then = self._refusal_tokens.get(device, (REFUSAL_BURST, now))
            tokens = min(REFUSAL_BURST, tokens + (now - then) * REFUSALS_PER_SECOND)
            answer = tokens >= 1 and self._refusals_undelivered[device] < REFUSAL_BURST
            self._refusal_tokens[device] = (tokens - 1 if answer else tokens, now)
            if answer:
                unanswered = self._unanswered.pop(device, 0)
            else:
                self._unanswered[device] += 1
        if not answer:
            self.stats["refusals_unanswered"] += 1
            counts["refusals_unanswered"] += 1
            self._log_once(device, "unanswered", "commands for %s arrive faster than they can be refused one by "
                           "one: more than %d refusals a second are counted (refusals_unanswered), not answered",
                           device, REFUSALS_PER_SECOND)
            return
        if unanswered:
            error += f" ({unanswered} more command(s) refused without an answer)"
        self._answer(device, ok=False, command=command, error=error)

    def _answer(self, device: str, ok: bool, command: LedCommand | None = None,
                state: bool | None = None, error: str | None = None) -> None:
        if ok:
            self.stats["commands_ok"] += 1
            link = self.links.get(device)
            if link is not None:
                link.stats["commands_ok"] += 1
        body = payloads.command_result(ok, command.value if command else None, state, error)
        info = self.mqtt.publish_message(self.topics.result(device), payloads.encode(body), 1, None)
        with self._pending_lock:
            self._undelivered.setdefault(device, deque()).append((info, ok))
            self._undelivered_count += 1
            (self._carried_undelivered if ok else self._refusals_undelivered)[device] += 1

    def _answers_delivered(self) -> None:
        """The MQTT network thread, after each round of I/O: make room for the answers acknowledged."""
        if not self._undelivered_count:
            return
        with self._pending_lock:
            for device, answers in self._undelivered.items():
                while answers and published(answers[0][0]):
                    _, ok = answers.popleft()
                    self._undelivered_count -= 1
                    (self._carried_undelivered if ok else self._refusals_undelivered)[device] -= 1

    def _log_once(self, device: str, kind: str, msg: str, *args: object) -> None:
        """Warn the first time a device has a given problem; later ones at debug level."""
        if self._logged.first((device[:64], kind[:80])):
            log.warning(msg, *args)
        elif log.isEnabledFor(logging.DEBUG):  # (a flood of refusals passes here: keep it cheap)
            log.debug(msg, *args)
