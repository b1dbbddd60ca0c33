"""Start-up: from spawning ``python -m gateway run`` to READY, and memory at idle.

READY = the retained ``pico/bridge/<id>/status = online`` and every configured
device's ``pico/<device>/status = online`` have reached a subscriber that was
listening before the process started. Each virtual Pico answers the gateway's
``hello`` command at once, as the firmware does. RSS is read 5 s later, with no
readings flowing.
"""

from __future__ import annotations

import shutil
import time

from common import Env, GatewayProcess, Subscriber, wait_online, write_config
from picos import Picos

GATEWAY_ID = "bench"
IDLE = 5.0  # seconds after READY before reading RSS


def run(env: Env, devices: int) -> dict:
    work = env.tempdir(f"startup-{devices}")
    picos = Picos(devices)
    with env.broker(work) as broker:
        sub = Subscriber(broker.host, broker.port)
        config = write_config(work / "gateway.toml", GATEWAY_ID, (broker.host, broker.port),
                              work / "readings.db", picos.peers, env.qos)
        gw = GatewayProcess(env.source, config)
        try:
            ready_at = wait_online(sub, GATEWAY_ID, picos.devices, gw.started, 60, gw.check)
            bridge_at = sub.first(f"pico/bridge/{GATEWAY_ID}/status", b"online", gw.started)
            time.sleep(IDLE)
            gw.check()
            memory = gw.memory_mb()
            cpu = gw.cpu_seconds()
        finally:
            gw.stop()
            sub.close()
            picos.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "devices": devices,
        "ready_s": ready_at - gw.started,
        "bridge_online_s": (bridge_at or float("nan")) - gw.started,
        "idle_rss_mb": memory.get("VmRSS"),
        "peak_rss_mb": memory.get("VmHWM"),
        "cpu_s_to_idle": cpu,
    }
