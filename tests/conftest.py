from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_helpers import Broker, Recorder, wait_for

from gateway.processes import stop_process

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def recorder(broker: Broker) -> Iterator[Recorder]:
    r = Recorder(broker)
    yield r
    r.close()


def write_config(path: Path, broker: Broker, devices: list[dict], gateway_id: str = "testgw", db: Path | None = None,
                 **top_level: object) -> Path:
    """A gateway config; ``top_level`` adds scalar keys such as ``diagnostics_interval=1``."""
    extra = [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in top_level.items()]
    lines = [f'gateway_id = "{gateway_id}"', *extra, "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}",
             "[store]", f'path = "{db or path.parent / "readings.db"}"']
    for dev in devices:
        lines.append("[[devices]]")
        for key, value in dev.items():
            lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class GatewayProcess:
    """``python -m gateway run --config FILE`` as a child process."""

    def __init__(self, config: Path, recorder: Recorder, gateway_id: str = "testgw") -> None:
        self.log_path = config.parent / "gateway.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)],
                                     stdout=self.log, stderr=self.log, cwd=REPO)
        try:
            wait_for(lambda: self._alive() and recorder.last(f"pico/bridge/{gateway_id}/status") == "online",
                     15, "the gateway's bridge status online")
        except BaseException:  # (not left running: it would open the pseudo-terminals later tests get)
            self.stop()
            raise

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return True

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        code = stop_process(self.proc)
        self.log.close()
        return code


@pytest.fixture
def start_gateway(tmp_path: Path, broker: Broker, recorder: Recorder):
    started: list[GatewayProcess] = []

    def start(devices: list[dict], gateway_id: str = "testgw", wait_online: bool = True) -> GatewayProcess:
        """Start the gateway; unless told otherwise, wait until every device is online, so
        that a test's first bytes never reach a serial port before it is opened."""
        config = write_config(tmp_path / f"{gateway_id}.toml", broker, devices, gateway_id)
        gw = GatewayProcess(config, recorder, gateway_id)
        started.append(gw)
        if wait_online:
            for dev in devices:
                recorder.wait(f"pico/{dev['id']}/status", "online", timeout=15)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def virtual(tmp_path: Path, broker: Broker, recorder: Recorder):
    """Start virtual Picos (real firmware) and a gateway bridging them.

    ``virtual(devices)`` takes gateway device entries (plus simulator-only keys
    ``read_interval`` and ``sim``) and returns ``(fleet, gateway)``.
    """
    from gateway.simulator.cli import dump_toml, simulated_config
    from gateway.simulator.fleet import start_fleet

    fleets = []
    gateways: list[GatewayProcess] = []
    sim_only = ("read_interval", "sim", "firmware", "runtime", "config")

    def start(devices: list[dict], gateway_id: str = "testgw", **top: object):
        """``top``: extra top-level config keys, e.g. ``diagnostics_interval=1``."""
        fleet = start_fleet(devices, tmp_path / f"picos-{len(fleets)}", broker=(broker.host, broker.port))
        fleets.append(fleet)
        config = simulated_config({"gateway_id": gateway_id, "mqtt": {"host": broker.host, "port": broker.port},
                                   "store": {"path": str(tmp_path / "readings.db")}, **top,
                                   "devices": [{k: v for k, v in d.items() if k not in sim_only} for d in devices]},
                                  fleet)
        path = tmp_path / f"{gateway_id}.toml"
        path.write_text(dump_toml(config))
        gw = GatewayProcess(path, recorder, gateway_id)
        gateways.append(gw)
        return fleet, gw

    yield start
    for gw in gateways:
        gw.stop()
    for fleet in fleets:
        fleet.stop()
