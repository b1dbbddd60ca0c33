"""A new transport is one file: tests/tcpserial_link.py defines one (a Pico on a
serial-to-TCP bridge) and registers it with one line; a config names the file in its
``plugins``. With no other change, every part of the gateway reaches it: ``check-config``
validates its keys, ``simulate`` starts a virtual Pico for it, ``run`` bridges its
readings to SQLite and MQTT and its commands, discovery announces it with its board, and
``status`` shows it. A part that does not reach it fails the test, saying which."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, GatewayProcess
from mqtt_helpers import Broker, Recorder, wait_for

from gateway import cli
from gateway.links import LINKS

PLUGIN = Path(__file__).with_name("tcpserial_link.py")


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """A failure inside says which part of the gateway the new transport did not reach."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"the new transport does not reach {name}: {exc}") from exc


@pytest.fixture
def registry_restored() -> Iterator[None]:
    """The plugin registers its link in this process too (check-config and status run here):
    the registry and the loaded modules are as they were after the test."""
    links, modules = dict(LINKS), set(sys.modules)
    yield
    LINKS.clear()
    LINKS.update(links)
    for name in set(sys.modules) - modules:
        if name.startswith("pico_gateway_plugin_"):
            del sys.modules[name]


def _config(path: Path, broker: Broker, device: str) -> Path:
    path.write_text(f"""gateway_id = "testgw"
diagnostics_interval = 1
plugins = ["{os.path.relpath(PLUGIN, path.parent)}"]

[mqtt]
host = "{broker.host}"
port = {broker.port}

[store]
path = "{path.parent / "readings.db"}"

[[devices]]
{device}
""")
    return path


def test_a_transport_in_one_file_reaches_every_part(tmp_path: Path, broker: Broker, recorder: Recorder,
                                                     registry_restored: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert "tcpserial" not in LINKS  # (nothing but the config's plugins key brings it in)
    with part("check-config"):
        bad = _config(tmp_path / "bad.toml", broker, 'id = "bench"\ntransport = "tcpserial"\nhots = "127.0.0.1"\n'
                                                     "port = 0")
        assert cli.main(["check-config", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "devices[0] (id 'bench').hots: unknown key for a tcpserial device; did you mean 'host'?" in err, err
        assert "devices[0] (id 'bench').port: Input should be greater than 0" in err, err
        config = _config(tmp_path / "gateway.toml", broker,
                         'id = "bench"\ntransport = "tcpserial"\nhost = "127.0.0.1"\nport = 1\nheartbeat = 1.0')
        assert cli.main(["check-config", "--config", str(config)]) == 0
        assert "bench (tcpserial, picogw)" in capsys.readouterr().out

    workdir = tmp_path / "sim"
    simulate = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--config", str(config),
                                 "--workdir", str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    gateway = None
    try:
        sim_config = workdir / "gateway.sim.toml"
        with part("simulate"):
            wait_for(lambda: sim_config.exists() or simulate.poll() is not None, 30, "simulate's gateway.sim.toml")
            assert simulate.poll() is None, simulate.communicate()[0]
            bench = json.loads((workdir / "fleet.json").read_text())["devices"]["bench"]
            assert bench["transport"] == "tcpserial" and bench["endpoint"][0] == "127.0.0.1", bench

        with part("run"):
            gateway = GatewayProcess(sim_config, recorder)
            recorder.wait("pico/bench/status", "online", timeout=15)
            recorder.wait("pico/bench/sensor/temp", timeout=15)
            db = sqlite3.connect(tmp_path / "readings.db")
            try:
                wait_for(lambda: db.execute("SELECT count(*) FROM readings WHERE device = 'bench' AND metric = 'temp'")
                         .fetchone()[0] > 0, 10, "a stored reading of bench")
            finally:
                db.close()
            recorder.client.publish("pico/bench/cmd/led", "on", qos=1)
            result = json.loads(recorder.wait("pico/bench/result/led", timeout=10)[0])
            assert result == {"ok": True, "command": "on", "state": "on", "error": None}, result
            recorder.wait("pico/bench/state/led", "on")

        with part("discovery"):
            announced = json.loads(recorder.wait("homeassistant/device/testgw_bench/config")[0])
            board = LINKS["tcpserial"].board
            assert announced["dev"]["mdl"] == f"{board} (tcpserial, pico-gateway firmware)", announced["dev"]

        with part("status"):
            capsys.readouterr()
            assert cli.main(["status", "--config", str(sim_config)]) == 0
            out = capsys.readouterr().out
            assert "bench  (tcpserial, picogw)" in out and "status   online" in out and "led      on" in out, out
            assert "temp=" in out, out
    finally:
        if gateway is not None:
            gateway.stop()
        simulate.send_signal(signal.SIGINT)
        try:
            simulate.wait(15)
        except subprocess.TimeoutExpired:
            simulate.kill()
            simulate.wait()


def test_flash_writes_the_firmware_link_the_new_transport_runs(tmp_path: Path, broker: Broker,
                                                                registry_restored: None) -> None:
    """Its Pico runs our firmware's uart link: that is what flash writes in its config.py."""
    from gateway.config import load_config
    from gateway.flash import config_values
    from gateway.simulator.config_py import render_config_py

    config = load_config(_config(tmp_path / "gateway.toml", broker,
                                 'id = "bench"\ntransport = "tcpserial"\nhost = "127.0.0.1"\nport = 4001'))
    values = config_values(config, config.devices[0], None)
    assert values["DEVICE"] == "bench" and values["LINK"] == "uart"
    assert 'LINK = "uart"' in render_config_py(values)


def test_a_plugin_that_cannot_be_loaded_is_a_config_problem(tmp_path: Path, registry_restored: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken_link.py").write_text('raise RuntimeError("half-written")\n')
    config = tmp_path / "gateway.toml"
    config.write_text('plugins = ["no_such_link_module", "broken_link.py", "gone.py"]\n'
                      '[[devices]]\nid = "bench"\ntransport = "tcpserial"\n')
    assert cli.main(["check-config", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  plugins[0]: cannot import 'no_such_link_module': No module named 'no_such_link_module' "
        "(install it, or name its .py file)",
        "  plugins[1]: loading 'broken_link.py' failed: RuntimeError: half-written",
        f"  plugins[2]: {tmp_path / 'gone.py'} is not a file"]
    assert not any(name.startswith("pico_gateway_plugin_broken") for name in sys.modules)
