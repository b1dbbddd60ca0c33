"""Adopting Wi-Fi Picos the config does not name (``adopt_wifi_picos = true``; off by default).

Our firmware on a Pico W publishes a retained hello, ``<base>/<device>/hello``
(JSON with ``proto``, ``fw``, ``metrics``), when it connects. With adoption on,
the gateway treats any such Pico it does not know as a device of the link that
publishes for itself (``Link.publishes_itself``: the Pico talks to the broker on
its own): it stores its readings and follows its status, exactly as if the config
listed it.

Only a hello adopts: a status topic alone may belong to another gateway's wired
Pico. Ids must be valid device ids; at most MAX_ADOPTED devices are adopted, so
a flood of made-up hellos cannot grow the gateway without end. Adopted devices
are the bridge's from then on (it stops them); :meth:`Adoption.stop` only ends
the adopting.
"""

from __future__ import annotations

import logging
import threading

from gateway import payloads
from gateway.bridge import Bridge
from gateway.domain import is_device_id
from gateway.features import Feature
from gateway.links import LINKS
from gateway.links.base import Link

log = logging.getLogger("gateway.adoption")

MAX_ADOPTED = 64


def self_publishing_link() -> type[Link]:
    """The link of a Pico that publishes to the broker itself (the first registered, should
    there be several: a hello does not say which link its Pico uses)."""
    for link in LINKS.values():
        if link.publishes_itself:
            return link
    raise LookupError("no registered link publishes for itself: there is nothing to adopt a Pico as")


class Adoption(Feature):
    name = "adoption"

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.link = self_publishing_link()
        self.adopted: list[str] = []
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        self.hook(self.bridge.mqtt.subscribe(self.bridge.topics.all_hellos(), self._on_hello))

    def stop(self) -> None:
        with self._lock:  # (a hello being handled now adopts, or not, before the stop returns)
            self._stopped = True
        super().stop()

    def _on_hello(self, topic: str, payload: bytes, retained: bool) -> None:
        device = topic.split("/")[-2]
        if device in self.bridge.links or not is_device_id(device):
            return
        hello = payloads.decode_hello(payload, 1024)
        if hello is None or not payloads.is_our_hello(hello):
            self.bridge.stats["adoption_refused"] += 1
            return
        with self._lock:
            if device in self.bridge.links or self._stopped:
                return
            if len(self.adopted) >= MAX_ADOPTED:
                self.bridge.stats["adoption_refused"] += 1
                log.warning("not adopting %r: already %d adopted Wi-Fi Picos", device, MAX_ADOPTED)
                return
            link = self.link(self.link.Config.model_validate({"id": device, "transport": self.link.transport}),
                             self.bridge)
            self.bridge.add(link)
            self.adopted.append(device)
        link.start()  # (it subscribed when made): from here on its readings are stored
        log.info("adopted Wi-Fi Pico %r (firmware %s); add it to the config to keep it", device, hello.get("fw"))
