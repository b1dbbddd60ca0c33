"""``pico-gateway run``: wire config, store, MQTT, bridge and links together, until a signal."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from gateway.adoption import Adoption
from gateway.bridge import Bridge
from gateway.config import GatewayConfig, SecretError
from gateway.diagnostics import Diagnostics
from gateway.discovery import Discovery
from gateway.disk_budget import DiskBudgetMeter
from gateway.features import Lifecycle, Part, Step
from gateway.kept_counters import KeptCounters
from gateway.mqtt import MqttConnection
from gateway.outbox import OutboxSettings
from gateway.ownership import Ownership
from gateway.reload import Reloader
from gateway.retention import Retention
from gateway.store import Store
from gateway.systemd import Notifier, Watchdog, gateway_health, stop_on_signals
from gateway.topics import Topics

log = logging.getLogger("gateway")

SWITCH_INTERVAL = 0.001  # seconds; CPython's default of 5 ms made a command wait up to 5 ms at each of
# its four thread hand-offs (MQTT -> worker -> link reader -> worker -> MQTT) while links were busy
BROKER_WAIT = 10.0  # seconds to wait for the first connection before saying READY anyway
STOP_BUDGET = 4.0  # seconds from SIGTERM to the end of run(), whatever hangs: docs/reliability.md promises
# 5 s, the process's own exit included. Split: the links (bridge.LINKS_STOP, all at once), the outbox's flush
# (outbox.STOP_TIMEOUT), the final counters (diagnostics.FINAL_STORE_WAIT for the store), the final messages
# (what is left, all at once), the database writer's exit (store._CLOSE_LOCK when a commit hangs); a part
# whose stop does not return in time is left behind (gateway/features.py).
FINAL_MESSAGES_MIN = 0.5  # seconds the final messages get even when what came before took longer


@dataclass
class Gateway:
    """A gateway's parts, made and wired, not started: :attr:`lifecycle` starts ``parts``."""

    mqtt: MqttConnection
    bridge: Bridge
    notifier: Notifier
    lifecycle: Lifecycle
    parts: list[Part]


def assemble(config: GatewayConfig, store: Store, notifier: Notifier | None = None,
             config_path: str | Path | None = None) -> Gateway:
    """Make every part of the gateway ``config`` describes, on ``store``; SecretError when
    the MQTT password or a TLS file cannot be used. ``config_path``: the file SIGHUP reads
    again (gateway/reload.py); None: no reloads."""
    topics = Topics(config.mqtt.base_topic)
    client_id = config.mqtt.client_id or f"pico-gateway-{config.gateway_id}"
    # At readings_qos = 0, refusals are not reported: reporting them costs every QoS 0 message.
    mqtt = MqttConnection(config.mqtt, client_id, will=(topics.bridge_status(config.gateway_id), "offline"),
                          report_refusals=config.mqtt.readings_qos > 0)
    s = config.store
    outbox = OutboxSettings(qos=config.mqtt.readings_qos, max_backlog_rows=s.max_backlog_rows,
                            max_backlog_age_s=s.max_backlog_hours * 3600, memory_rows=s.memory_rows,
                            commit_interval=s.commit_interval)
    bridge = Bridge(config.gateway_id, topics, store, mqtt, outbox)
    for device in config.devices:
        bridge.add_device(device)
    kept = KeptCounters(store)
    kept.restore(bridge.links)  # before the links start: seq_gaps goes on from the last run's
    discovery = Discovery(config.homeassistant, config.gateway_id, config.mqtt.base_topic, config.devices,
                          publish=mqtt.publish, subscribe=mqtt.subscribe, on_connect=mqtt.on_connect)
    bridge.on_metric = discovery.metric_seen
    bridge.on_firmware = discovery.firmware_seen
    notifier = notifier or Notifier()  # does nothing when not under systemd
    watchdog = Watchdog(notifier, gateway_health(mqtt, bridge))
    watchdog_on = bool(notifier.enabled and watchdog.interval)  # (it logs each change of health itself)
    lifecycle = Lifecycle(STOP_BUDGET)  # one budget for the whole stop, not a sum of per-part timeouts

    def final_messages() -> None:
        mqtt.stop(bridge.last_words(), timeout=lifecycle.time_left(FINAL_MESSAGES_MIN))

    # Started in this order, stopped in the reverse one: the connection's final messages
    # (every device's retained "offline", then the gateway's) go out once everything else
    # has stopped, the diagnostics' final counters once the links have stopped and the
    # outbox has flushed, and the watchdog stops first, or stopping would look unhealthy.
    # The watch on claims subscribes before the bridge announces ours, which would replace
    # another gateway's retained claim before we heard it; discovery's configs follow the
    # bridge's statuses.
    diagnostics = Diagnostics(bridge, config.diagnostics_interval, log_health=not watchdog_on, kept=kept,
                              disk=DiskBudgetMeter(store, s.max_size_mb))
    parts: list[Part] = [
        Step("mqtt", mqtt.start, final_messages, stop_floor=FINAL_MESSAGES_MIN),
        diagnostics,
        Ownership(bridge),
        bridge,  # links first: readings are stored while the broker is still away
        Retention(config.store, bridge.stats),  # roll-ups and deletions, in a child process
        discovery,
        *([Adoption(bridge)] if config.adopt_wifi_picos else []),
        *([Reloader(config_path, config, bridge, discovery, diagnostics, kept, notifier)] if config_path else []),
        Step("watchdog", watchdog.start, watchdog.stop),
    ]
    return Gateway(mqtt, bridge, notifier, lifecycle, parts)


def run(config: GatewayConfig, stop: threading.Event | None = None, config_path: str | Path | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set); 0 on a clean stop. SIGHUP reads
    ``config_path`` again (gateway/reload.py)."""
    stop = stop or threading.Event()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        store = Store(config.store.path, config.store.synchronous)
    except (sqlite3.Error, OSError) as exc:
        log.error("cannot open the database %s: %s (check store.path and its directory's permissions)",
                  config.store.path, exc)
        return 1
    try:
        gateway = assemble(config, store, config_path=config_path)
    except SecretError as exc:
        log.error("%s", exc)
        store.close()
        return 2
    mqtt = gateway.mqtt
    stop_on_signals(stop)
    gateway.lifecycle.start(gateway.parts)
    deadline = time.monotonic() + BROKER_WAIT
    while not mqtt.wait_connected(0.1) and not stop.is_set() and time.monotonic() < deadline:
        pass  # a SIGTERM while the broker refuses us (auth, TLS) must not wait for the deadline
    if not mqtt.connected.is_set() and not stop.is_set() and not mqtt.refused():  # (a refusal said what to check)
        log.warning("broker %s:%s not reachable yet; readings are stored meanwhile, and it keeps trying",
                    config.mqtt.host, config.mqtt.port)
    log.info("gateway %s running: %d device(s), database %s", config.gateway_id, len(config.devices),
             config.store.path)
    gateway.notifier.ready(f"running: {len(config.devices)} device(s)")
    stop.wait()
    gateway.notifier.stopping()
    log.info("stopping")
    gateway.lifecycle.stop()
    store.close()
    log.info("stopped")
    return 0


def exit_process(code: int) -> NoReturn:
    """End the gateway's process with ``code``, once :func:`run` has returned.

    Python's own exit waits, without a timeout, for every command worker
    (concurrent.futures joins them): one still inside a link's call to a Pico that
    does not answer would hold the process until that call gives up, past the stop
    budget, or for ever. By now everything is stored and the final messages are
    out (or their budget is spent), so the process ends here, after flushing the
    log; any thread left is abandoned with it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
