"""systemd integration: sd_notify against a fake NOTIFY_SOCKET, the watchdog, journald
log prefixes, the installer's plan in a temporary root, and the unit file itself."""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_helpers import wait_for

from gateway import systemd
from gateway.service import ServiceError, install_service, render_unit, uninstall_service
from gateway.systemd import JournalFormatter, Notifier, Watchdog, stderr_is_journal, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "pico-gateway.service"


class FakeSystemd:
    """A NOTIFY_SOCKET: a real AF_UNIX datagram socket collecting (time, message) pairs."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode()))
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate([m for _, m in self.messages]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; received {[m for _, m in self.messages]}")
                self.cond.wait(left)
            return [m for _, m in self.messages]

    def times(self, message: str) -> list[float]:
        with self.cond:
            return [t for t, m in self.messages if m == message]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    address = str(tmp_path / "notify")
    fake = FakeSystemd(address)
    yield fake, {"NOTIFY_SOCKET": address}
    fake.close()


# -- sd_notify ------------------------------------------------------------------

def test_notifier_is_a_noop_outside_systemd() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready() is False and n.status("x") is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval() is None


def test_ready_status_stopping(fake_systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, env = fake_systemd
    n = Notifier(env=env)
    assert n.enabled
    assert n.status("connecting to the broker")
    assert n.ready("running: 2 device(s)")
    assert n.stopping()
    msgs = fake.wait_for(lambda m: len(m) >= 3)
    assert msgs == ["STATUS=connecting to the broker", "READY=1\nSTATUS=running: 2 device(s)", "STOPPING=1"]
    n.close()


def test_status_cannot_inject_assignments(fake_systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, env = fake_systemd
    Notifier(env=env).status("bad\nREADY=1")
    assert fake.wait_for(lambda m: len(m) >= 1) == ["STATUS=bad READY=1"]


def test_abstract_namespace_socket() -> None:
    name = f"pico-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_unreachable_socket_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.ready() is False
    assert n.watchdog() is False
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None  # not us


# -- the watchdog thread ------------------------------------------------------------

def test_watchdog_pings_at_half_the_interval_while_healthy(
        fake_systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, env = fake_systemd
    env["WATCHDOG_USEC"] = "400000"  # 0.4 s: pings every 0.2 s
    n = Notifier(env=env)
    wd = Watchdog(n, lambda: True)
    assert wd.interval == pytest.approx(0.4)
    wd.start()
    try:
        fake.wait_for(lambda m: m.count("WATCHDOG=1") >= 5)
    finally:
        wd.stop()
    times = fake.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.1 < g < 0.4 for g in gaps), gaps  # every ping inside the 0.4 s timeout
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, abs=0.08)  # at half of it


def test_watchdog_stops_petting_when_unhealthy_and_says_why_once(
        fake_systemd: tuple[FakeSystemd, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    fake, env = fake_systemd
    env["WATCHDOG_USEC"] = "200000"  # pings every 0.1 s
    healthy = threading.Event()
    healthy.set()
    checks = threading.Semaphore(0)

    def health() -> tuple[bool, str]:
        checks.release()
        return healthy.is_set(), "the link thread of device 'shed' has died"

    wd = Watchdog(Notifier(env=env), health)
    wd.start()
    try:
        fake.wait_for(lambda m: m.count("WATCHDOG=1") >= 2)
        healthy.clear()
        fake.wait_for(lambda m: any(x.startswith("STATUS=unhealthy") for x in m))
        pings = len(fake.times("WATCHDOG=1"))
        for _ in range(6):  # six more health checks (~0.6 s, 3 timeouts): not one ping
            while checks.acquire(timeout=0):
                pass
            assert checks.acquire(timeout=5)
        assert len(fake.times("WATCHDOG=1")) == pings
        assert not wd.healthy and "shed" in wd.reason
    finally:
        wd.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "unhealthy" in r.message]
    assert len(errors) == 1 and "'shed'" in errors[0].getMessage()
    assert "STATUS=unhealthy: the link thread of device 'shed' has died" in [m for _, m in fake.messages]


def test_watchdog_treats_a_failing_health_check_as_unhealthy() -> None:
    sent: list[str] = []

    class Recording(Notifier):
        def notify(self, *fields: str) -> bool:
            sent.extend(fields)
            return True

    def broken() -> bool:
        raise RuntimeError("boom")

    wd = Watchdog(Recording(env={"NOTIFY_SOCKET": "/nonexistent"}), broken, interval=1.0)
    assert wd.tick() is False
    assert "WATCHDOG=1" not in sent and "RuntimeError: boom" in wd.reason


def test_watchdog_does_nothing_without_watchdog_usec(fake_systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    _, env = fake_systemd
    wd = Watchdog(Notifier(env=env), lambda: True)
    wd.start()
    assert not wd.active
    wd.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_gateway_health_checks_mqtt_writer_and_link_threads(broker, tmp_path) -> None:
    """Real parts: a connected MqttConnection, a Bridge with its writer, a tcp link
    whose thread dies from a bug, and a wifi link (no thread of its own)."""
    import threading

    from gateway.bridge import Bridge
    from gateway.config import MqttConfig
    from gateway.links.tcp import TcpConfig, TcpLink
    from gateway.links.wifi import WifiConfig, WifiLink
    from gateway.mqtt import MqttConnection
    from gateway.store import Store
    from gateway.topics import Topics

    crash = threading.Event()

    class FragileLink(TcpLink):
        def _run(self) -> None:
            crash.wait()
            raise RuntimeError("a bug in a link")

    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "health-test",
                          ("pico/bridge/t/status", "offline"))
    bridge = Bridge("t", Topics(), Store(tmp_path / "r.db"), mqtt)
    shed = FragileLink(TcpConfig(id="shed", transport="tcp", host="127.0.0.1", port=9), bridge)
    bridge.add(shed)
    bridge.add(WifiLink(WifiConfig(id="balcony", transport="wifi"), bridge))
    health = systemd.gateway_health(mqtt, bridge)
    assert health() == (False, "the MQTT network thread is not running")
    mqtt.start()
    assert mqtt.wait_connected(10)
    bridge.start()
    try:
        assert health() == (True, "")
        crash.set()
        wait_for(lambda: health() == (False, "the link thread of device 'shed' has died"), 5, "the death noticed")
    finally:
        bridge.stop()
        mqtt.stop()
    assert health() == (False, "the MQTT network thread is not running")


# -- journald logging ------------------------------------------------------------------

def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad frame")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord("gateway.link.shed", level, __file__, 1, msg, (), exc_info)


def test_journal_formatter_prefixes_every_line_with_its_priority() -> None:
    f = JournalFormatter()
    assert f.format(_record(logging.ERROR, "cannot open")) == "<3>gateway.link.shed: cannot open"
    assert f.format(_record(logging.WARNING, "offline")) == "<4>gateway.link.shed: offline"
    assert f.format(_record(logging.INFO, "online")) == "<6>gateway.link.shed: online"
    assert f.format(_record(logging.DEBUG, "frame")) == "<7>gateway.link.shed: frame"
    assert f.format(_record(logging.CRITICAL, "dead")) == "<2>gateway.link.shed: dead"
    lines = f.format(_record(logging.ERROR, "failed", exc=True)).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: bad frame"


def test_journal_detection_matches_stderr_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stderr_is_journal(stream, {})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "junk"})
        assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})

        handler = systemd.journald_logging(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        handler.emit(_record(logging.WARNING, "offline"))
        plain = systemd.journald_logging(stream, {})
        plain.emit(_record(logging.WARNING, "offline"))
    first, second = (tmp_path / "stderr").read_text().splitlines()
    assert first == "<4>gateway.link.shed: offline"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING gateway.link.shed: offline", second)


def test_setup_logging_under_journald(tmp_path: Path) -> None:
    """The CLI's path: a child process whose stderr is the 'journal'."""
    err = tmp_path / "stderr"
    code = ("import logging, os, sys; st = os.fstat(2); "
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
            "from gateway.systemd import setup_logging; setup_logging(False); "
            "logging.getLogger('gateway').warning('hello'); logging.getLogger('gateway').debug('hidden')")
    with open(err, "w") as stream:
        subprocess.run([os.sys.executable, "-c", code], stderr=stream, check=True, cwd=REPO, timeout=60)
    assert err.read_text() == "<4>gateway: hello\n"


# -- the installer -------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, cmd: list[str], check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
        self.commands.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _install(root: Path, recorder: Recorder, groups: set[str], user: bool = False, out: list[str] | None = None) -> int:
    lines = out if out is not None else []
    return install_service(REPO, run=recorder, root=root, python="/usr/bin/python3",
                           group_exists=lambda g: g in groups, user_exists=lambda u: user,
                           out=lines.append)


def test_install_plan_into_a_temporary_root(tmp_path: Path) -> None:
    rec, out = Recorder(), []
    assert _install(tmp_path, rec, {"dialout", "plugdev"}, out=out) == 0

    unit = (tmp_path / "etc/systemd/system/pico-gateway.service").read_text()
    assert "ExecStart=/opt/pico-gateway/venv/bin/pico-gateway run --config /etc/pico-gateway/gateway.toml" in unit
    assert re.search(r"(?m)^SupplementaryGroups=dialout plugdev$", unit)  # no i2c group on this machine
    config = tmp_path / "etc/pico-gateway/gateway.toml"
    assert config.read_text() == (REPO / "config/gateway.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    password = tmp_path / "etc/pico-gateway/mqtt-password"
    assert password.read_bytes() == b"" and password.stat().st_mode & 0o777 == 0o600

    assert rec.commands == [
        ["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/pico-gateway",
         "--shell", "/usr/sbin/nologin", "--user-group", "--groups", "dialout,plugdev", "pico-gateway"],
        ["/usr/bin/python3", "-m", "venv", "/opt/pico-gateway/venv"],
        ["/opt/pico-gateway/venv/bin/python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        ["/opt/pico-gateway/venv/bin/python", "-m", "pip", "install", "--quiet", "--upgrade", str(REPO)],
        ["chown", "root:pico-gateway", "/etc/pico-gateway/gateway.toml"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "pico-gateway.service"],
        ["systemctl", "restart", "pico-gateway.service"],
    ]
    assert not any("-e" in c or "--editable" in c for c in rec.commands)
    assert any("i2c" in line and "left out" in line for line in out)


def test_reinstall_keeps_the_config_and_the_password(tmp_path: Path) -> None:
    etc = tmp_path / "etc/pico-gateway"
    etc.mkdir(parents=True)
    (etc / "gateway.toml").write_text('gateway_id = "mine"\n')
    (etc / "mqtt-password").write_text("s3cret-for-test\n")
    (tmp_path / "opt/pico-gateway/venv/bin").mkdir(parents=True)
    (tmp_path / "opt/pico-gateway/venv/bin/python").touch()
    rec, out = Recorder(), []
    _install(tmp_path, rec, {"dialout", "i2c", "plugdev"}, user=True, out=out)
    assert (etc / "gateway.toml").read_text() == 'gateway_id = "mine"\n'
    assert (etc / "mqtt-password").read_text() == "s3cret-for-test\n"
    assert ["usermod", "--append", "--groups", "dialout,i2c,plugdev", "pico-gateway"] in rec.commands
    assert not any(c[0] in ("useradd", "chown") or c[-2:] == ["venv", "/opt/pico-gateway/venv"] for c in rec.commands)
    assert any("kept the existing /etc/pico-gateway/gateway.toml" in line for line in out)
    unit = (tmp_path / "etc/systemd/system/pico-gateway.service").read_text()
    assert re.search(r"(?m)^SupplementaryGroups=dialout i2c plugdev$", unit)


def test_uninstall_removes_unit_and_venv_keeps_config_and_data(tmp_path: Path) -> None:
    _install(tmp_path, Recorder(), {"dialout"})
    (tmp_path / "opt/pico-gateway/venv/bin").mkdir(parents=True)
    (tmp_path / "opt/pico-gateway/venv/bin/python").touch()
    data = tmp_path / "var/lib/pico-gateway"
    data.mkdir(parents=True)
    (data / "readings.db").write_bytes(b"x")
    rec, out = Recorder(), []
    assert uninstall_service(run=rec, root=tmp_path, out=out.append) == 0
    assert rec.commands[0] == ["systemctl", "disable", "--now", "pico-gateway.service"]
    assert ["systemctl", "daemon-reload"] in rec.commands
    assert not (tmp_path / "etc/systemd/system/pico-gateway.service").exists()
    assert not (tmp_path / "opt/pico-gateway").exists()
    assert (tmp_path / "etc/pico-gateway/gateway.toml").exists()
    assert (tmp_path / "etc/pico-gateway/mqtt-password").exists()
    assert (data / "readings.db").exists()
    assert "kept /etc/pico-gateway" in out[-1] and "/var/lib/pico-gateway" in out[-1]


def test_install_refuses_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rec = Recorder()
    with pytest.raises(ServiceError, match="must run as root.*sudo .venv/bin/pico-gateway install-service"):
        install_service(REPO, run=rec)
    with pytest.raises(ServiceError, match="must run as root"):
        uninstall_service(run=rec)
    assert rec.commands == []


def test_render_unit_other_prefix_and_no_groups() -> None:
    text = render_unit(UNIT.read_text(), "/srv/pgw", "/etc/pgw", [])
    assert "ExecStart=/srv/pgw/venv/bin/pico-gateway run --config /etc/pgw/gateway.toml" in text
    assert "LoadCredential=mqtt-password:/etc/pgw/mqtt-password" in text
    assert not re.search(r"(?m)^SupplementaryGroups=", text)


# -- the unit file ----------------------------------------------------------------------

def test_unit_file_has_the_required_settings() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["30"] and settings["Restart"] == ["on-failure"]
    assert settings["User"] == ["pico-gateway"]
    assert settings["LoadCredential"] == ["mqtt-password:/etc/pico-gateway/mqtt-password"]
    assert {"char-ttyAMA rw", "char-ttyS rw", "char-ttyACM rw", "char-i2c rw"} <= set(settings["DeviceAllow"])
    assert settings["DevicePolicy"] == ["closed"] and settings["MemoryDenyWriteExecute"] == ["yes"]
    assert "PrivateUsers" not in settings and "PrivateDevices" not in settings


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze not installed (apt-get install systemd)")


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify accepts the unit; the one tolerated complaint is the ExecStart binary, which
    only exists once installed."""
    unit = tmp_path / "pico-gateway.service"
    shutil.copyfile(UNIT, unit)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip() and "/opt/pico-gateway/venv/bin/pico-gateway is not executable" not in line
                and not re.search(r"(mosquitto|modprobe@i2c_dev)\.service.*(not found|No such file)", line)]
    assert problems == [], proc.stdout + proc.stderr
    # With an ExecStart that exists, verify must be entirely clean.
    unit.write_text(UNIT.read_text().replace("/opt/pico-gateway/venv/bin/pico-gateway", "/usr/bin/env"))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_at_most_2() -> None:
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for pico-gateway\.service: (\d+(?:\.\d+)?)", proc.stdout)
    if match is None and "offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()[:200]}")
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    assert exposure <= 2.0, proc.stdout
