"""``systemctl reload`` (SIGHUP): the config read again by the running gateway process.

Real parts: the gateway process, a private mosquitto, Picos speaking picogw on
pseudo-terminals (a reading every 20 ms each), the SQLite file, and a datagram
socket in systemd's place (``NOTIFY_SOCKET``) that hears ``RELOADING=1`` and the
``READY=1`` that ends the reload. docs/systemd.md, "Reload", says what is proven here.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from peers import PicogwPeer
from test_systemd import FakeSystemd

from gateway.config import parse_config
from gateway.reload import compare

GW = "testgw"


class Pumped(PicogwPeer):
    """A Pico that sends a reading every 20 ms from :meth:`pump` on, until :meth:`close`."""

    def __init__(self, device: str, base: float = 20.0) -> None:
        super().__init__(device)
        self.base = base
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None

    def pump(self) -> None:
        def run() -> None:
            while not self._stop.wait(0.02):
                self.reading(temp=round(self.base + self.seq / 1000, 3))

        self._pump = threading.Thread(target=run, daemon=True)
        self._pump.start()

    def halt(self) -> int:
        """Stop sending; how many readings were sent."""
        self._stop.set()
        if self._pump is not None:
            self._pump.join(2)
        return self.seq

    def hello_requests(self) -> int:
        return sum(1 for f in self.commands if f.type == "C" and f.fields and f.fields[0][0] == "hello")

    def close(self) -> None:
        self.halt()
        super().close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    address = str(tmp_path / "notify")
    fake = FakeSystemd(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)  # (the gateway process inherits it)
    yield fake
    fake.close()


@pytest.fixture
def picos() -> Iterator[dict[str, Pumped]]:
    made: dict[str, Pumped] = {}
    yield made
    for peer in made.values():
        peer.close()


def uart(peer: Pumped, device: str | None = None) -> dict:
    return {"id": device or peer.device, "transport": "uart", "port": peer.path}


def seqs(db: Path, device: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT seq FROM readings WHERE device=? AND metric='temp' ORDER BY id",
                                               (device,))]


def values(db: Path, device: str) -> list[float]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT value FROM readings WHERE device=? ORDER BY id", (device,))]


def reload(gw: GatewayProcess, systemd: FakeSystemd) -> None:
    """SIGHUP, then wait for the READY=1 that ends the reload (after its RELOADING=1)."""
    done = len(systemd.wait_for(lambda m: True, 0))
    gw.proc.send_signal(signal.SIGHUP)
    systemd.wait_for(lambda m: any(x.startswith("RELOADING=1\nMONOTONIC_USEC=") for x in m[done:])
                     and m[-1].startswith("READY=1"), 15)


@pytest.fixture
def started() -> Iterator[list[GatewayProcess]]:
    """Gateways a test started, stopped at its end, whatever happened (a gateway left running
    would go on opening pseudo-terminals whose numbers other tests get next)."""
    gateways: list[GatewayProcess] = []
    yield gateways
    for gw in gateways:
        if gw.proc.poll() is None:
            gw.stop()


def start(tmp_path: Path, broker: Broker, recorder: Recorder, systemd: FakeSystemd, started: list[GatewayProcess],
          devices: list[dict], **top: object) -> tuple[Path, GatewayProcess]:
    config = write_config(tmp_path / "gw.toml", broker, devices, GW, db=None, **top)
    gw = GatewayProcess(config, recorder, GW)
    started.append(gw)
    systemd.wait_for(lambda m: any(x.startswith("READY=1") for x in m), 15)  # (SIGHUP's handler is in place)
    for device in devices:
        recorder.wait(f"pico/{device['id']}/status", "online", timeout=15)
    return config, gw


def test_reload_adds_removes_and_changes_devices_while_the_others_run_on(
        tmp_path: Path, broker: Broker, recorder: Recorder, systemd: FakeSystemd, picos: dict[str, Pumped],
        started: list[GatewayProcess]) -> None:
    for name, base in (("keep", 20.0), ("gone", 30.0), ("moved", 40.0), ("moved2", 50.0), ("new", 60.0)):
        picos[name] = Pumped(name, base)
    keep, gone, moved, moved2, new = picos.values()
    db = tmp_path / "readings.db"
    wifi = {"id": "balcony", "transport": "wifi"}  # a Pico W: heard on the broker, through subscriptions
    config, gw = start(tmp_path, broker, recorder, systemd, started, [uart(keep), uart(gone), uart(moved)],
                       diagnostics_interval=1)
    write_config(config, broker, [uart(keep), uart(gone), uart(moved), wifi], GW, diagnostics_interval=1)
    reload(gw, systemd)  # (added: a device of a link that subscribes)
    for peer in (keep, gone, moved):
        peer.pump()
    recorder.publish("pico/balcony/sensor/temp", "21.5")
    wait_for(lambda: values(db, "balcony") == [21.5], 20, "the Pico W's reading stored")
    wait_for(lambda: len(seqs(db, "keep")) > 20 and len(seqs(db, "gone")) > 20, 20, "readings of every device")
    recorder.wait("pico/gone/diagnostics", timeout=20)
    recorder.wait("pico/gone/state/led", "off")
    hellos = keep.hello_requests()

    # gone leaves, moved is now on another port, new comes; keep is written the same.
    write_config(config, broker, [uart(keep), uart(moved2, "moved"), uart(new)], GW, diagnostics_interval=1)
    reload(gw, systemd)
    gone.halt()  # (nobody reads its port now)
    moved2.pump()
    new.pump()

    recorder.wait("pico/new/status", "online", timeout=20)
    wait_for(lambda: len(values(db, "new")) > 5, 20, "readings of the added device")
    wait_for(lambda: any(v >= 50 for v in values(db, "moved")), 20, "readings of the changed device on its new port")
    for topic in ("status", "state/led", "owner", "diagnostics"):
        recorder.wait(f"pico/gone/{topic}", "", timeout=20)  # cleared (an empty retained message)
    recorder.wait(f"homeassistant/device/{GW}_gone/config", "", timeout=20)
    assert f"homeassistant/device/{GW}_new/config" in {m.topic for m in recorder.received()}
    recorder.wait(f"homeassistant/device/{GW}_balcony/config", "", timeout=20)
    # Their subscriptions went with them: a command for gone, a reading of balcony's are not heard.
    recorder.publish("pico/gone/cmd/led", "on")
    recorder.publish("pico/balcony/sensor/temp", "22.5")
    # Fresh diagnostics asked for after those (the gateway takes one client's messages in
    # order, so they answer once both were handled); nor may they bring the removed device back.
    bridge_diagnostics = f"pico/bridge/{GW}/diagnostics"
    mark = recorder.mark(bridge_diagnostics)
    recorder.publish(f"{bridge_diagnostics}/refresh", "now")
    wait_for(lambda: len(recorder.on(bridge_diagnostics)) > mark, 20, "diagnostics asked for after them")
    summary = json.loads(recorder.last(bridge_diagnostics) or "{}")
    assert summary["bridge"].get("commands_not_owned", 0) == 0
    assert recorder.on("pico/gone/result/led") == []
    fresh = Recorder(broker, topics=["pico/gone/#", f"homeassistant/+/{GW}_gone/#"])
    try:
        fresh.publish("pico/gone/probe", "p")
        fresh.wait("pico/gone/probe", "p")
        assert [m.topic for m in fresh.received()] == ["pico/gone/probe"]  # nothing retained is left
    finally:
        fresh.close()

    # keep: its link was never touched, and not one reading is missing.
    wait_for(lambda: len(seqs(db, "keep")) > 60, 20, "keep's readings after the reload")
    sent = keep.halt()
    wait_for(lambda: len(seqs(db, "keep")) == sent, 20, "every reading of keep stored")
    assert seqs(db, "keep") == list(range(sent))
    assert keep.hello_requests() == hellos  # its port was not opened again
    statuses = recorder.on("pico/keep/status")
    assert "offline" not in statuses[statuses.index("online"):]  # (before it: the gateway's start)
    out = gw.output()
    assert "added new; removed gone, balcony; restarted moved; 1 device(s) unchanged" in out
    assert values(db, "balcony") == [21.5]  # (22.5 came after its removal)
    assert gw.stop() == 0
    assert " ERROR " not in gw.output()  # (the reload's part stopped cleanly too)


def test_a_config_with_problems_at_reload_changes_nothing(
        tmp_path: Path, broker: Broker, recorder: Recorder, systemd: FakeSystemd, picos: dict[str, Pumped],
        started: list[GatewayProcess]) -> None:
    picos["keep"] = keep = Pumped("keep")
    picos["new"] = new = Pumped("new")
    db = tmp_path / "readings.db"
    config, gw = start(tmp_path, broker, recorder, systemd, started, [uart(keep)])
    keep.pump()
    # A device with a misspelt key and an unusable broker host: every problem is logged with its key.
    config.write_text(config.read_text().replace(f'host = "{broker.host}"', 'host = "mqtt://broker"')
                      + f'[[devices]]\nid = "new"\ntransport = "uart"\nport = "{new.path}"\nbaudrat = 9600\n')
    reload(gw, systemd)
    out = gw.output()
    assert "reload refused" in out and "the running config stays" in out
    assert "mqtt.host" in out and "devices[1] (id 'new').baudrat" in out
    assert "reload refused: 2 problem(s)" in systemd.wait_for(lambda m: True, 0)[-1]  # (its STATUS=)
    recorder.publish(f"pico/bridge/{GW}/diagnostics/refresh", "")
    wait_for(lambda: json.loads(recorder.last(f"pico/bridge/{GW}/diagnostics") or "{}").get("bridge", {})
             .get("reloads_refused") == 1, 20, "the refused reload counted in the bridge diagnostics")
    # The old config runs on: keep's readings are stored, new is not bridged.
    before = len(seqs(db, "keep"))
    wait_for(lambda: len(seqs(db, "keep")) > before + 20, 20, "keep's readings after the refused reload")
    assert recorder.on("pico/new/status") == []
    assert gw.stop() == 0


def test_settings_only_a_restart_applies_are_named(
        tmp_path: Path, broker: Broker, recorder: Recorder, systemd: FakeSystemd, picos: dict[str, Pumped],
        started: list[GatewayProcess]) -> None:
    picos["keep"] = keep = Pumped("keep")
    db = tmp_path / "readings.db"
    # (diagnostics every 2 s, then 1 s: the round after the reload is due within 2 s)
    config, gw = start(tmp_path, broker, recorder, systemd, started, [uart(keep)], diagnostics_interval=2)
    keep.pump()
    other = tmp_path / "other" / "readings.db"
    write_config(config, broker, [uart(keep)], GW, db=other, diagnostics_interval=1)
    reload(gw, systemd)
    out = gw.output()
    assert "store.path changed: restart needed" in out
    assert "restart needed for store.path" in systemd.wait_for(lambda m: True, 0)[-1]
    # The running database stays; diagnostics_interval applies at once.
    before = len(seqs(db, "keep"))
    wait_for(lambda: len(seqs(db, "keep")) > before + 20, 20, "readings in the running database")
    assert not other.exists()
    mark = recorder.mark("pico/keep/diagnostics")
    wait_for(lambda: len(recorder.on("pico/keep/diagnostics")) >= mark + 2, 20, "diagnostics every second")
    assert gw.stop() == 0


def test_compare_names_each_change() -> None:
    """The diff itself, on configs alone: devices by id, and restart-only keys one by one."""
    def config(devices: list[dict], **top: object):
        return parse_config({"gateway_id": "g", **top, "devices": devices})

    a = {"id": "a", "transport": "uart", "port": "/dev/ttyACM0"}
    b = {"id": "b", "transport": "uart", "port": "/dev/ttyACM1"}
    running = config([a, b])
    changes = compare(running, config([{**b, "heartbeat": 5.0}, {**a, "id": "c", "port": "/dev/ttyACM2"}],
                                      mqtt={"host": "broker", "keepalive": 30}, store={"path": "/tmp/x.db"},
                                      diagnostics_interval=5))
    assert [d.id for d in changes.added] == ["c"] and changes.removed == ["a"]
    assert [d.id for d in changes.changed] == ["b"] and changes.unchanged == []
    assert changes.restart_needed == ["mqtt.host", "mqtt.keepalive", "store.path"]
    assert changes.diagnostics_interval == 5
    same = compare(running, config([b, a]))
    assert (same.added, same.removed, same.changed, same.restart_needed) == ([], [], [], [])
    assert same.unchanged == ["b", "a"]
