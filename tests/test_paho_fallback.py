"""The paho internals behind the fast MQTT path: checked at start-up, and when they are not
there, paho's public API carries the same readings, commands and answers."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import GatewayProcess
from mqtt_helpers import Recorder, wait_for
from peers import TutorialTcpPeer

from gateway import paho_internals
from gateway.config import MqttConfig
from gateway.mosquitto import PrivateBroker
from gateway.mqtt import MqttConnection, published, published_public
from gateway.outbox import Outbox, OutboxSettings
from gateway.store import Store
from gateway.topics import Topics


def test_the_fast_path_runs_on_the_installed_paho(monkeypatch: pytest.MonkeyPatch) -> None:
    # The canary: a paho release that moves any internal the fast path uses fails here, loudly,
    # instead of quietly sending the gateway down the slower public path.
    monkeypatch.delenv(paho_internals.PUBLIC_ONLY_ENV, raising=False)
    assert paho_internals.problem() is None, f"paho-mqtt {paho_internals.paho_version()}: {paho_internals.problem()}"
    mqtt = MqttConnection(MqttConfig(), "canary", None)
    assert mqtt.fast_path and isinstance(mqtt.client, paho_internals.FastClient)


def _broken(monkeypatch: pytest.MonkeyPatch, target: object, name: str, value: object = None) -> str | None:
    with monkeypatch.context() as patch:
        if value is None:
            patch.delattr(target, name)
        else:
            patch.setattr(target, name, value)
        paho_internals.recheck()
        try:
            return paho_internals.problem()
        finally:
            paho_internals.recheck()  # (the next call checks the real paho again)


def test_the_check_names_an_internal_that_moved_and_the_gateway_falls_back(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert _broken(monkeypatch, paho.Client, "_packet_queue") == "paho.Client._packet_queue is gone"
    renamed = _broken(monkeypatch, paho.Client, "_sock_recv", lambda self, size: b"")
    assert renamed is not None and "_sock_recv" in renamed
    # Same name and parameters, other behaviour: paho's PUBACK handling no longer completes a message.
    ignored = _broken(monkeypatch, paho.Client, "_handle_pubackcomp", lambda self, cmd: paho.MQTT_ERR_SUCCESS)
    assert ignored is not None and "PUBACK (reason 0x87)" in ignored
    with monkeypatch.context() as patch:
        patch.delattr(paho.Client, "_do_on_publish")
        paho_internals.recheck()
        try:
            mqtt = MqttConnection(MqttConfig(), "moved", None)
        finally:
            paho_internals.recheck()
    assert not mqtt.fast_path and type(mqtt.client) is paho.Client
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "fast MQTT path is off" in r.message]
    assert len(warning) == 1 and f"paho-mqtt {paho_internals.paho_version()}" in warning[0].message
    assert "_do_on_publish is gone" in warning[0].message


def test_published_through_pahos_public_api() -> None:
    queued, lost, never = paho.MQTTMessageInfo(1), paho.MQTTMessageInfo(2), paho.MQTTMessageInfo(3)
    assert not published_public(queued)
    paho_internals.mark_published(queued)
    lost.rc = paho.MQTT_ERR_CONN_LOST  # a QoS 0 message a reconnect found unwritten: done, and its rc says lost
    never.rc = paho.MQTT_ERR_NO_CONN  # never queued
    assert [published_public(i) for i in (queued, lost, never)] == [True, True, False]


def test_a_gateway_on_pahos_public_api_publishes_qos0_readings_and_answers_commands(
        tmp_path: Path, broker: PrivateBroker, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paho_internals.PUBLIC_ONLY_ENV, "1")  # (the gateway's process inherits it)
    peer = TutorialTcpPeer(readings="temp=21.5 uptime=7")
    config = tmp_path / "gw.toml"
    config.write_text(f'gateway_id = "publicgw"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                      f'readings_qos = 0\n[store]\npath = "{tmp_path / "readings.db"}"\n[homeassistant]\n'
                      'enabled = false\n[[devices]]\nid = "shed"\ntransport = "tcp"\nhost = "127.0.0.1"\n'
                      f'port = {peer.port}\npoll_interval = 0.2\n')
    gw = GatewayProcess(config, recorder, "publicgw")
    try:
        recorder.wait("pico/shed/sensor/temp", "21.5", count=2)
        recorder.publish("pico/shed/cmd/led", "on")
        answer = json.loads(recorder.wait("pico/shed/result/led")[0])  # an answer at QoS 1
        assert answer["ok"] is True and answer["state"] == "on" and peer.led is True

        def sent() -> int:  # readings the outbox saw written (QoS 0): marked sent in the database
            with sqlite3.connect(tmp_path / "readings.db") as db:
                return db.execute("SELECT count(*) FROM readings WHERE device = 'shed' AND sent = 1").fetchone()[0]

        wait_for(lambda: sent() >= 2, 10, "readings marked sent")
    finally:
        code = gw.stop()
        peer.close()
    assert code == 0
    assert f"paho-mqtt {paho_internals.paho_version()}: the fast MQTT path is off (turned off by " \
           f"{paho_internals.PUBLIC_ONLY_ENV}=1)" in gw.output()


def test_qos1_readings_on_pahos_public_api_even_those_queued_before_the_connection(
        tmp_path: Path, broker: PrivateBroker, recorder: Recorder) -> None:
    store = Store(tmp_path / "r.db")
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "public-qos1", None, fast_path=False)
    outbox = Outbox(store, mqtt, Topics(), OutboxSettings(qos=1))
    # A QoS 1 message published while there is no connection: paho keeps it and sends it once
    # connected; paho's public API must then see it acknowledged (the outbox and the command
    # answers wait on that), where paho's own is_published() would raise for ever.
    early = mqtt.publish_message("pico/d/result/led", '{"ok": true}', 1, None)
    assert early.rc == paho.MQTT_ERR_SUCCESS
    mqtt.start()
    outbox.start()
    try:
        assert mqtt.wait_connected(10)
        wait_for(lambda: published(early) and published_public(early), 10, "the early message acknowledged")
        now = int(time.time() * 1000)
        outbox.put([("d", "temp", float(i), now + i, i) for i in range(1, 41)])  # more than paho's 20 in flight
        wait_for(lambda: len(recorder.on("pico/d/sensor/temp")) == 40, 10, "40 readings")
        assert recorder.on("pico/d/sensor/temp") == [str(i) for i in range(1, 41)]
        assert all(m.qos == 1 for m in recorder.messages if m.topic == "pico/d/sensor/temp")
        # Each acknowledgement seen: every reading marked sent in the database.
        wait_for(lambda: not store.count_unsent_by_device(), 10, "every reading marked sent")
    finally:
        outbox.stop()
        mqtt.stop()
        store.close()
