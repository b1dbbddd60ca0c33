"""Several gateways and recorders on one broker (docs/scaling.md)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from peers import PicogwPeer

from gateway.processes import stop_process
from gateway.recorder import parse_reading
from gateway.topics import Topics

N = 150  # readings per serial Pico


def rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return conn.execute("SELECT device, metric, value, ts FROM readings").fetchall()
        except sqlite3.OperationalError:
            return []  # the recorder has not created its table yet


class RecorderProcess:
    def __init__(self, tmp: Path, broker: Broker, watcher: Recorder, rid: str) -> None:
        self.db = tmp / f"{rid}.db"
        config = write_config(tmp / f"{rid}.toml", broker, [], gateway_id=rid, db=tmp / "unused.db")
        config.write_text(config.read_text() + f'[recorder]\nid = "{rid}"\npath = "{self.db}"\n')
        self.log = tmp / f"{rid}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "record", "--config", str(config)],
                                         stdout=out, stderr=out, cwd=REPO)
        watcher.wait(f"pico/bridge/{rid}/recorder", "online", timeout=15)

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture
def peers() -> Iterator[dict[str, PicogwPeer]]:
    made = {name: PicogwPeer(name) for name in ("alpha", "beta")}
    yield made
    for peer in made.values():
        peer.close()


def test_parse_reading_uses_ts_and_refuses_what_is_not_a_reading() -> None:
    t = Topics("pico")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("ts", "1764070000123")
    assert parse_reading(t, "pico/shed/sensor/temp", b"21.5", props, 5) == ("shed", "temp", 21.5, 1764070000123, None)
    assert parse_reading(t, "pico/shed/sensor/temp", b"21.5", None, 5) == ("shed", "temp", 21.5, 5, None)
    for topic, payload in [("pico/bridge/sensor/x", b"1"), ("pico/Shed/sensor/t", b"1"), ("pico/a/sensor/t", b"nan"),
                           ("pico/a/sensor/t", b"1" * 40), ("pico/a/sensor/t;rm", b"1"), ("pico/a/state/led", b"1"),
                           ("pico/a/sensor/t", b"\xff")]:
        assert parse_reading(t, topic, payload, None, 5) is None, (topic, payload)


def test_two_gateways_two_recorders_one_broker(tmp_path: Path, broker: Broker, recorder: Recorder,
                                               peers: dict[str, PicogwPeer]) -> None:
    # A retained "reading" (never published by us): mosquitto 2.0.11 replays it to shared
    # subscribers; the recorders must not store it.
    recorder.publish("pico/ghost/sensor/temp", "99", retain=True)
    recorders = [RecorderProcess(tmp_path, broker, recorder, rid) for rid in ("rec-1", "rec-2")]
    gateways: list[GatewayProcess] = []
    try:
        for gw_id, own in (("pi-a", "alpha"), ("pi-b", "beta")):
            # Both configs claim the wifi Pico "dup": a duplicate device id across gateways.
            devices = [{"id": own, "transport": "uart", "port": peers[own].path}, {"id": "dup", "transport": "wifi"}]
            config = write_config(tmp_path / f"{gw_id}.toml", broker, devices, gateway_id=gw_id,
                                  db=tmp_path / f"{gw_id}.db")
            gateways.append(GatewayProcess(config, recorder, gw_id))
        for own in peers:
            recorder.wait(f"pico/{own}/status", "online", timeout=15)

        # Each gateway owns its own devices; both report the device they both claim.
        for gw_id, other in (("pi-a", "pi-b"), ("pi-b", "pi-a")):
            wait_for(lambda gw_id=gw_id, other=other: any(json.loads(p).get("devices", {}).get("dup") == [other]
                                                          for p in recorder.on(f"pico/bridge/{gw_id}/conflicts")), 10,
                     f"{gw_id} reporting 'dup' claimed by {other}")
        log = gateways[0].output()  # both gateways log to tmp_path/gateway.log
        assert "'dup' is also claimed by gateway 'pi-b'" in log and "'dup' is also claimed by gateway 'pi-a'" in log
        assert recorder.last("pico/alpha/owner") == "pi-a" and recorder.last("pico/beta/owner") == "pi-b"

        for i in range(N):
            peers["alpha"].reading(temp=i)
            peers["beta"].reading(temp=1000 + i)
        for i in range(5):
            recorder.publish("pico/dup/sensor/temp", str(5000 + i))  # the wifi Pico itself
        expected = Counter([("alpha", float(i)) for i in range(N)] + [("beta", float(1000 + i)) for i in range(N)]
                           + [("dup", float(5000 + i)) for i in range(5)])

        def stored() -> Counter:
            return Counter((d, v) for r in recorders for d, _, v, _ in rows(r.db))

        wait_for(lambda: sum(stored().values()) >= sum(expected.values()), 20, "every reading in a recorder")
        # Exactly once across the two recorders (none lost, none twice), and both took a share.
        assert stored() == expected
        shares = [len(rows(r.db)) for r in recorders]
        assert all(share > 0 for share in shares), shares
        # Each gateway stored its own Pico's readings, and the recorders have every one of them.
        assert {(d, v) for d, _, v, _ in rows(tmp_path / "pi-a.db") if d == "alpha"} == \
            {k for k in expected if k[0] == "alpha"}
    finally:
        for gw in gateways:
            gw.stop()
        codes = [r.stop() for r in recorders]
        recorder.publish("pico/ghost/sensor/temp", "", retain=True)
    assert codes == [0, 0]
    assert all("Traceback" not in r.log.read_text() for r in recorders)
