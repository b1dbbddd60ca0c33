"""``pico-gateway demo``: a private broker, a virtual Pico on every link, and the gateway.

Everything runs from a temporary directory and stops on Ctrl-C or after
``--duration`` seconds, leaving nothing running. Readings are shown as a live
table built from what a subscriber receives.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mosquitto import PrivateBroker
from gateway.processes import stop_process
from gateway.simulator.cli import dump_toml, simulated_config
from gateway.simulator.fleet import Cancelled, start_fleet
from gateway.systemd import stop_on_signals

DEVICES = [
    {"id": "greenhouse", "transport": "uart", "protocol": "picogw", "port": "sim", "heartbeat": 2.0},
    {"id": "porch", "transport": "uart", "protocol": "tutorial", "port": "sim"},
    # The tutorial's i2c_main.py answers at 0x43, as written: our firmware takes the other address.
    {"id": "cellar", "transport": "i2c", "protocol": "picogw", "address": 0x44, "poll_interval": 1.0},
    {"id": "attic", "transport": "i2c", "protocol": "tutorial", "poll_interval": 1.0},
    {"id": "desk", "transport": "usb", "protocol": "picogw", "port": "sim"},
    {"id": "bench", "transport": "usb", "protocol": "tutorial", "port": "sim", "poll_interval": 2.0},
    {"id": "balcony", "transport": "wifi"},
    {"id": "shed", "transport": "tcp", "protocol": "tutorial", "host": "sim", "poll_interval": 1.0},
]
READ_INTERVAL = 1.0


class Board:
    """What a subscriber to ``pico/#`` has seen, per device."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, object]] = {d["id"]: {"metrics": {}} for d in DEVICES}

    def on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 3 or parts[0] != self.base or parts[1] not in self.rows:
            return
        row = self.rows[parts[1]]
        text = msg.payload.decode(errors="replace")
        with self.lock:
            if parts[2] == "sensor" and len(parts) == 4:
                row["metrics"][parts[3]] = text  # type: ignore[index]
                row["seen"] = time.monotonic()
            elif parts[2:] == ["state", "led"]:
                row["led"] = text
            elif parts[2:] == ["status"]:
                row["status"] = text

    def render(self) -> str:
        now = time.monotonic()
        lines = [f"{'device':<11} {'link':<5} {'protocol':<9} {'status':<8} {'led':<4} {'age':>5}  readings",
                 "-" * 78]
        with self.lock:
            for d in DEVICES:
                row = self.rows[d["id"]]
                seen = row.get("seen")
                age = f"{now - seen:4.1f}s" if isinstance(seen, float) else "-"
                metrics = "  ".join(f"{k}={v}" for k, v in sorted(row["metrics"].items()))  # type: ignore[union-attr]
                lines.append(f"{d['id']:<11} {d['transport']:<5} {d.get('protocol', 'picogw'):<9} "
                             f"{row.get('status', '-'):<8} {row.get('led', '-'):<4} {age:>5}  {metrics[:60]}")
        return "\n".join(lines)


def run_demo(duration: float | None = None, workdir: str | None = None) -> int:
    """Run the demo until Ctrl-C (or SIGTERM) or ``duration``; 0 when stopped so, also while
    it was still starting, 1 when a part of it failed."""
    stop = threading.Event()
    stop_on_signals(stop)  # (Ctrl-C reaches the broker and the gateway too: a terminal signals the group)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="pico-demo-"))
    cleanup = workdir is None
    broker = PrivateBroker(tmp / "broker")
    broker_started = picos_starting = False
    fleet = gateway = client = None
    try:
        try:
            broker.start()
            broker_started = True
            print(f"demo: mosquitto on {broker.host}:{broker.port}, files in {tmp}", flush=True)
            sim_devices = [{**d, "read_interval": READ_INTERVAL} for d in DEVICES]
            picos_starting = True  # (cancelled, start_fleet stops the ones it started itself)
            fleet = start_fleet(sim_devices, tmp / "picos", broker=(broker.host, broker.port), timeout=20,
                                cancel=stop)
            if stop.is_set():
                raise Cancelled("stopped before the gateway started")
            config = simulated_config({"gateway_id": "demo", "mqtt": {"host": broker.host, "port": broker.port},
                                       "store": {"path": str(tmp / "readings.db")}, "devices": DEVICES}, fleet)
            config_path = tmp / "gateway.toml"
            config_path.write_text(dump_toml(config))
            with open(tmp / "gateway.log", "ab") as log:
                gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
                                           stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            board = Board("pico")
            client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            client.on_message = board.on_message
            client.on_connect = lambda c, *_: c.subscribe("pico/#")
            client.connect(broker.host, broker.port)
            client.loop_start()
        except Exception:
            if not stop.is_set():
                raise
            # Interrupted while starting: what failed is a consequence (the broker, signalled
            # too, went away; a wait was cancelled), not news.
            print("demo: interrupted while starting", flush=True)
            return 0
        hint = (f"Try, in another terminal:\n"
                f"  mosquitto_sub -h {broker.host} -p {broker.port} -v -t 'pico/#'\n"
                f"  mosquitto_pub -h {broker.host} -p {broker.port} -t pico/greenhouse/cmd/led -m toggle\n"
                f"  mosquitto_pub -h {broker.host} -p {broker.port} -t pico/shed/cmd/led -m on\n"
                f"  sqlite3 {tmp / 'readings.db'} 'SELECT * FROM readings ORDER BY id DESC LIMIT 5'\n"
                f"Ctrl-C stops everything" + (f" (or after {duration:g} s)." if duration else "."))
        print(hint, flush=True)
        live = sys.stdout.isatty()
        deadline = time.monotonic() + duration if duration else None
        last_print = 0.0
        while not stop.wait(1.0):
            if gateway.poll() is not None:
                print(f"demo: the gateway exited ({gateway.returncode}); see {tmp / 'gateway.log'}", file=sys.stderr)
                return 1
            now = time.monotonic()
            if live:
                print("\x1b[H\x1b[2J" + hint + "\n\n" + board.render(), flush=True)
            elif now - last_print >= 5:
                print(board.render() + "\n", flush=True)
                last_print = now
            if deadline and now >= deadline:
                break
        print(board.render(), flush=True)
        return 0
    finally:
        stopped = []
        if client is not None:
            client.loop_stop()
            client.disconnect()
        if gateway is not None:
            stop_process(gateway)
            stopped.append("the gateway")
        if fleet is not None:
            fleet.stop()
            stopped.append(f"{len(fleet.picos)} virtual Picos")
        elif picos_starting:
            stopped.append("the virtual Picos started so far")
        broker.stop()  # (also when its start failed: it may have a process to end)
        if broker_started:
            stopped.append("the broker")
        if cleanup:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"demo: stopped {', '.join(stopped) or 'what had started'}; nothing left running.", flush=True)
