"""Broker authentication, the shipped ACL and TLS, against a real mosquitto (docs/security.md).

The broker uses a password file made with mosquitto_passwd and the example ACL
from config/mosquitto/acl unchanged; TLS uses a CA and certificates generated
here with the openssl command line (no Python package needed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import REPO, GatewayProcess
from mqtt_helpers import Broker, Recorder, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from peers import PicogwPeer

from gateway.config import ConfigError, MqttConfig, parse_config
from gateway.mqtt import MqttConnection
from gateway.processes import stop_process

ACL = REPO / "config" / "mosquitto" / "acl"
PASSWORDS = {"pico-gateway": "gw-S3cret-7f3a9c", "homeassistant": "ha-pass-1", "viewer": "viewer-pass-1"}

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None or shutil.which("openssl") is None,
                                reason="needs mosquitto_passwd and openssl")


def make_passwd(path: Path, users: dict[str, str]) -> Path:
    path.touch()
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, capture_output=True)
    return path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return crt, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    crt, key, csr, ext = d / f"{name}.crt", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   + ("extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n" if server
                      else "extendedKeyUsage=clientAuth\n"))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return crt, key


def gateway_config(path: Path, broker: Broker, devices: list[dict], mqtt: dict, tls: dict | None = None,
                   gateway_id: str = "securegw") -> Path:
    def value(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, (str, Path)) else str(v))

    lines = [f'gateway_id = "{gateway_id}"', "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}"]
    lines += [f"{k} = {value(v)}" for k, v in mqtt.items()]
    if tls:
        lines += ["[mqtt.tls]"] + [f"{k} = {value(v)}" for k, v in tls.items()]
    lines += ["[store]", f'path = "{path.parent / (gateway_id + ".db")}"', "[homeassistant]", "enabled = false"]
    for dev in devices:
        lines += ["[[devices]]"] + [f"{k} = {value(v)}" for k, v in dev.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_raw(config: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """The gateway as a child, without waiting for it to connect (it may never)."""
    log = config.parent / f"{config.stem}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config), *extra],
                                stdout=out, stderr=out, cwd=REPO)
    return proc, log


def connect_result(broker: Broker, user: str | None = None, password: str | None = None) -> paho.ReasonCode:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    got: list[paho.ReasonCode] = []
    client.on_connect = lambda c, u, f, reason, p: got.append(reason)
    if user:
        client.username_pw_set(user, password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        wait_for(lambda: got, 5, "CONNACK")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", password_file=make_passwd(tmp_path / "passwd", PASSWORDS), acl_file=ACL)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def pico() -> Iterator[PicogwPeer]:
    peer = PicogwPeer("greenhouse")
    yield peer
    peer.close()


def test_password_never_inline_and_credential_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"mqtt": {"username": "u", "password": "hunter2"}})
    assert "mqtt.password" in str(err.value) and "password_file" in str(err.value)
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="tls.bogus"):
        parse_config({"mqtt": {"tls": {"enabled": True, "bogus": 1}}})
    assert parse_config({"mqtt": {"tls": {"enabled": True}}}).mqtt.port == 8883
    assert parse_config({"mqtt": {"port": 1884, "tls": {"enabled": True}}}).mqtt.port == 1884

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    cfg = parse_config({"mqtt": {"username": "u", "password_file": "credential:mqtt-password"}}).mqtt
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    problems, notes = cfg.file_problems()
    assert not problems and "CREDENTIALS_DIRECTORY" in notes[0]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert cfg.read_password() == "from-systemd"
    assert parse_config({"mqtt": {"username": "u", "password_file": "$CREDENTIALS_DIRECTORY/mqtt-password"}}
                        ).mqtt.read_password() == "from-systemd"
    (creds / "mqtt-password").write_text("")  # the installer's empty credential: no password
    assert cfg.read_password() is None
    missing = parse_config({"mqtt": {"username": "u", "password_file": str(tmp_path / "nope"),
                                     "tls": {"enabled": True, "ca_file": str(tmp_path / "ca.crt")}}})
    problems, _ = missing.mqtt.file_problems()
    assert [p.split(":")[0] for p in problems] == ["mqtt.password_file", "mqtt.tls.ca_file"]


def test_acl_gateway_user_works_anonymous_refused_viewer_cannot_switch(
        tmp_path: Path, locked_broker: Broker, pico: PicogwPeer) -> None:
    password_file = tmp_path / "gw-password"
    password_file.write_text(PASSWORDS["pico-gateway"] + "\n")
    password_file.chmod(0o600)
    config = gateway_config(tmp_path / "gw.toml", locked_broker,
                            [{"id": "greenhouse", "transport": "uart", "port": pico.path}],
                            {"username": "pico-gateway", "password_file": str(password_file)})
    check = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr

    # Anonymous clients and wrong passwords are refused (mosquitto 2.0 says 135 for both).
    assert connect_result(locked_broker).value == 135
    assert connect_result(locked_broker, "viewer", "wrong").is_failure

    ha = Recorder(locked_broker, username="homeassistant", password=PASSWORDS["homeassistant"])
    viewer = Recorder(locked_broker, username="viewer", password=PASSWORDS["viewer"])
    gw = GatewayProcess(config, ha, "securegw")
    try:
        ha.wait("pico/greenhouse/status", "online", timeout=15)
        pico.reading(temp=21.5)  # the gateway may publish readings...
        ha.wait("pico/greenhouse/sensor/temp", "21.5")
        assert viewer.wait("pico/greenhouse/sensor/temp", "21.5")  # ...and a viewer may read them

        # The viewer may not write cmd/#: the broker refuses its publish (PUBACK 135) and the
        # gateway never hears it. Home Assistant may: its command is the only one carried out.
        refused: list[paho.ReasonCode] = []
        viewer.client.on_publish = lambda c, u, mid, reason, p: refused.append(reason)
        viewer.client.publish("pico/greenhouse/cmd/led", "on", qos=1).wait_for_publish(5)
        wait_for(lambda: refused, 5, "the broker's answer to the viewer's command")
        assert refused[0].value == 135
        ha.publish("pico/greenhouse/cmd/led", "toggle")
        answers = ha.wait("pico/greenhouse/result/led")
        assert '"state": "on"' in answers[0]  # toggled from off: the viewer's "on" never arrived
        assert [list(c.fields) for c in pico.commands if c.fields and c.fields[0][0] == "led"] == [[("led", "toggle")]]
        assert pico.led is True and len(ha.on("pico/greenhouse/result/led")) == 1
    finally:
        code = gw.stop()
        ha.close()
        viewer.close()
    assert code == 0
    assert PASSWORDS["pico-gateway"] not in gw.output()  # never in the log


def test_a_wrong_password_is_logged_counted_retried_and_never_leaked(tmp_path: Path, locked_broker: Broker) -> None:
    password_file = tmp_path / "gw-password"
    password_file.write_text("not-the-Password-8d1e\n")
    config = gateway_config(tmp_path / "gw.toml", locked_broker, [],
                            {"username": "pico-gateway", "password_file": str(password_file)})
    proc, log = start_raw(config, "-v")  # debug logging: still no secret
    try:
        wait_for(lambda: log.read_text().count("refused user 'pico-gateway'") >= 2, 15,
                 "two refusals in the log (retried)")
        assert proc.poll() is None
    finally:
        code = stop_process(proc)
    assert code == 0
    text = log.read_text()
    assert "not-the-Password-8d1e" not in text and "Traceback" not in text


def test_an_unreadable_password_file_stops_with_a_clear_error(tmp_path: Path, locked_broker: Broker) -> None:
    config = gateway_config(tmp_path / "gw.toml", locked_broker, [],
                            {"username": "pico-gateway", "password_file": str(tmp_path / "missing")})
    check = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 2 and "mqtt.password_file: cannot read" in check.stderr
    proc, log = start_raw(config)
    assert proc.wait(15) == 2
    assert "mqtt.password_file: cannot read" in log.read_text()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    other = make_ca(d, "other-ca")
    server = make_cert(d, "broker", ca, server=True)
    client = make_cert(d, "gateway-client", ca, server=False)
    return {"ca": ca[0], "other_ca": other[0], "server_crt": server[0], "server_key": server[1],
            "client_crt": client[0], "client_key": client[1]}


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", password_file=make_passwd(tmp_path / "passwd", PASSWORDS), acl_file=ACL,
               cafile=pki["ca"], certfile=pki["server_crt"], keyfile=pki["server_key"], require_certificate=True)
    b.start()
    yield b
    b.stop()


def test_tls_with_verification_and_a_client_certificate(tmp_path: Path, tls_broker: Broker, pki: dict[str, Path],
                                                         pico: PicogwPeer) -> None:
    password_file = tmp_path / "gw-password"
    password_file.write_text(PASSWORDS["pico-gateway"])
    config = gateway_config(tmp_path / "gw.toml", tls_broker,
                            [{"id": "greenhouse", "transport": "uart", "port": pico.path}],
                            {"username": "pico-gateway", "password_file": str(password_file)},
                            tls={"enabled": True, "ca_file": pki["ca"], "certfile": pki["client_crt"],
                                 "keyfile": pki["client_key"]})
    ha = Recorder(tls_broker, username="homeassistant", password=PASSWORDS["homeassistant"], ca_file=str(pki["ca"]),
                  certfile=str(pki["client_crt"]), keyfile=str(pki["client_key"]))
    gw = GatewayProcess(config, ha, "securegw")
    try:
        ha.wait("pico/greenhouse/status", "online", timeout=15)
        pico.reading(temp=3.25)
        ha.wait("pico/greenhouse/sensor/temp", "3.25")
        assert "(TLS)" in gw.output()
    finally:
        code = gw.stop()
        ha.close()
    assert code == 0


def test_tls_with_the_wrong_ca_logs_a_clear_error_and_keeps_running(tmp_path: Path, tls_broker: Broker,
                                                                     pki: dict[str, Path]) -> None:
    password_file = tmp_path / "gw-password"
    password_file.write_text(PASSWORDS["pico-gateway"])
    config = gateway_config(tmp_path / "gw.toml", tls_broker, [],
                            {"username": "pico-gateway", "password_file": str(password_file)},
                            tls={"enabled": True, "ca_file": pki["other_ca"], "certfile": pki["client_crt"],
                                 "keyfile": pki["client_key"]})
    proc, log = start_raw(config, "-v")  # (the error is logged once; each retry's, at debug level)
    try:
        wait_for(lambda: log.read_text().count("failed verification") >= 2, 15, "two TLS failures in the log")
        assert proc.poll() is None
    finally:
        code = stop_process(proc)
    assert code == 0
    text = log.read_text()
    assert "mqtt.tls.ca_file" in text and str(pki["other_ca"]) in text and "Traceback" not in text
    assert "failed verification: self-signed certificate in certificate chain" in text  # OpenSSL's reason


def test_check_config_parses_the_tls_files_not_only_opens_them(tmp_path: Path, pki: dict[str, Path]) -> None:
    # A readable file that is not a certificate, a key that is not the certificate's, or
    # an encrypted key (OpenSSL would prompt for its passphrase on the terminal) is found
    # by check-config (exit 2, naming the key, no prompt), not only later by run.
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("this is not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", str(pki["client_key"]), "-out", str(encrypted), "-aes256", "-passout", "pass:secret")
    client = {"enabled": True, "ca_file": str(pki["ca"]), "certfile": str(pki["client_crt"])}
    cases = {
        "mqtt.tls.ca_file: cannot use": {"enabled": True, "ca_file": str(not_pem)},
        "mqtt.tls.certfile/keyfile: cannot use": {**client, "keyfile": str(pki["server_key"])},
        "the private key is encrypted": {**client, "keyfile": str(encrypted)},
    }
    for expected, tls in cases.items():
        config = tmp_path / "gw.toml"
        config.write_text("gateway_id = \"tlsgw\"\n[mqtt]\nport = 8883\n[mqtt.tls]\n"
                          # (JSON strings are TOML strings)
                          + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls.items()))
        check = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
                               capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, timeout=30)
        assert check.returncode == 2 and expected in check.stderr, check.stderr
    good = parse_config({"mqtt": {"tls": {"enabled": True, "ca_file": str(pki["ca"]),
                                          "certfile": str(pki["client_crt"]), "keyfile": str(pki["client_key"])}}})
    assert good.mqtt.file_problems() == ([], [])


def test_a_message_the_broker_refuses_is_counted_and_logged(tmp_path: Path, locked_broker: Broker,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # The broker's ACL answers a refused QoS 1 publish with PUBACK 0x87: the gateway's
    # connection counts it (publish_rejected) and says so.
    password_file = tmp_path / "viewer-password"
    password_file.write_text(PASSWORDS["viewer"])
    mqtt = MqttConnection(MqttConfig(host=locked_broker.host, port=locked_broker.port, username="viewer",
                                     password_file=str(password_file)), "refusal-test", None)
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        assert mqtt.publish("pico/greenhouse/cmd/led", "on", qos=1)  # the viewer may not switch
        # (the count comes just before the log line, on the network thread: wait for both)
        wait_for(lambda: mqtt.stats["publish_rejected"] == 1
                 and "the broker refused a message: Not authorized" in caplog.text,
                 10, "the refusal counted and logged")
    finally:
        mqtt.stop()
