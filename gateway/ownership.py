"""The watch on other gateways' claims: a device two gateways claim, and the claim going away.

The bridge claims each device it bridges on the retained ``<base>/<device>/owner``
topic. This feature listens to every gateway's claims and bridge status: a
device that another gateway claims too is logged, counted (``owner_conflicts``)
and published, retained, on ``<base>/bridge/<gateway_id>/conflicts``
(docs/scaling.md). When the other claim goes away (its gateway deletes it on a
clean stop, or goes offline: its ``<base>/bridge/<gateway_id>/status``, the
last will after a crash), this gateway publishes the device's owner, status and
LED state again: the other gateway's last words (``status offline``) must not
stay on the broker as the device's state. A claim by a gateway already offline
is stale: this gateway takes the device back.

Anyone who may publish to the broker can flood these topics, so everything is
bounded: the latest MAX_CLAIMANTS claimants per device are kept (older ones
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
from collections import Counter
from typing import TYPE_CHECKING

from gateway import payloads
from gateway.coalesce import Coalesced
from gateway.domain import DEVICE_ID_PATTERN
from gateway.features import Feature
from gateway.log_once import Once

if TYPE_CHECKING:
    from gateway.bridge import Bridge

log = logging.getLogger("gateway.ownership")

MAX_CLAIMANTS = 4  # other gateways remembered per device claimed by them too
CLAIMS_SPACING = 1.0  # seconds between two publishes of the claims news (conflicts, our re-claims)
MAX_GATEWAYS_SEEN = 256  # other gateways whose status (online or not) is remembered
_GATEWAY_ID = re.compile(DEVICE_ID_PATTERN)  # what a claim must say (config.py's gateway_id rule)


class Ownership(Feature):
    name = "ownership"

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.gateway_id = bridge.gateway_id
        self.topics = bridge.topics
        self.stats = bridge.stats  # (counted with the bridge's: they are published in its diagnostics)
        self._lock = threading.Lock()
        # device -> other gateways claiming it, oldest first (a dict: ordered, no duplicates)
        self._conflicts: dict[str, dict[str, None]] = {}
        self._forgotten: Counter[str] = Counter()  # device -> claimants dropped for newer ones
        self._claims_logged: Counter[str] = Counter()  # device -> error lines logged for its claims
        self._reclaim: set[str] = set()  # devices whose other claim went away: publish ours again
        self._gateway_online: dict[str, bool] = {}  # other gateway -> its bridge status, oldest first
        self._changed = False
        self._news = Coalesced(self._publish_news, "owner-claims", spacing=CLAIMS_SPACING)
        self._logged = Once(limit=10_000)  # (device, kind) warned about already
        self._stopped = threading.Event()

    def start(self) -> None:
        mqtt = self.bridge.mqtt
        # Statuses first: at a connect their retained messages come before the claims, so a
        # claim left by a gateway that is offline is known to be stale when it arrives.
        self.hook(mqtt.subscribe(self.topics.all_bridge_statuses(), self._on_gateway_status))
        self.hook(mqtt.subscribe(self.topics.all_owners(), self._on_owner))
        self.hook(mqtt.on_connect(self.publish_conflicts))

    def stop(self) -> None:
        """From here (and from the bridge's stop on) our own withdrawn claims, in the bridge's
        last words, must not make us claim again."""
        self._stopped.set()
        super().stop()
        self._news.stop()

    def conflicts(self) -> dict[str, list[str]]:
        """Device -> the other gateways claiming it (the latest MAX_CLAIMANTS), sorted."""
        with self._lock:
            return {d: sorted(others) for d, others in sorted(self._conflicts.items())}

    def publish_conflicts(self) -> None:
        with self._lock:
            self._changed = False
            forgotten = dict(sorted(self._forgotten.items()))
        body = payloads.conflicts(self.gateway_id, self.conflicts(), forgotten)
        self.bridge.mqtt.publish(self.topics.bridge_conflicts(self.gateway_id), payloads.encode(body),
                                 qos=1, retain=True)

    def _publish_news(self) -> None:
        """What a burst of owner messages changed, once: our claims again, the conflicts."""
        with self._lock:
            reclaim, self._reclaim = self._reclaim, set()
            changed = self._changed
        if not self._stopped.is_set() and not self.bridge.stopping:
            for device in sorted(reclaim):
                self.bridge.publish_retained(device)
        if changed:
            self.publish_conflicts()

    # -- subscriptions (MQTT thread) ------------------------------------------------------
    def _on_gateway_status(self, topic: str, payload: bytes, retained: bool) -> None:
        """``<base>/bridge/<gateway_id>/status`` of every gateway: one that goes offline (its
        clean stop, or its last will) no longer claims anything: devices of ours it claimed
        get our retained messages again, over its last words."""
        gateway = self.topics.parse_bridge_status(topic)
        if gateway is None or gateway == self.gateway_id or not _GATEWAY_ID.match(gateway):
            return
        online = payload.strip() == b"online"
        with self._lock:
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
            self._changed |= bool(freed)
        if freed:
            self.stats["owner_conflicts_ended"] += len(freed)
            log.warning("gateway %r, which also claimed %s, is offline: publishing %s owner, status and state "
                        "again", gateway, ", ".join(map(repr, freed)), "their" if len(freed) > 1 else "its")
            self._news.request()

    def _on_owner(self, topic: str, payload: bytes, retained: bool) -> None:
        """``<base>/<device>/owner``: another gateway claiming a device of ours is a conflict."""
        device = self.topics.parse_owner(topic)
        if device is None or device not in self.bridge.links:
            return
        claimant = payloads.decode_owner(payload)
        if claimant == self.gateway_id:
            return
        if not claimant:  # a claim was withdrawn (its gateway stopped): ours stands, and our state
            if self._stopped.is_set() or self.bridge.stopping:  # (we withdraw ours as we stop)
                return
            with self._lock:
                self._reclaim.add(device)
            self._news.request()
            return
        if not _GATEWAY_ID.match(claimant):  # no gateway can have that id: not a claim
            self.stats["owner_claims_malformed"] += 1
            self._log_once(device, "malformed claim", "ignoring a claim on %s that is not a gateway id: %r",
                           self.topics.owner(device), claimant[:40])
            return
        with self._lock:
            stale = self._gateway_online.get(claimant) is False
            if stale:
                self._reclaim.add(device)
        if stale:  # left by a gateway that crashed, or stopped before its claim reached us
            self.stats["owner_claims_stale"] += 1
            self._log_once(device, f"stale claim {claimant}", "device %r was claimed by gateway %r, which is "
                           "offline: a stale claim; publishing our claim, status and state", device, claimant)
            self._news.request()
            return
        with self._lock:
            others = self._conflicts.setdefault(device, {})
            if claimant in others:
                return
            if len(others) >= MAX_CLAIMANTS:
                del others[next(iter(others))]  # the oldest: a flood of claims keeps the latest few
                self._forgotten[device] += 1
            others[claimant] = None
            self._changed = True
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
        self._news.request()

    def _log_once(self, device: str, kind: str, msg: str, *args: object) -> None:
        """Warn the first time a device has a given problem; later ones at debug level."""
        if self._logged.first((device[:64], kind[:80])):
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)
