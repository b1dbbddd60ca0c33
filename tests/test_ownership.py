"""One device id claimed by two gateways on one broker, and the claim going away.

Real parts: a private mosquitto, and gateways made of the daemon's own parts
in-process (MqttConnection with its last will, Bridge, SQLite, uart links on
pseudo-terminals, Diagnostics), stopped the way the daemon stops them; a crashed
gateway is an MQTT client with the gateway's last will, killed with SIGKILL.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from inprocess import InProcessGateway
from mqtt_helpers import Broker, Recorder, wait_for
from peers import PicogwPeer

from gateway import ownership
from gateway.config import MqttConfig
from gateway.status import fetch_retained

OWNED = {"pico/greenhouse/status": "online", "pico/greenhouse/owner": "pi-a", "pico/greenhouse/state/led": "off"}


@pytest.fixture
def gateways(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ownership, "CLAIMS_SPACING", 0.1)  # (1 s in the gateway: a test need not wait that long)
    started: list[InProcessGateway] = []
    yield started
    for gw in started:
        gw.stop()


def conflicts(recorder: Recorder, gateway_id: str) -> dict:
    last = recorder.last(f"pico/bridge/{gateway_id}/conflicts")
    return json.loads(last)["devices"] if last else {}


def retained(broker: Broker, *topics: str) -> list[str]:
    """What the broker holds now, as a new subscriber (Home Assistant after a restart) gets it."""
    view = fetch_retained(MqttConfig(host=broker.host, port=broker.port), list(topics), timeout=5)
    assert view.reachable, view.error
    return [view.messages.get(t, b"").decode() for t in topics]


def settles_to(broker: Broker, recorder: Recorder, expected: dict[str, str], what: str) -> None:
    """The last message on each topic becomes the expected one, and the broker holds it, retained."""
    wait_for(lambda: all(recorder.last(t) == p for t, p in expected.items()), 10, what)
    assert retained(broker, *expected) == list(expected.values())


class CrashingGateway:
    """An MQTT client with a gateway's id and last will, killed with SIGKILL: a gateway that
    crashed. What it claimed is published for it, retained, as the gateway would have."""

    def __init__(self, broker: Broker, recorder: Recorder, gateway_id: str) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-i", f"pico-gateway-{gateway_id}",
             "-t", f"pico/bridge/{gateway_id}/alive", "--will-topic", f"pico/bridge/{gateway_id}/status",
             "--will-payload", "offline", "--will-qos", "1", "--will-retain"], stdout=subprocess.PIPE)
        # connected once it hears its own topic (a retained message, delivered at its subscription)
        recorder.publish(f"pico/bridge/{gateway_id}/alive", "yes", retain=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"yes\n"
        recorder.publish(f"pico/bridge/{gateway_id}/alive", "", retain=True)
        recorder.publish(f"pico/bridge/{gateway_id}/status", "online", retain=True)

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_the_owner_republishes_its_state_when_the_other_claim_goes_away(
        tmp_path: Path, broker: Broker, recorder: Recorder, gateways: list[InProcessGateway],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ownership")
    # A claim left by a gateway that crashed long ago: its will said offline.
    recorder.publish("pico/bridge/pi-old/status", "offline", retain=True)
    recorder.publish("pico/porch/owner", "pi-old", retain=True)
    recorder.publish("pico/porch/status", "online", retain=True)  # its last word on porch

    pico = PicogwPeer("greenhouse")  # its LED is off, and its hello says so
    try:
        owner = InProcessGateway(broker, tmp_path, "pi-a", {"greenhouse": pico.path,
                                                             "porch": str(tmp_path / "ttyUSB3")}).start()
        gateways.append(owner)
        # The stale claim is taken back, with our state, and not reported as a conflict.
        settles_to(broker, recorder, {"pico/porch/owner": "pi-a", "pico/porch/status": "offline"},
                   "pi-a's claim and state of porch over the stale ones")
        assert "porch" not in conflicts(recorder, "pi-a")
        assert any("'porch' was claimed by gateway 'pi-old', which is offline" in m for m in caplog.messages)
        assert not any("also claimed by gateway 'pi-old'" in m for m in caplog.messages)
        recorder.wait("pico/greenhouse/status", "online", timeout=10)
        recorder.wait("pico/greenhouse/state/led", "off", timeout=10)

        # A second gateway whose config has greenhouse too (its Pico is not there): both see the conflict,
        # and its announcement leaves greenhouse offline on the broker.
        wrong = InProcessGateway(broker, tmp_path, "pi-b", {"greenhouse": str(tmp_path / "ttyUSB9")}).start()
        gateways.append(wrong)
        wait_for(lambda: conflicts(recorder, "pi-a").get("greenhouse") == ["pi-b"], 10, "pi-a seeing pi-b's claim")
        wait_for(lambda: recorder.last("pico/greenhouse/status") == "offline", 10, "pi-b's offline for greenhouse")

        # It is stopped (the fix): its last words are greenhouse offline, its claim deleted, itself offline.
        # The owner restores greenhouse at once, without a restart.
        wrong.stop()
        settles_to(broker, recorder, OWNED, "pi-a's status, claim and LED state of greenhouse on the broker again")
        wait_for(lambda: conflicts(recorder, "pi-a") == {}, 10, "the conflict gone from pi-a's conflicts")
        assert owner.bridge.stats["owner_conflicts_ended"] == 1

        # A gateway that claims greenhouse and then crashes: its last will, not a clean stop.
        crashing = CrashingGateway(broker, recorder, "pi-c")
        try:
            for topic, payload in (("pico/greenhouse/owner", "pi-c"), ("pico/greenhouse/status", "offline"),
                                   ("pico/greenhouse/state/led", "on")):
                recorder.publish(topic, payload, retain=True)
            wait_for(lambda: conflicts(recorder, "pi-a").get("greenhouse") == ["pi-c"], 10, "pi-c's claim seen")
        finally:
            crashing.crash()
        settles_to(broker, recorder, OWNED, "pi-a's state of greenhouse over the crashed gateway's")
        wait_for(lambda: conflicts(recorder, "pi-a") == {}, 10, "pi-c gone from the conflicts")
        assert any("gateway 'pi-c', which also claimed 'greenhouse', is offline" in m for m in caplog.messages)
    finally:
        for gw in gateways:
            gw.stop()
        pico.close()
