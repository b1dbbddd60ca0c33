"""Adopting Wi-Fi Picos the config does not name (``adopt_wifi_picos = true``; off by default).

Our firmware on a Pico W publishes a retained hello, ``<base>/<device>/hello``
(JSON with ``proto``, ``fw``, ``metrics``), when it connects. With adoption on,
the gateway treats any such Pico it does not know as a ``wifi`` device: it
stores its readings and follows its status, exactly as if the config listed it.

Only a hello adopts: a status topic alone may belong to another gateway's wired
Pico. Ids must be valid device ids; at most MAX_ADOPTED devices are adopted, so
a flood of made-up hellos cannot grow the gateway without end.
"""

from __future__ import annotations

import logging
import threading

from gateway import payloads
from gateway.bridge import Bridge
from gateway.domain import is_device_id
from gateway.links.wifi import WifiConfig, WifiLink

log = logging.getLogger("gateway.adoption")

MAX_ADOPTED = 64


class Adoption:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.adopted: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.bridge.subscribe(self.bridge.topics.all_hellos(), self._on_hello)

    def _on_hello(self, topic: str, payload: bytes, retained: bool) -> None:
        device = topic.split("/")[-2]
        if device in self.bridge.links or not is_device_id(device):
            return
        hello = payloads.decode_hello(payload, 1024)
        if not payloads.is_our_hello(hello):
            self.bridge.stats["adoption_refused"] += 1
            return
        with self._lock:
            if device in self.bridge.links:
                return
            if len(self.adopted) >= MAX_ADOPTED:
                self.bridge.stats["adoption_refused"] += 1
                log.warning("not adopting %r: already %d adopted Wi-Fi Picos", device, MAX_ADOPTED)
                return
            link = WifiLink(WifiConfig(id=device, transport="wifi"), self.bridge)
            self.bridge.add(link)
            self.adopted.append(device)
        link.start()  # (it subscribed when made): from here on its readings are stored
        log.info("adopted Wi-Fi Pico %r (firmware %s); add it to the config to keep it", device, hello.get("fw"))
