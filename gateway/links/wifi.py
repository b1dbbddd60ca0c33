"""A Pico W that publishes to the broker itself (umqtt): see docs/links.md.

Nothing to open: the Pico publishes its readings, ``state/led`` and ``status``
(its own last will) and subscribes to ``cmd/led`` itself. The gateway listens to
that device's tree, stores its readings in SQLite like any other Pico's, and
tracks its availability; it re-publishes nothing and never re-sends commands.

Our firmware whose hello says ``ack`` keeps every reading until the gateway stored
it (docs/protocol.md, Wi-Fi): it publishes each on ``<base>/<device>/reading`` with
its boot and sequence number, and sends again what was not acknowledged after a
reconnect or when asked. The gateway takes those readings strictly in sequence order
(one out of order is dropped, and the Pico asked to send again), stores them with
the Pico's time when they come late, says after each commit what it stored
(``stored``, :meth:`WifiLink.stored`) and tells the Pico the time (``time``). The
plain ``sensor/<metric>`` topics of such a Pico are then for other readers only.
Older firmware and the tutorial's programs, without ``ack``, work as before.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

from gateway import payloads
from gateway.domain import CommandError, LedCommand, now_ms, parse_value
from gateway.links.base import DeviceConfig, Link, LinkEvents
from gateway.links.simulation import Description, Simulation
from gateway.log_once import Once

if TYPE_CHECKING:
    from gateway.store import Row

MAX_HELLO_BYTES = 1024
MAX_READING_BYTES = 4096  # a reading's JSON: a few dozen metrics at most
SEQ_MOD = 1 << 32
LIVE_MS = 250  # a reading sent within this of being taken is live: stored at the gateway's time
TS_MIN = 946_684_800_000  # 2000-01-01 in Unix ms: a reading's ts before it is not a time
TS_AHEAD = 60_000  # ms: nor one further ahead of the gateway's clock than this
RESEND_EVERY = 1.0  # seconds between requests to send again, at most


class WifiConfig(DeviceConfig):
    transport: Literal["wifi"]


class WifiSimulation(Simulation):
    """The virtual Pico W joins a simulated network and the test broker: it is ready once
    connected, and reached through the broker (the gateway's config needs no change)."""

    ready_key = "mqtt"
    ready_value = "connected"
    demo_devices = ({"id": "balcony", "transport": "wifi"},)

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"WIFI": {"broker": broker[0], "port": int(broker[1]), "base": desc.get("base", "pico"),
                         "user": desc.get("mqtt_user"), "mqtt_password": desc.get("mqtt_password"),
                         "client_id": desc.get("client_id")}}, {}

    def endpoint(self, state: Any, broker: tuple[str, int]) -> Any:
        return tuple(broker)


WIFI_NETWORK = {"ssid": "", "password": "", "broker": "127.0.0.1", "port": 1883,
                "base": "pico", "user": None, "mqtt_password": None, "client_id": None}
"""config.py's WIFI section, with the firmware's defaults (the network, and for the wifi
link the broker it publishes to)."""


class WifiLink(Link):
    transport = "wifi"
    board = "Raspberry Pi Pico W"
    needs_wifi = True
    Config = WifiConfig
    publishes_itself = True
    firmware = "wifi"
    firmware_config = {"WIFI": WIFI_NETWORK}
    simulation = WifiSimulation()

    def __init__(self, config: WifiConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._running = True
        # Acknowledged readings: whether the Pico keeps them (None: not yet known), the boot
        # they are of, and the sequence number taken next (None: the oldest the Pico keeps).
        self.acks: bool | None = None
        self.boot: int | None = None
        self._expected: int | None = None
        self._acked: int | None = None  # the last seq said stored, of self.boot
        self._ack_lock = threading.Lock()
        self._last_resend = -RESEND_EVERY
        self._logged = Once()
        # Subscribed now, before the broker connection exists: the subscriptions then go
        # out in the first on_connect, ahead of the gateway's "online", so a subscriber
        # that sees the gateway online knows its Pico W is being listened to. The hello
        # first: its retained copy arrives before any live reading, and says whether the
        # plain sensor topics are this Pico's readings or only copies for other readers.
        topics = events.topics
        events.subscribe(topics.hello(self.device), self._on_hello)
        events.subscribe(topics.reading(self.device), self._on_reading)
        events.subscribe(topics.sensor(self.device, "+"), self._on_sensor)
        events.subscribe(topics.state(self.device), self._on_state)
        events.subscribe(topics.status(self.device), self._on_status)

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False

    def set_led(self, command: LedCommand) -> bool:
        raise CommandError("a wifi Pico takes its commands from the broker itself")

    def _on_sensor(self, topic: str, payload: bytes, retained: bool) -> None:
        if not self._running or retained:
            return  # a retained reading is old news (and never ours to store twice)
        if self.acks:
            return  # a copy of what its reading topic brings (kept until stored): for other readers
        metric = topic.rsplit("/", 1)[-1]  # any topic level: the bridge checks it, as for every link
        value = parse_value(payload)
        if value is None:
            self.stats["bad_values"] += 1
            return
        self.stats["frames"] += 1
        self.events.reading(self.device, [(metric, value)], now_ms(), None)

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._running and payload in (b"on", b"off"):
            self.events.led_state(self.device, payload == b"on")

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._running and payload in (b"online", b"offline"):
            self.set_online(payload == b"online", "its own status topic")

    def _on_hello(self, topic: str, payload: bytes, retained: bool) -> None:
        """Its retained hello (docs/topics.md): the firmware version it names, and whether
        it keeps its readings until stored."""
        hello = payloads.decode_hello(payload, MAX_HELLO_BYTES)
        firmware = payloads.hello_firmware(hello)
        if hello is None or firmware is None:
            if payload:  # (empty: the hello was cleared)
                self.stats["bad_hello"] += 1
                if self.stats["bad_hello"] == 1:
                    self.log.warning("its hello is not our firmware's JSON with a \"fw\" version: %r (counted "
                                     "as bad_hello, logged once)", payload[:80])
            return
        self.events.firmware(self.device, firmware)
        ring, boot = hello.get("ack"), hello.get("boot")
        if not (type(ring) is int and ring > 0 and type(boot) is int and 0 <= boot < SEQ_MOD):
            self.acks = False
            return
        if self.acks is not True:
            self.log.info("the Pico keeps up to %d readings until they are stored, and sends them again", ring)
        self.acks = True
        self._new_boot(boot)
        lost = hello.get("lost")
        if type(lost) is int:
            self.stats["ring_lost"] = lost
        reset = hello.get("reset")
        if isinstance(reset, str):
            self.diagnostic_fields = {"reset": reset[:16]}
        # A retained hello: the gateway has just (re)subscribed, and what the Pico sent
        # meanwhile went nowhere: ask for it again. A live one: the Pico has just connected
        # and sends everything it keeps on its own; it only needs the time.
        self._send_time(resend=retained)

    def _new_boot(self, boot: int) -> None:
        if boot == self.boot:
            return
        if self.boot is not None:
            self.stats["seq_resets"] += 1  # it restarted: what it kept went with the old boot
        with self._ack_lock:
            self.boot, self._expected, self._acked = boot, None, None

    def _send_time(self, resend: bool) -> None:
        if resend:
            self._last_resend = time.monotonic()
            self.stats["resend_requests"] += 1
        self.events.publish(self.events.topics.time(self.device), payloads.encode(payloads.wifi_time(now_ms(), resend)))

    def _on_reading(self, topic: str, payload: bytes, retained: bool) -> None:
        """One kept reading (docs/protocol.md, Wi-Fi), taken strictly in sequence order."""
        if not self._running or retained:
            return
        reading = payloads.decode_wifi_reading(payload, MAX_READING_BYTES)
        if reading is None:
            self.stats["bad_readings"] += 1
            if self._logged.first("bad_reading"):
                self.log.warning("a message on its reading topic is not a reading: %r (counted as bad_readings, "
                                 "logged once)", payload[:80])
            return
        self.acks = True
        self._new_boot(reading["boot"])
        lost = reading.get("lost")
        if type(lost) is int:
            self.stats["ring_lost"] = lost
        seq, oldest = reading["seq"], reading["oldest"]
        expected = oldest if self._expected is None else self._expected
        ahead = (oldest - expected) % SEQ_MOD
        if 0 < ahead < SEQ_MOD // 2:
            # The Pico no longer keeps the readings before its oldest: its full buffer
            # dropped them (counted there as lost, and here).
            self.stats["ring_skipped"] += ahead
            expected = oldest
        if seq == expected:
            self._expected = (seq + 1) % SEQ_MOD
        elif (expected - seq) % SEQ_MOD < SEQ_MOD // 2:
            pass  # sent again, taken already: the store refuses it, and it is acknowledged again
        else:
            # Readings between the expected one and this never came (the gateway was away,
            # or the broker lost them): drop it; the Pico sends them all again, in order.
            self._expected = expected
            self.stats["readings_out_of_order"] += 1
            if time.monotonic() - self._last_resend >= RESEND_EVERY:
                self._send_time(resend=True)
            return
        self._store(reading, seq)

    def _store(self, reading: dict[str, Any], seq: int) -> None:
        rx = now_ms()
        ts, ts_pico = rx, 0
        age = reading.get("age")
        if type(age) is int and age >= LIVE_MS:  # sent late: stored at the time it was taken
            pico_ts = reading.get("ts")
            ts_pico = 1
            if type(pico_ts) is int and TS_MIN <= pico_ts <= rx + TS_AHEAD:
                ts = pico_ts
            else:
                ts = rx - age  # (the Pico was not told the time: its own clock's age of the reading)
        boot, device = reading["boot"], self.device
        rows: list[Row] = []
        for metric, value in reading["values"].items():
            if type(value) not in (int, float) or not math.isfinite(value):
                self.stats["bad_values"] += 1
                continue
            rows.append((device, str(metric), float(value), ts, seq, boot, ts_pico))
        self.stats["frames"] += 1
        if rows:
            self.events.readings(device, rows)

    def stored(self, rows: list[Row]) -> None:
        """The store committed these rows of this device (or had them already): tell the
        Pico the newest of its boot, so it forgets every reading up to it."""
        with self._ack_lock:
            boot, newest, found = self.boot, self._acked, False
            for row in rows:
                if len(row) > 5 and row[5] == boot and row[4] is not None:
                    seq, found = row[4], True
                    if newest is None or 0 < (seq - newest) % SEQ_MOD < SEQ_MOD // 2:
                        newest = seq
            if not found or boot is None or newest is None:
                return  # (said again when only refused: the Pico that sent them again missed the last)
            self._acked = newest
        self.events.publish(self.events.topics.stored(self.device),
                            payloads.encode(payloads.wifi_stored(boot, newest, now_ms())), qos=1)
