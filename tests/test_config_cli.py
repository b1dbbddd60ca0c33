"""check-config and run refuse a bad file, naming every problem with its key and device."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=30)


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
    for expected in ("colour: unknown key", "mqtt.port:",
                     "devices[0] (id 'shed').baudrate: Input should be greater than 0",
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


# --- What run cannot use is refused by check-config, and by run before it starts (exit 2) ---

def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str]:
    """``pico-gateway check-config`` in this process: (exit code, stderr)."""
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().err


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    store = "" if "[store]" in text else f'\n[store]\npath = "{tmp_path / "readings.db"}"\n'
    path.write_text(text + store)
    return path


@pytest.mark.parametrize(("host", "advice"), [
    ("", 'mqtt.host: empty: write the host name or IP address of the broker, e.g. host = "'),
    ("mqtt://127.0.0.1", 'mqtt.host: not a host name or IP address: write host = "127.0.0.1" (the URL form'),
    ("127.0.0.1:1883", 'write host = "127.0.0.1" and port = 1883'),
    ("[::1]:1884", 'write host = "::1" and port = 1884'),
    ("mqtts://broker.lan", 'write host = "broker.lan", port = 8883 and [mqtt.tls] enabled = true'),
    ("mqtt://pi:s3cret@broker.lan:1883", 'username = "pi" (its password in a file named by password_file'),
    ("my broker", "not a host name or IP address: write the name or address of the broker alone"),
    ("192.168.1.300", "not a host name or IP address: write the name or address of the broker alone"),
])
def test_a_host_run_cannot_use_is_refused_with_what_to_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, advice: str) -> None:
    code, err = check(capsys, config_file(tmp_path, f'[mqtt]\nhost = "{host}"\n'))
    assert code == 2 and advice in err, err
    assert "s3cret" not in err  # a password in the URL is never repeated


@pytest.mark.parametrize("host", ["localhost", "broker.lan", "broker.lan.", "192.168.1.10", "::1", "mqtt_1"])
def test_host_names_and_addresses_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str) -> None:
    code, err = check(capsys, config_file(tmp_path, f'[mqtt]\nhost = "{host}"\n'))
    assert code == 0, err


def test_run_exits_2_at_once_for_a_host_it_cannot_use(tmp_path: Path) -> None:
    # The URL form made run retry "127.0.0.1:1883:1883" for ever; systemd's unit stops
    # restarting only on exit 2.
    path = config_file(tmp_path, '[mqtt]\nhost = "127.0.0.1:1883"\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=20)
    assert result.returncode == 2, result.stderr
    assert 'mqtt.host: not a host name or IP address: write host = "127.0.0.1" and port = 1883' in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "readings.db").exists()


def test_store_paths_the_gateway_cannot_open_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes.txt").write_text("not a database\n")
    cases = {
        str(tmp_path): f"store.path: {tmp_path} is a directory: name the database file in it, "
                       f'e.g. path = "{tmp_path / "readings.db"}"',
        str(tmp_path / "a-file" / "db" / "readings.db"): f"store.path: cannot create {tmp_path}/a-file/db/readings.db: "
                                                          f"{tmp_path}/a-file is not a directory",
        str(tmp_path / "notes.txt"): f"store.path: {tmp_path}/notes.txt is not an SQLite database",
    }
    for store, expected in cases.items():
        code, err = check(capsys, config_file(tmp_path, f'[store]\npath = "{store}"\n'))
        assert code == 2 and expected in err, err
    assert (tmp_path / "notes.txt").read_text() == "not a database\n"
    existing = tmp_path / "old.db"
    sqlite3.connect(existing).close()  # (a 0-byte file SQLite made) and a new file in folders still to create
    for store in (existing, tmp_path / "new" / "folder" / "readings.db"):
        code, err = check(capsys, config_file(tmp_path, f'[store]\npath = "{store}"\n'))
        assert code == 0, err
    assert not (tmp_path / "new").exists()  # check-config creates nothing


# root may write anywhere: as root, the gateway runs without the capabilities that allow it,
# as an unprivileged service user would (root's own folders stay readable: it owns them).
UNPRIVILEGED = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv (util-linux) as root")
def test_run_as_the_service_user_exits_2_when_it_cannot_create_the_database(tmp_path: Path) -> None:
    # The service runs as its own user: a folder it may not write in made run exit 1,
    # restarted every 5 s for ever.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    path = config_file(tmp_path, f'[mqtt]\nhost = "127.0.0.1"\nport = 1\n[store]\npath = "{locked}/gw/readings.db"\n')
    try:
        result = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "gateway", "run", "--config", str(path)],
                                capture_output=True, text=True, cwd=REPO, timeout=20)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert (f"store.path: user '{pwd.getpwuid(os.geteuid()).pw_name}' may not create {locked}/gw/readings.db: "
            f"it cannot write in {locked}") in result.stderr
    assert "Traceback" not in result.stderr and not (locked / "gw").exists()


def test_device_addresses_run_cannot_use_are_refused_absent_ports_only_noted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "ttyACM7"  # a Pico plugged in later: not a problem
    devices = {
        'transport = "uart"\nport = "ttyAMA0"':
            'devices[0] (id \'d0\').port: not a device path: write the serial device\'s file, '
            'e.g. port = "/dev/serial0"',
        'transport = "i2c"\nbus = "1"': "devices[1] (id 'd1').bus: write the bus number without quotes, bus = 1",
        'transport = "tcp"\nhost = "http://192.168.1.50:8080"':
            'devices[2] (id \'d2\').host: not a host name or IP address: write host = "192.168.1.50" and port = 8080',
        f'transport = "uart"\nport = "{tmp_path}"': f"devices[3] (id 'd3').port: {tmp_path} is not a serial device",
        f'transport = "usb"\nport = "{absent}"': None,
        f'transport = "usb"\nport = "{absent}"\nprotocol = "tutorial"':
            "devices[5] (id 'd5'): the same port as devices[4] (id 'd4'): one Pico cannot be two devices",
    }
    code, err = check(capsys, config_file(tmp_path, "".join(f'[[devices]]\nid = "d{i}"\n{keys}\n'
                                                            for i, keys in enumerate(devices))))
    assert code == 2
    problems = [line.strip() for line in err.splitlines()[1:]]
    expected = [e for e in devices.values() if e]
    assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected, strict=True)), err
    code, err = check(capsys, config_file(tmp_path, f'[[devices]]\nid = "d4"\ntransport = "usb"\nport = "{absent}"\n'))
    assert code == 0, err
    assert f"note: devices[0] (id 'd4').port: {absent} does not exist now; the gateway opens it when it appears" in err


def test_one_check_lists_the_files_problems_and_what_run_would_fail_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A file that does not validate still has the sections that do checked: one round of fixes.
    code, err = check(capsys, config_file(tmp_path, (
        f'[mqtt]\nhost = "mqtt://192.168.1.10:1883"\n[store]\npath = "{tmp_path}"\n'
        '[[devices]]\nid = "greenhouse"\ntransport = "uart"\nbaudrat = 9600\n'
        '[[devices]]\nid = "porch"\ntransport = "uart"\nport = "serial0"\n')))
    assert code == 2
    assert [line.split(":")[0].strip() for line in err.splitlines()] == [
        f"{tmp_path}/gw.toml", "mqtt.host", "devices[0] (id 'greenhouse').baudrat", "store.path",
        "devices[1] (id 'porch').port"], err


def test_numbers_are_finite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # poll_interval = inf ended the link's thread at its first wait after an answer (OverflowError).
    code, err = check(capsys, config_file(tmp_path, 'diagnostics_interval = inf\n[[devices]]\nid = "shed"\n'
                                                    'transport = "tcp"\nhost = "127.0.0.1"\npoll_interval = inf\n'))
    assert code == 2
    assert "diagnostics_interval: Input should be a finite number" in err
    assert "devices[0] (id 'shed').poll_interval: Input should be a finite number" in err


def test_messages_say_what_to_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(capsys, config_file(tmp_path, (
        'gatway_id = "pi"\nrecorder = { id = "Attic-Rec" }\n'
        '[mqtt]\nbase_topic = "pico"\npassword_file = "/etc/pico-gateway/mqtt-password"\n'
        '[store]\nadopt_wifi_picos = true\n'
        '[[devices]]\nid = "Greenhouse"\ntransport = "uart"\nbaudrat = 9600\npoll_interval = 2.0\n')))
    assert code == 2
    lines = err.splitlines()[1:]
    assert sorted(line.strip() for line in lines) == sorted([
        "gatway_id: unknown key; did you mean 'gateway_id'?",
        "recorder.id: ids are lower case: letters a-z, digits, '-' and '_', at most 64, starting with a letter "
        'or digit; write "attic-rec"',
        "store.adopt_wifi_picos: unknown key; 'adopt_wifi_picos' is a top-level key: move it above the first "
        "[section] line (every key below a [section] line belongs to that section)",
        "mqtt: password_file is set but username is not",
        "devices[0] (id 'Greenhouse').id: ids are lower case: letters a-z, digits, '-' and '_', at most 64, "
        'starting with a letter or digit; write "greenhouse"',
        "devices[0] (id 'Greenhouse').baudrat: unknown key for a uart device; did you mean 'baudrate'?",
        "devices[0] (id 'Greenhouse').poll_interval: unknown key for a uart device; 'poll_interval' is a key of "
        "tcp, i2c, usb devices (docs/links.md)",
    ]), err
    code, err = check(capsys, config_file(tmp_path, 'gateway_id = "Pi Garden"\ncolour = "red"\n'))
    assert "gateway_id: ids are lower case" in err and 'write "pi-garden"' in err and "^[a-z" not in err
    assert "colour: unknown key; the keys here are: gateway_id, mqtt, store," in err
    assert "transport" not in err  # a top-level key is no transport's



def test_an_unknown_protocol_is_named_with_its_key_and_the_protocols_its_link_speaks(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[[devices]]\nid = "cellar"\ntransport = "i2c"\nprotocol = "tutoral"\n'
                                 '[[devices]]\nid = "shed"\ntransport = "tcp"\nhost = "127.0.0.1"\n'
                                 'protocol = "modbus"\n')
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "devices[0] (id 'cellar').protocol: unknown protocol 'tutoral'; did you mean 'tutorial'? " \
           "expected one of: picogw, tutorial" in result.stderr, result.stderr
    assert "devices[1] (id 'shed').protocol: unknown protocol 'modbus'; expected one of: picogw, tutorial" \
           in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_an_encrypted_tls_key_is_reported_against_the_keyfile(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    crt, key = tmp_path / "client.crt", tmp_path / "client.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=gw", "-passout", "pass:pw"],
                   check=True, capture_output=True)
    code, err = check(capsys, config_file(tmp_path,
                                          f'[mqtt.tls]\nenabled = true\ncertfile = "{crt}"\nkeyfile = "{key}"\n'))
    assert code == 2
    assert f"mqtt.tls.keyfile: cannot use {key}: the private key is encrypted" in err, err
