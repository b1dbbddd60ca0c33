"""``pico-gateway record --config FILE``: store every reading of the whole tree, owning no link.

A recorder subscribes to ``$share/<group>/<base>/+/sensor/+`` (MQTT v5 shared
subscription, QoS 1, persistent session): the broker hands each reading to one
recorder of the group, so several recorders share the load, and while one is
away the broker keeps its share in its session. Each reading is committed to the
recorder's own SQLite (the ``readings`` table of gateway/store.py, rows marked
sent) **before** it is acknowledged (paho's manual ack): a recorder killed
between the two gets the reading again, never loses it. Delivery is therefore at
least once; see docs/scaling.md.

- Retained messages are ignored (and acknowledged): readings are never retained,
  and mosquitto 2.0.11 replays retained messages to shared subscribers.
- A reading's time is its ``ts`` user property (Unix ms, set by the gateway on
  late readings, docs/reliability.md) when present and plausible, else the time
  it arrived.
- Topic parts and payloads are checked against the tree's rules and bounded (a
  metric name by the gateway's one rule, gateway/topics.py ``is_metric``);
  anything else is counted and dropped (and acknowledged).

It reuses the gateway's config file: ``[mqtt]`` (with auth and TLS), ``[store]``
and a ``[recorder]`` table (``group``, ``id``, ``path``, ``session_expiry_hours``);
``devices`` are ignored.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, SecretError, load_config_or_report
from gateway.domain import is_device_id, now_ms, parse_value
from gateway.retention import Retention
from gateway.store import Row, Store
from gateway.systemd import setup_logging, stop_on_signals
from gateway.topics import Topics, is_metric

log = logging.getLogger("gateway.recorder")

RECEIVE_MAXIMUM = 1000  # unacknowledged QoS 1 messages the broker may send us at once (bounds memory)
MAX_BATCH = 1000  # readings per transaction
RETRY_STORE = 2.0  # seconds between commit attempts while the database refuses
_TS_MIN, _TS_MAX = 946_684_800_000, 32_503_680_000_000  # 2000-01-01 .. 3000-01-01, in ms
_STOP = object()


def parse_reading(topics: Topics, topic: str, payload: bytes, properties: Any, received_ms: int) -> Row | None:
    """(device, metric, value, ts, None) for a well-formed reading, else None; ``ts`` is
    the message's ``ts`` user property when it has a plausible one, else ``received_ms``."""
    parsed = topics.parse_sensor(topic)
    if parsed is None:
        return None
    device, metric = parsed
    if not is_device_id(device) or not is_metric(metric):
        return None
    value = parse_value(payload)
    if value is None:
        return None
    ts = received_ms
    for key, text in getattr(properties, "UserProperty", None) or []:
        if key == "ts":
            try:
                candidate = int(text)
            except ValueError:
                break
            if _TS_MIN <= candidate <= _TS_MAX:
                ts = candidate
            break
    return (device, metric, value, ts, None)


class Recorder:
    def __init__(self, config: GatewayConfig) -> None:
        from gateway.mqtt import MqttConnection  # paho: not needed by the CLI's parser

        rc = config.recorder
        self.id = rc.id or config.gateway_id
        self.topics = Topics(config.mqtt.base_topic)
        self.path = rc.path or config.store.path
        self.stats: Counter[str] = Counter()
        self.store = Store(self.path, config.store.synchronous)
        # Its database is kept as the gateway's is: roll-ups, keep_raw_days, max_size_mb.
        self.retention = Retention(config.store.model_copy(update={"path": Path(self.path)}), self.stats)
        self.status_topic = self.topics.recorder_status(self.id)
        self.mqtt = MqttConnection(
            config.mqtt, f"pico-recorder-{self.id}", will=(self.status_topic, "offline"),
            clean_start=False, session_expiry=int(rc.session_expiry_hours * 3600),
            receive_maximum=RECEIVE_MAXIMUM, manual_ack=True)
        self.filter = f"$share/{rc.group}/{self.topics.all_sensors()}"
        self.mqtt.subscribe_messages(self.filter, self._on_message, qos=1)
        self.mqtt.on_connect(self._say_online)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.mqtt.start()
        self.retention.start()

    def stop(self) -> None:
        """Store and acknowledge what arrived, then say offline and disconnect."""
        self.retention.stop()
        self._queue.put(_STOP)
        self._thread.join(15)
        self.mqtt.stop([(self.status_topic, "offline")])
        self.store.close()

    # -- paho's thread: never blocks, never raises -------------------------------------
    def _on_message(self, msg: Any) -> None:
        reading = None
        if msg.retain:
            self.stats["retained_ignored"] += 1
        else:
            reading = parse_reading(self.topics, msg.topic, msg.payload, msg.properties, now_ms())
            if reading is None:
                self.stats["malformed"] += 1
        self._queue.put((msg.mid, msg.qos, reading))

    # -- the writer thread ------------------------------------------------------------
    def _say_online(self) -> None:
        self.mqtt.publish(self.status_topic, "online", qos=1, retain=True)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items: list[object] = []
            try:
                items.append(self._queue.get(timeout=0.5))
                while len(items) < MAX_BATCH:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            stopping = any(item is _STOP for item in items)
            batch = [item for item in items if isinstance(item, tuple)]
            if batch:
                self._commit_then_ack(batch, stopping)

    def _commit_then_ack(self, batch: list[tuple[int, int, Row | None]], stopping: bool) -> None:
        rows = [reading for _, _, reading in batch if reading is not None]
        while rows:
            try:
                self.store.record(rows)
                break
            except sqlite3.Error as exc:
                # Not acknowledged: the broker keeps them (and sends no more than RECEIVE_MAXIMUM).
                self.stats["store_errors"] += 1
                log.error("cannot write to %s: %s; %d reading(s) wait unacknowledged, retrying", self.path, exc,
                          len(rows))
                if stopping:
                    return  # unacknowledged: the broker sends them again next time
                time.sleep(RETRY_STORE)
        self.stats["stored"] += len(rows)
        for mid, qos, _ in batch:
            if qos > 0:
                try:
                    self.mqtt.ack(mid, qos)
                except Exception:  # disconnected: the broker sends it again, we store it twice
                    self.stats["ack_failed"] += 1


def run(config: GatewayConfig, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    try:
        recorder = Recorder(config)
    except SecretError as exc:
        log.error("%s", exc)
        return 2
    except (sqlite3.Error, OSError) as exc:
        log.error("cannot open the database: %s (check recorder.path / store.path)", exc)
        return 1
    stop_on_signals(stop)
    recorder.start()
    log.info("recorder %s: %s -> %s", recorder.id, recorder.filter, recorder.path)
    stop.wait()
    log.info("stopping; %s", dict(recorder.stats))
    recorder.stop()
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None:
        return 2
    setup_logging(args.verbose)
    return run(config)


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("record", help="store every reading of the whole tree (shared subscription), owning no link")
    p.add_argument("--config", required=True, help="a gateway config file: its mqtt, store and [recorder] tables")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_record)
