"""check-config and run refuse a bad file, naming every problem with its key and device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO, timeout=30)


def test_the_example_config_is_valid() -> None:
    result = cli("check-config", "--config", "config/gateway.toml")
    assert result.returncode == 0, result.stderr
    assert "greenhouse (uart, picogw)" in result.stdout


BAD = """
gateway_id = "pi"
colour = "red"
[mqtt]
port = "high"
[[devices]]
id = "shed"
transport = "uart"
baudrate = -5
[[devices]]
id = "shed"
transport = "uart"
[[devices]]
id = "attic"
transport = "carrier-pigeon"
[[devices]]
id = "bridge"
transport = "uart"
[[devices]]
id = "cellar"
transport = "uart"
prot = "tutorial"
"""


def test_every_problem_is_named_with_key_and_device(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    result = cli("check-config", "--config", str(path))
    assert result.returncode != 0
    err = result.stderr
    for expected in ("colour: unknown key", "mqtt.port:", "devices[0] (id 'shed').baudrate: Input should be greater than 0",
                     "devices[2] (id 'attic'): unknown transport", "devices[3] (id 'bridge').id:",
                     "devices[4] (id 'cellar').prot: unknown key"):
        assert expected in err, err


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text('[[devices]]\nid = "a"\ntransport = "uart"\n[[devices]]\nid = "a"\ntransport = "uart"\n')
    with pytest.raises(ConfigError, match="'a' is used twice"):
        load_config(path)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "x.toml").write_text("devices = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")


def test_run_refuses_a_bad_config_before_touching_any_port(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD + f'[store]\npath = "{tmp_path}/r.db"\n')
    result = cli("run", "--config", str(path))
    assert result.returncode != 0
    assert "unknown transport" in result.stderr
    assert not (tmp_path / "r.db").exists()
