"""``pico-gateway flash`` against a virtual Pico with a raw REPL on a pty."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import serial
from conftest import write_config

from gateway import flash as flash_module
from gateway.cli import main
from gateway.config import load_config
from gateway.flash import PICO_DIR, FlashError, config_values, firmware_files, flash, load_secrets
from gateway.simulator.fleet import start_fleet


class NoBroker:
    host, port = "127.0.0.1", 1883


@pytest.fixture
def blank_pico(tmp_path: Path):
    """A usb Pico fresh from MicroPython's UF2: an empty filesystem (``pico.fs``), a REPL."""
    fleet = start_fleet([{"id": "x", "transport": "usb", "firmware": "stock"}], tmp_path / "picos")
    try:
        assert list(Path(fleet["x"].fs).iterdir()) == []
        yield fleet["x"], Path(fleet["x"].fs)
    finally:
        fleet.stop()


def test_flash_usb_pico_and_hello(tmp_path, blank_pico, capsys) -> None:
    pico, fs = blank_pico
    cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "usb", "port": pico.endpoint}])
    assert main(["flash", "--config", str(cfg), "--device", "x"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    names = [p.name for p in firmware_files()]
    assert "main.py" in names and "config_example.py" not in names and not any("tutorial" in n for n in names)
    for name in names:  # every firmware file landed, byte for byte
        assert (fs / name).read_bytes() == (PICO_DIR / name).read_bytes(), name
    assert 'DEVICE = "x"' in (fs / "config.py").read_text() and 'LINK = "usb"' in (fs / "config.py").read_text()
    assert not (fs / "tutorial").exists() and not (fs / "config_example.py").exists()
    assert "says hello: $H," in out and "dev=x" in out
    assert "2/3 nothing to install" in out
    pico.wait_for(lambda st: st.get("firmware") == "running", 5, "the firmware running")


def test_flash_again_over_running_firmware(tmp_path, blank_pico, capsys) -> None:
    """A Pico already running our firmware (frames on its console) is interrupted and flashed again."""
    pico, fs = blank_pico
    cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "usb", "port": pico.endpoint}])
    assert main(["flash", "--config", str(cfg), "--device", "x"]) == 0
    capsys.readouterr()
    (fs / "core.py").write_text("garbage")  # so the second flash visibly rewrites it
    assert main(["flash", "--config", str(cfg), "--device", "x", "--port", pico.endpoint]) == 0, \
        capsys.readouterr().err
    assert (fs / "core.py").read_bytes() == (PICO_DIR / "core.py").read_bytes()
    assert "says hello" in capsys.readouterr().out


def test_flash_of_a_board_that_ignores_ctrl_c_fails_in_time_saying_why(tmp_path, monkeypatch, capsys) -> None:
    """A program that turned Ctrl-C off and keeps printing never lets the raw REPL in: every read
    returns bytes, so only an overall bound ends the flash, with what to do instead."""
    program = Path(__file__).parent / "sim_programs" / "no_ctrl_c.py"
    fleet = start_fleet([{"id": "x", "transport": "usb", "firmware": str(program)}], tmp_path / "picos")
    try:
        pico = fleet["x"]
        pico.wait_for(lambda st: st.get("firmware") == "running", 5, "the program running")
        # "running" comes before the program's kbd_intr(-1): a Ctrl-C sent in between still stops it,
        # so wait for what it prints after turning Ctrl-C off
        with serial.Serial(pico.endpoint, 115200, timeout=10) as console:
            assert b"busy" in console.read_until(b"busy"), "the program never printed"
        monkeypatch.setattr(flash_module, "RAW_REPL_TIMEOUT", 1.5)
        cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "usb", "port": pico.endpoint}])
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(main(["flash", "--config", str(cfg), "--device", "x"])),
                                  daemon=True)
        worker.start()
        worker.join(30)
        assert result == [1], "the flash did not end"
        err = capsys.readouterr().err
        assert "did not stop for Ctrl-C" in err and "BOOTSEL" in err, err
    finally:
        fleet.stop()


def test_flash_wifi_pico_without_mip(tmp_path, blank_pico, capsys) -> None:
    pico, fs = blank_pico
    secrets = tmp_path / "wifi.toml"
    secrets.write_text('ssid = "garden-net"\npassword = "s3cret"\nbroker = "192.168.1.2"\n')
    secrets.chmod(0o600)
    cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "wifi"}])
    # no USB port in a wifi device's config: --port is needed
    assert main(["flash", "--config", str(cfg), "--device", "x", "--no-mip"]) == 1
    assert "--port" in capsys.readouterr().err
    assert main(["flash", "--config", str(cfg), "--device", "x", "--port", pico.endpoint]) == 1
    assert "--wifi-secrets" in capsys.readouterr().err
    # the fleet's virtual Pico is a usb one: after the reset our wifi config would not match
    # its simulated link, so only the files are checked (as for every non-serial link)
    assert main(["flash", "--config", str(cfg), "--device", "x", "--port", pico.endpoint,
                 "--wifi-secrets", str(secrets), "--no-mip"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "skipped: mip install umqtt.simple (--no-mip)" in out and "files are on the board" in out
    text = (fs / "config.py").read_text()
    assert '"ssid": "garden-net"' in text and '"password": "s3cret"' in text and '"broker": "192.168.1.2"' in text
    assert 'LINK = "wifi"' in text


def test_config_values_and_errors(tmp_path) -> None:
    cfg = load_config(write_config(tmp_path / "gw.toml", NoBroker(), [
        {"id": "g", "transport": "uart", "port": "/dev/serial0", "baudrate": 57600},
        {"id": "s", "transport": "i2c", "address": 0x44},
        {"id": "t", "transport": "tcp", "host": "192.168.1.9", "port": 8081},
        {"id": "w", "transport": "wifi"},
        {"id": "p", "transport": "uart", "port": "/dev/ttyAMA1", "protocol": "tutorial"},
    ]))
    assert config_values(cfg, cfg.device("g"), None)["UART"] == {"baudrate": 57600}
    assert config_values(cfg, cfg.device("s"), None)["I2C"] == {"addr": 0x44}
    tcp = config_values(cfg, cfg.device("t"), {"ssid": "n", "password": "p"})
    assert tcp["TCP"]["port"] == 8081 and tcp["WIFI"] == {"ssid": "n", "password": "p"}
    with pytest.raises(FlashError, match="that is the Pi itself"):
        config_values(cfg, cfg.device("w"), {"ssid": "n", "password": "p"})  # mqtt.host is 127.0.0.1
    with pytest.raises(FlashError, match="tutorial"):
        flash(cfg, "p", port="/dev/null")
    with pytest.raises(FlashError, match="unknown device"):
        flash(cfg, "nope", port="/dev/null")
    with pytest.raises(FlashError, match="--port"):
        flash(cfg, "g")
    bad = tmp_path / "bad.toml"
    bad.write_text('ssid = "n"\npasswd = "x"\n')
    with pytest.raises(FlashError, match="unknown key"):
        load_secrets(bad)


def test_a_port_that_does_not_exist_is_named_with_the_ports_that_do(tmp_path, capsys) -> None:
    from serial.tools.list_ports import comports

    missing = str(tmp_path / "ttyACM9")
    cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "usb", "port": missing}])
    assert main(["flash", "--config", str(cfg), "--device", "x"]) == 1
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "using it" not in err  # not "is the gateway using it?"
    ports = [p.device for p in comports()]
    assert all(port in err for port in ports) and (ports or "no serial port at all" in err), err

    # a file that is there but is no serial port: it cannot be opened, which is another story
    not_a_port = tmp_path / "not-a-port"
    not_a_port.write_text("")
    assert main(["flash", "--config", str(cfg), "--device", "x", "--port", str(not_a_port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot open {not_a_port}" in err and "does not exist" not in err

