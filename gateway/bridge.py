"""The bridge: routes readings from links to the outbox (SQLite, then MQTT), and commands back.

Commands arrive on the MQTT thread, are validated there, and run on a per-device
worker so that a slow Pico never holds up the network thread or another Pico.

The gateway subscribes to the command topic of each device it owns, one by one,
never to ``<base>/+/cmd/led``: a command for a device it does not own never
reaches it (with several gateways on one broker, each hears only its own).
Ownership is announced on the retained ``<base>/<device>/owner`` topic; a device
that another gateway claims too is logged, counted and published, retained, on
``<base>/bridge/<gateway_id>/conflicts`` (docs/scaling.md). When the other
claim goes away (its gateway deletes it on a clean stop, or goes offline: its
``<base>/bridge/<gateway_id>/status``, the last will after a crash), the owner
publishes the device's owner, status and LED state again: the other gateway's
last words (``status offline``) must not stay on the broker as the device's state.
A claim by a gateway already offline is stale: the owner takes the device back.

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
- owner claims: the latest MAX_CLAIMANTS claimants per device are kept (older ones
  forgotten, counted), an error is logged for each up to that many, then one
  summary line; the conflicts message is republished once per burst of claims,
  CLAIMS_SPACING seconds apart at most. The other gateways' statuses are
  remembered for MAX_GATEWAYS_SEEN of them (a flood forgets the oldest: a stale
  claim then counts as a conflict, as an unknown gateway's does).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as paho

from gateway import payloads
from gateway.coalesce import Coalesced
from gateway.commands import PayloadError, parse_led_payload
from gateway.domain import DEVICE_ID_PATTERN, CommandError, LedCommand
from gateway.links.base import Link
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
MAX_CLAIMANTS = 4  # other gateways remembered per device claimed by them too
CLAIMS_SPACING = 1.0  # seconds between two publishes of the claims news (conflicts, our re-claims)
MAX_GATEWAYS_SEEN = 256  # other gateways whose status (online or not) is remembered
MAX_KNOWN_METRICS = 4096  # metric names remembered as good: the readings' hot path checks a set, not a regex
_GATEWAY_ID = re.compile(DEVICE_ID_PATTERN)  # what a claim must say (config.py's gateway_id rule)


class Bridge:
    def __init__(self, gateway_id: str, topics: Topics, store: Store, mqtt: MqttConnection,
                 outbox: OutboxSettings = OutboxSettings()) -> None:
        self.gateway_id = gateway_id
        self.topics = topics
        self.mqtt = mqtt
        self.links: dict[str, Link] = {}
        self.stats: Counter[str] = Counter()
        self.outbox = Outbox(store, mqtt, topics, outbox, self._publishes_itself)
        # Picos that keep readings until they are on disk hear of each commit (docs/protocol.md 1.8).
        store.on_stored = lambda stored, refused: tell_stored(self.links, stored, refused)
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
        # device -> other gateways claiming it, oldest first (a dict: ordered, no duplicates)
        self._conflicts: dict[str, dict[str, None]] = {}
        self._forgotten: Counter[str] = Counter()  # device -> claimants dropped for newer ones
        self._claims_logged: Counter[str] = Counter()  # device -> error lines logged for its claims
        self._reclaim: set[str] = set()  # devices whose other claim went away: publish ours again
        self._gateway_online: dict[str, bool] = {}  # other gateway -> its bridge status, oldest first
        self._conflicts_changed = False
        self._claims_news = Coalesced(self._publish_claims_news, "owner-claims", spacing=CLAIMS_SPACING)
        self._stopping = False
        mqtt.on_connect(self._announce)
        mqtt.after_io(self._answers_delivered)
        # (statuses first: at a connect their retained messages come before the claims, so a
        # claim left by a gateway that is offline is known to be stale when it arrives)
        mqtt.subscribe(topics.all_bridge_statuses(), self._on_gateway_status)
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
        if changed and not self.links[device].publishes_itself:
            self.mqtt.publish(self.topics.state(device), "on" if on else "off", qos=1, retain=True)

    def firmware(self, device: str, version: str) -> None:
        if self.on_firmware is not None:
            self.on_firmware(device, version)

    def availability(self, device: str, online: bool) -> None:
        with self._state_lock:
            self._online[device] = online
        if not self.links[device].publishes_itself:
            self.mqtt.publish(self.topics.status(device), "online" if online else "offline", qos=1, retain=True)

    # -- MQTT side ------------------------------------------------------------------
    def _announce(self) -> None:
        """After every (re)connect: our own status, then every device's known state and our claim."""
        self.mqtt.publish(self.topics.bridge_status(self.gateway_id), "online", qos=1, retain=True)
        for device in list(self.links):
            self._publish_retained(device)
        self._publish_conflicts()

    def _publish_retained(self, device: str) -> None:
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

    def _on_gateway_status(self, topic: str, payload: bytes, retained: bool) -> None:
        """``<base>/bridge/<gateway_id>/status`` of every gateway: one that goes offline (its
        clean stop, or its last will) no longer claims anything: devices of ours it claimed
        get our retained messages again, over its last words."""
        gateway = self.topics.parse_bridge_status(topic)
        if gateway is None or gateway == self.gateway_id or not _GATEWAY_ID.match(gateway):
            return
        online = payload.strip() == b"online"
        with self._state_lock:
            seen = self._gateway_online
            seen.pop(gateway, None)
            if len(seen) >= MAX_GATEWAYS_SEEN:
                del seen[next(iter(seen))]
            seen[gateway] = online
            freed = [] if online else [d for d, others in self._conflicts.items() if gateway in others]
            for device in freed:
                del self._conflicts[device][gateway]
                if not self._conflicts[device]:
                    del self._conflicts[device]
            self._reclaim.update(freed)
            self._conflicts_changed |= bool(freed)
        if freed:
            self.stats["owner_conflicts_ended"] += len(freed)
            log.warning("gateway %r, which also claimed %s, is offline: publishing %s owner, status and state "
                        "again", gateway, ", ".join(map(repr, freed)), "their" if len(freed) > 1 else "its")
            self._claims_news.request()

    def _on_owner(self, topic: str, payload: bytes, retained: bool) -> None:
        """``<base>/<device>/owner``: another gateway claiming a device of ours is a conflict."""
        device = self.topics.parse_owner(topic)
        if device is None or device not in self.links:
            return
        claimant = payloads.decode_owner(payload)
        if claimant == self.gateway_id:
            return
        if not claimant:  # a claim was withdrawn (its gateway stopped): ours stands, and our state
            if self._stopping:
                return
            with self._state_lock:
                self._reclaim.add(device)
            self._claims_news.request()
            return
        if not _GATEWAY_ID.match(claimant):  # no gateway can have that id: not a claim
            self.stats["owner_claims_malformed"] += 1
            self._log_once(device, "malformed claim", "ignoring a claim on %s that is not a gateway id: %r",
                           self.topics.owner(device), claimant[:40])
            return
        with self._state_lock:
            stale = self._gateway_online.get(claimant) is False
            if stale:
                self._reclaim.add(device)
        if stale:  # left by a gateway that crashed, or stopped before its claim reached us
            self.stats["owner_claims_stale"] += 1
            self._log_once(device, f"stale claim {claimant}", "device %r was claimed by gateway %r, which is "
                           "offline: a stale claim; publishing our claim, status and state", device, claimant)
            self._claims_news.request()
            return
        with self._state_lock:
            others = self._conflicts.setdefault(device, {})
            if claimant in others:
                return
            if len(others) >= MAX_CLAIMANTS:
                del others[next(iter(others))]  # the oldest: a flood of claims keeps the latest few
                self._forgotten[device] += 1
            others[claimant] = None
            self._conflicts_changed = True
            self._claims_logged[device] += 1
            logged = self._claims_logged[device]
        self.stats["owner_conflicts"] += 1
        if logged <= MAX_CLAIMANTS:
            log.error("device %r is also claimed by gateway %r: two gateways own the same device id and "
                      "would both store its readings and answer its commands; remove it from one config or "
                      "rename it (its claim: %s)", device, claimant, self.topics.owner(device))
        elif logged == MAX_CLAIMANTS + 1:
            log.error("device %r is claimed by more than %d other gateways: further claims are counted "
                      "(owner_conflicts) and the latest %d listed on %s, not logged", device, MAX_CLAIMANTS,
                      MAX_CLAIMANTS, self.topics.bridge_conflicts(self.gateway_id))
        self._claims_news.request()

    def conflicts(self) -> dict[str, list[str]]:
        """Device -> the other gateways claiming it (the latest MAX_CLAIMANTS), sorted."""
        with self._state_lock:
            return {d: sorted(others) for d, others in sorted(self._conflicts.items())}

    def _publish_conflicts(self) -> None:
        with self._state_lock:
            self._conflicts_changed = False
            forgotten = dict(sorted(self._forgotten.items()))
        body = payloads.conflicts(self.gateway_id, self.conflicts(), forgotten)
        self.mqtt.publish(self.topics.bridge_conflicts(self.gateway_id), payloads.encode(body), qos=1, retain=True)

    def _publish_claims_news(self) -> None:
        """What a burst of owner messages changed, once: our claims again, the conflicts."""
        with self._state_lock:
            reclaim, self._reclaim = self._reclaim, set()
            changed = self._conflicts_changed
        if not self._stopping:
            for device in sorted(reclaim):
                self._publish_retained(device)
        if changed:
            self._publish_conflicts()

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
        link = self.links[device]
        link.stats["commands_failed"] += 1
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
            link.stats["refusals_unanswered"] += 1
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
            self.links[device].stats["commands_ok"] += 1
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
