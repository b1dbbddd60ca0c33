"""Health means progress, and a link never dies of a bug.

Real parts: a private mosquitto and a real MqttConnection.
"""

from __future__ import annotations

import pytest

from gateway.config import MqttConfig
from gateway.mqtt import MqttConnection
from mqtt_helpers import Broker, Recorder, wait_for


# -- one MQTT handler raising ------------------------------------------------------------------

def test_one_raising_handler_does_not_keep_a_message_from_the_others(
        broker: Broker, recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    got: list[bytes] = []

    def broken(topic: str, payload: bytes, retained: bool) -> None:
        raise RuntimeError("a bug in a handler")

    recorder.publish("pico/shed/cmd/led", "on", retain=True)  # delivered at subscribe: no race with it
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "handlers-test", None)
    mqtt.subscribe("pico/+/cmd/led", broken)
    mqtt.subscribe("pico/shed/cmd/led", lambda topic, payload, retained: got.append(payload))
    mqtt.start()
    try:
        wait_for(lambda: b"on" in got, 10, "the retained message, in the second handler")
        recorder.publish("pico/shed/cmd/led", "off")
        recorder.publish("pico/shed/cmd/led", "toggle")
        wait_for(lambda: b"toggle" in got, 10, "both live messages, in the second handler")
        # (mosquitto sends a copy per matching subscription: each copy reaches both handlers)
        assert set(got) == {b"on", b"off", b"toggle"} and mqtt.stats["callback_errors"] == len(got)
    finally:
        mqtt.stop()
    logged = [r for r in caplog.records if r.name == "gateway.mqtt" and r.exc_info is not None]
    assert len(logged) == 1 and "broken" in logged[0].getMessage()  # once per handler and kind
