"""gateway/mqtt.py against a real mosquitto: what paho does not give us by itself."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_helpers import Recorder, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttConfig
from gateway.mosquitto import PrivateBroker
from gateway.mqtt import MqttConnection, published, remaining_length
from gateway.paho_internals import FastClient


def test_remaining_length_is_mqtts_variable_length_integer() -> None:
    # MQTT 5.0 spec, 1.5.5: the boundaries of one to four bytes.
    assert remaining_length(0) == b"\x00"
    assert remaining_length(127) == b"\x7f"
    assert remaining_length(128) == b"\x80\x01"
    assert remaining_length(16_383) == b"\xff\x7f"
    assert remaining_length(16_384) == b"\x80\x80\x01"
    assert remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "public-api"])
def test_publish_many_delivers_every_message_exactly_and_in_order(broker: PrivateBroker, recorder: Recorder,
                                                                  fast_path: bool) -> None:
    """The batch path encodes PUBLISH packets itself: a subscriber must get the same
    topics and payloads, in the same order, as from paho's own publish; short and long
    packets (one and two length bytes) and a non-ASCII topic included. Without the fast
    path (paho's public API), the same."""
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "batch-test", None, report_refusals=False,
                          fast_path=fast_path)
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        sent = [(f"pico/d{i % 3}/sensor/t", str(i)) for i in range(300)]
        sent += [("pico/d0/sensor/long", "x" * 200), ("pico/café/sensor/t", "22.5"), ("pico/d1/sensor/t", "")]
        infos = [mqtt.publish_many(sent[i:i + 64]) for i in range(0, len(sent), 64)]
        wait_for(lambda: all(published(info) for info in infos), 10, "every batch written")
        assert all(info.rc == 0 for info in infos)
        wait_for(lambda: len(recorder.on("pico/#")) == len(sent), 10, "every message")
        got = [(m.topic, m.payload.decode()) for m in recorder.messages if m.topic.startswith("pico/")]
        assert got == sent
        assert all(m.qos == 0 and not m.retain for m in recorder.messages)
        answer = mqtt.publish_message("pico/d0/result/led", '{"ok": true}', 1, None)  # (how commands are answered)
        wait_for(lambda: published(answer), 10, "the answer acknowledged")
        assert mqtt.stats["published"] == len(sent) + 1  # diagnostics count every message, however sent
    finally:
        mqtt.stop()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "public-api"])
def test_publish_many_without_a_connection_or_with_a_wildcard_topic(fast_path: bool) -> None:
    mqtt = MqttConnection(MqttConfig(host="127.0.0.1", port=1), "batch-offline", None, report_refusals=False,
                          fast_path=fast_path)
    info = mqtt.publish_many([("pico/d/sensor/t", "1")])
    assert info.rc != 0 and not published(info)  # nothing queued: the caller keeps it for later
    with pytest.raises(ValueError, match="not a topic"):
        mqtt.publish_many([("pico/+/sensor/t", "1")])


def test_a_burst_of_messages_is_handled_at_once(broker: PrivateBroker, recorder: Recorder) -> None:
    # FastClient reads the socket in large chunks and hands paho one packet at a time:
    # what it holds is invisible to select(), so the loop must not sleep while it holds any
    # (it would then take one TICK per message once the burst is over).
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "burst-test", None)
    got: list[bytes] = []
    mqtt.subscribe("burst/#", lambda topic, payload, retained: got.append(payload), qos=0)
    recorder.publish("burst/ready", "0", retain=True)  # delivered when the subscription is in place
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        wait_for(lambda: got, 5, "the subscription")
        for i in range(1, 2001):
            recorder.client.publish("burst/x", str(i), qos=0)
        wait_for(lambda: len(got) == 2001, 5, "2,000 messages")
        assert got[1:] == [str(i).encode() for i in range(1, 2001)]
    finally:
        mqtt.stop()
        recorder.publish("burst/ready", "", retain=True)


def test_queued_packets_are_joined_only_where_paho_has_nothing_to_do_once_written() -> None:
    # paho acts when a QoS 0 PUBLISH has been written (its info is marked published) and
    # when a DISCONNECT has (it closes the socket): those stay entries of their own; runs
    # of anything else (QoS 1 PUBLISH, acks, pings) become one entry, in order.
    client = FastClient(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_socket_register_write = lambda *a: None  # (no network loop here)
    info = paho.MQTTMessageInfo(3)
    queue = [(paho.PUBLISH | 2, b"A", 1, 1, None), (paho.PUBLISH | 2, b"B", 2, 1, None),
             (paho.PUBLISH, b"C", 3, 0, info), (paho.PUBACK, b"D", 4, 0, None), (paho.PUBLISH | 2, b"E", 5, 1, None),
             (paho.DISCONNECT, b"F", 0, 0, None), (paho.PUBLISH | 2, b"G", 6, 1, None)]
    # The fast path's own parts: paho's output queue and FastClient's merge of it, as
    # gateway/paho_internals.py (the one module allowed to) uses them.
    put = client._packet_queue  # noqa: SLF001 -- see above
    merge = client._merge_queued  # noqa: SLF001 -- see above
    out = client._out_packet  # noqa: SLF001 -- see above (the deque itself: merged in place)
    for command, data, mid, qos, packet_info in queue:
        put(command, bytearray(data), mid, qos, packet_info)
    merge()
    entries = list(out)
    assert [bytes(e["packet"]) for e in entries] == [b"AB", b"C", b"DE", b"F", b"G"]
    assert entries[1]["info"] is info and entries[3]["command"] == paho.DISCONNECT
    assert all(e["to_process"] == len(e["packet"]) for e in entries)
    merge()  # a merged entry is not copied again (a socket that takes nothing)
    assert [bytes(e["packet"]) for e in out] == [b"AB", b"C", b"DE", b"F", b"G"]
    out.clear()
    for data in (b"H", b"I", b"J"):
        put(paho.PUBLISH | 2, bytearray(data), 7, 1, None)
    out[0]["pos"] = 1  # partly written: stays as it is
    merge()
    assert [bytes(e["packet"]) for e in out] == [b"H", b"IJ"]


def test_a_refused_password_is_said_once_and_never_as_an_unreachable_broker(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway itself (daemon.run, in a thread), its wait for the broker shortened: once it
    # gives up waiting, the log must not add "not reachable yet" to the refusal it has already
    # explained, and each retry meets the same refusal without repeating the error.
    from gateway import daemon
    from gateway.config import parse_config

    (tmp_path / "passwd").write_text("")  # the broker knows no user: everyone is refused
    broker = PrivateBroker(tmp_path / "broker", password_file=tmp_path / "passwd").start()
    (tmp_path / "gw-password").write_text("not-the-password\n")
    config = parse_config({"gateway_id": "refused", "devices": [], "homeassistant": {"enabled": False},
                           "store": {"path": str(tmp_path / "r.db")},
                           "mqtt": {"host": broker.host, "port": broker.port, "username": "pico-gateway",
                                    "password_file": str(tmp_path / "gw-password")}})
    monkeypatch.setattr(daemon, "BROKER_WAIT", 1.0)
    caplog.set_level(logging.DEBUG, logger="gateway")
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(config, stop), daemon=True)
    runner.start()
    try:
        def refusals(level: int) -> int:
            return sum(1 for r in caplog.records if r.levelno == level and "refused user 'pico-gateway'" in r.message)

        wait_for(lambda: refusals(logging.DEBUG) >= 1 and "gateway refused running" in caplog.text, 10,
                 "a retry refused again, and the gateway running")
    finally:
        stop.set()
        runner.join(10)
        broker.stop()
    assert refusals(logging.ERROR) == 1
    assert "check mqtt.username" in caplog.text
    assert "not reachable" not in caplog.text


def test_another_client_with_our_client_id_is_named_once_and_the_retries_slow_down(
        broker: PrivateBroker, caplog: pytest.LogCaptureFixture) -> None:
    # mosquitto closes the older of two connections with one client id, without a word (no
    # DISCONNECT; paho says "Unspecified error"). Here a second client takes the id each time
    # the gateway's connection is up, as a second gateway with the same gateway_id would.
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "pico-gateway-twin", None)
    drops: list[float] = []
    connects: list[float] = []
    mqtt.on_connect(lambda: connects.append(time.monotonic()))
    mqtt.on_disconnect(lambda: drops.append(time.monotonic()))
    others: list[paho.Client] = []
    mqtt.start()
    try:
        for kick in range(1, 4):
            wait_for(lambda kick=kick: len(connects) == kick, 10, f"connection {kick}")
            other = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="pico-gateway-twin",
                                protocol=paho.MQTTv5)
            other.connect(broker.host, broker.port)  # (writes its CONNECT; it never reconnects)
            others.append(other)
            wait_for(lambda kick=kick: len(drops) == kick, 10, f"drop {kick}")
        wait_for(lambda: "another client is most likely connected" in caplog.text, 5, "the conflict named")
    finally:
        mqtt.stop()
        for other in others:
            other.disconnect()
    conflict = [r.message for r in caplog.records if "another client" in r.message]
    assert len(conflict) == 1 and "'pico-gateway-twin'" in conflict[0] and "gateway_id" in conflict[0]
    assert caplog.text.count("disconnected from the broker") == 2  # the first two drops, before the pattern
    # A connection kicked at once does not reset the backoff: the third attempt waited 2 s, not 1.
    assert connects[2] - drops[1] >= 1.9
    assert mqtt.stats["client_id_conflicts"] == 1


def test_a_subscription_and_a_hook_are_taken_back_by_what_adding_them_returned(broker: PrivateBroker,
                                                                                 recorder: Recorder) -> None:
    """Whoever subscribes can unsubscribe: its handler gets nothing more, a second handler on
    the same filter still does, and the broker is told only when no handler wants the filter."""
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "remover-test", None, report_refusals=False)
    first: list[bytes] = []
    second: list[bytes] = []
    connects: list[int] = []
    remove_first = mqtt.subscribe("pico/t/cmd/led", lambda topic, payload, retained: first.append(payload))
    remove_second = mqtt.subscribe("pico/t/cmd/led", lambda topic, payload, retained: second.append(payload))
    remove_hook = mqtt.on_connect(lambda: connects.append(1))
    later: list[bytes] = []
    # subscribed last: once a probe arrives, the broker has the subscriptions before it too
    mqtt.subscribe("pico/t/probe", lambda topic, payload, retained: later.append(payload))
    mqtt.start()
    try:
        assert mqtt.wait_connected(10)
        wait_for(lambda: connects, 5, "the connect hook")
        wait_for(lambda: (recorder.publish("pico/t/probe", "x"), later)[1], 5, "a probe")
        recorder.publish("pico/t/cmd/led", "on")
        wait_for(lambda: first and second, 5, "both handlers")
        remove_first()
        remove_first()  # (twice is harmless)
        recorder.publish("pico/t/cmd/led", "off")
        wait_for(lambda: len(second) == 2, 5, "the handler still subscribed")
        assert first == [b"on"]
        remove_second()
        remove_hook()
        # a message published now reaches no handler: the next message on a filter still
        # subscribed comes after it, so it is not merely late
        recorder.publish("pico/t/cmd/led", "on")
        recorder.publish("pico/t/probe", "y")
        wait_for(lambda: b"y" in later, 5, "the second probe")
        assert second == [b"on", b"off"]
    finally:
        mqtt.stop()
