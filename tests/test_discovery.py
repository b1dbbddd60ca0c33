"""Home Assistant discovery (gateway/discovery.py): payloads against HA's documented keys,
and what a fresh Home Assistant subscribing to ``homeassistant/#`` gets from a real broker."""

from __future__ import annotations

import json

import pytest

from gateway.config import MqttConfig, parse_config
from gateway.discovery import Discovery, DiscoveryConfig
from gateway.mqtt import MqttConnection
from mqtt_helpers import Recorder, wait_for

# Keys Home Assistant documents for MQTT discovery (home-assistant.io/integrations/mqtt,
# "Device discovery payload" and "Supported abbreviations"), full names and the
# abbreviations we use. Anything else in a payload would be rejected or ignored by HA.
ROOT_KEYS = {"dev", "device", "o", "origin", "cmps", "components", "availability", "avty",
             "availability_mode", "avty_mode", "state_topic", "command_topic", "qos", "encoding"}
DEVICE_KEYS = {"ids", "identifiers", "name", "mf", "manufacturer", "mdl", "model", "mdl_id", "model_id",
               "sw", "sw_version", "hw", "hw_version", "sn", "serial_number", "sa", "suggested_area",
               "cu", "configuration_url", "cns", "connections", "via_device"}
ORIGIN_KEYS = {"name", "sw", "sw_version", "url", "support_url"}
AVAILABILITY_KEYS = {"topic", "t", "payload_available", "pl_avail", "payload_not_available", "pl_not_avail",
                     "value_template", "val_tpl"}
COMMON_ENTITY_KEYS = {"p", "platform", "unique_id", "uniq_id", "name", "icon", "ic", "availability", "avty",
                      "availability_mode", "avty_mode", "entity_category", "ent_cat", "enabled_by_default", "en",
                      "state_topic", "stat_t", "value_template", "val_tpl", "device_class", "dev_cla", "qos",
                      "json_attributes_topic", "json_attr_t", "default_entity_id", "def_ent_id", "encoding", "e"}
PLATFORM_KEYS = {
    "sensor": COMMON_ENTITY_KEYS | {"state_class", "stat_cla", "unit_of_measurement", "unit_of_meas",
                                    "suggested_display_precision", "sug_dsp_prc", "expire_after", "exp_aft",
                                    "force_update", "frc_upd"},
    "switch": COMMON_ENTITY_KEYS | {"command_topic", "cmd_t", "payload_on", "pl_on", "payload_off", "pl_off",
                                    "state_on", "stat_on", "state_off", "stat_off", "retain", "ret",
                                    "optimistic", "opt"},
    "binary_sensor": COMMON_ENTITY_KEYS | {"payload_on", "pl_on", "payload_off", "pl_off", "expire_after",
                                           "off_delay"},
}
SENSOR_DEVICE_CLASSES = {"temperature", "duration", "data_size", "timestamp", None}
STATE_CLASSES = {"measurement", "total", "total_increasing", None}


def check_documented(payload: dict) -> None:
    assert set(payload) <= ROOT_KEYS, set(payload) - ROOT_KEYS
    assert set(payload["dev"]) <= DEVICE_KEYS, set(payload["dev"]) - DEVICE_KEYS
    assert isinstance(payload["dev"]["ids"], list) and payload["dev"]["ids"]
    assert set(payload["o"]) <= ORIGIN_KEYS and payload["o"]["name"] == "pico-gateway"
    for key, cmp in payload["cmps"].items():
        platform = cmp["p"]
        assert set(cmp) <= PLATFORM_KEYS[platform], (key, set(cmp) - PLATFORM_KEYS[platform])
        assert cmp["unique_id"]  # required in device discovery
        for avail in cmp.get("availability", []):
            assert set(avail) <= AVAILABILITY_KEYS
        if platform == "sensor":
            assert cmp.get("device_class") in SENSOR_DEVICE_CLASSES
            assert cmp.get("state_class") in STATE_CLASSES
        assert cmp.get("entity_category") in (None, "diagnostic", "config")


def make(devices: list[dict], publish=None, subscribe=None, gateway_id: str = "gw", **cfg) -> Discovery:
    config = parse_config({"gateway_id": gateway_id, "devices": devices})
    return Discovery(DiscoveryConfig(**cfg), gateway_id, "pico", config.devices,
                     publish or (lambda *a: None), subscribe or (lambda *a: None))


DEVICES = [
    {"id": "greenhouse", "transport": "uart", "port": "/dev/serial0"},
    {"id": "porch", "transport": "uart", "port": "/dev/ttyAMA1", "protocol": "tutorial"},
    {"id": "desk", "transport": "usb", "port": "/dev/ttyACM0", "protocol": "tutorial"},
    {"id": "balcony", "transport": "wifi"},
    {"id": "shed", "transport": "tcp", "host": "127.0.0.1", "protocol": "tutorial"},
]


def test_payloads_use_only_documented_keys() -> None:
    d = make(DEVICES)
    check_documented(d.gateway_payload())
    for dev in DEVICES:
        check_documented(d.device_payload(dev["id"]))
    assert d.device_topic("greenhouse") == "homeassistant/device/gw_greenhouse/config"
    assert d.gateway_topic() == "homeassistant/device/gw/config"


def test_picogw_device_entities() -> None:
    p = make(DEVICES).device_payload("greenhouse")
    dev, cmps = p["dev"], p["cmps"]
    assert dev["ids"] == ["gw_greenhouse"] and dev["mf"] == "pico-gateway" and dev["via_device"] == "pico-gateway_gw"
    assert "uart" in dev["mdl"] and "firmware" in dev["mdl"]
    temp = cmps["temp"]
    assert (temp["p"], temp["device_class"], temp["state_class"], temp["unit_of_measurement"]) == \
        ("sensor", "temperature", "measurement", "°C")
    assert temp["state_topic"] == "pico/greenhouse/sensor/temp" and temp["unique_id"] == "gw_greenhouse_temp"
    assert (cmps["uptime"]["device_class"], cmps["uptime"]["state_class"], cmps["uptime"]["unit_of_measurement"]) \
        == ("duration", "total_increasing", "s")
    mem = cmps["mem_free"]
    assert (mem["device_class"], mem["state_class"], mem["unit_of_measurement"], mem["entity_category"]) == \
        ("data_size", "measurement", "B", "diagnostic")
    led = cmps["led"]
    assert led["p"] == "switch" and led["command_topic"] == "pico/greenhouse/cmd/led"
    assert led["state_topic"] == "pico/greenhouse/state/led"
    assert (led["payload_on"], led["payload_off"], led["state_on"], led["state_off"]) == ("on", "off", "on", "off")
    assert led["retain"] is False  # a retained command would replay at every reconnect
    assert led["availability_mode"] == "all"
    assert [a["topic"] for a in led["availability"]] == ["pico/bridge/gw/status", "pico/greenhouse/status"]
    assert all(a["payload_available"] == "online" and a["payload_not_available"] == "offline"
               for a in led["availability"])
    # link counters from the diagnostics JSON
    for component, key in (("seq_gaps", "seq_gaps"), ("errors", "rejected"), ("reconnects", "reconnects"),
                           ("backlog", "backlog"), ("frames", "frames")):
        c = cmps[component]
        assert c["state_topic"] == "pico/greenhouse/diagnostics" and c["entity_category"] == "diagnostic"
        assert key in c["value_template"]
        assert [a["topic"] for a in c["availability"]] == ["pico/bridge/gw/status"]
    last = cmps["last_seen"]
    assert last["device_class"] == "timestamp" and "last_seen_ms" in last["value_template"]
    ids = [c["unique_id"] for c in cmps.values()]
    assert len(ids) == len(set(ids)) and all(i.startswith("gw_greenhouse_") for i in ids)


def test_metrics_by_transport_and_protocol() -> None:
    d = make(DEVICES)
    sensors = lambda dev: sorted(k for k, c in d.device_payload(dev)["cmps"].items()  # noqa: E731
                                 if c["p"] == "sensor" and c.get("state_topic", "").endswith(f"/sensor/{k}"))
    assert sensors("greenhouse") == ["mem_free", "temp", "uptime"]
    assert sensors("porch") == [] and sensors("shed") == []  # tutorial: an LED only
    assert sensors("desk") == ["temp", "uptime"]
    assert "stock MicroPython" in d.device_payload("desk")["dev"]["mdl"]
    assert "Pico W" in d.device_payload("shed")["dev"]["mdl"]
    wifi = d.device_payload("balcony")["cmps"]
    assert "seq_gaps" not in wifi  # the gateway has no link of its own to count on
    assert [a["topic"] for a in wifi["led"]["availability"]] == ["pico/balcony/status"]


def test_gateway_device() -> None:
    p = make(DEVICES).gateway_payload()
    assert p["dev"]["ids"] == ["pico-gateway_gw"]
    conn = p["cmps"]["connectivity"]
    assert (conn["p"], conn["device_class"], conn["state_topic"]) == ("binary_sensor", "connectivity",
                                                                      "pico/bridge/gw/status")
    assert (conn["payload_on"], conn["payload_off"]) == ("online", "offline")


def test_metric_seen_republishes_once_and_ignores_bad_names() -> None:
    sent: list[tuple[str, str, int, bool]] = []
    d = make(DEVICES, publish=lambda *a: sent.append(a))
    d.metric_seen("greenhouse", "temp")  # known: nothing
    assert sent == []
    d.metric_seen("greenhouse", "light")
    assert len(sent) == 1 and sent[0][0] == "homeassistant/device/gw_greenhouse/config" and sent[0][2:] == (1, True)
    light = json.loads(sent[0][1])["cmps"]["light"]
    assert light["state_class"] == "measurement" and light["state_topic"] == "pico/greenhouse/sensor/light"
    d.metric_seen("greenhouse", "light")
    d.metric_seen("greenhouse", "Bad Name/#")
    d.metric_seen("nobody", "x")
    assert len(sent) == 1


def test_disabled_publishes_and_subscribes_nothing() -> None:
    sent: list = []
    subs: list = []
    d = make(DEVICES, publish=lambda *a: sent.append(a), subscribe=lambda *a: subs.append(a), enabled=False)
    d.start()
    d.on_connect()
    d.metric_seen("greenhouse", "light")
    assert sent == [] and subs == []


def test_prefix_is_validated() -> None:
    with pytest.raises(ValueError):
        DiscoveryConfig(prefix="home/#")
    assert make(DEVICES, prefix="ha").device_topic("porch") == "ha/device/gw_porch/config"


# -- against a real broker --------------------------------------------------------------

def connect(broker, devices: list[dict], gateway_id: str = "gw", stale_scan: float | None = None, **cfg):
    """Wired as the daemon does: constructed, hooked and started before the connection."""
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), f"test-{gateway_id}",
                          will=(f"pico/bridge/{gateway_id}/status", "offline"))
    d = make(devices, publish=mqtt.publish, subscribe=mqtt.subscribe, gateway_id=gateway_id, **cfg)
    mqtt.on_connect(d.on_connect)
    d.start(stale_scan=stale_scan)
    mqtt.start()
    assert mqtt.wait_connected(10)
    return mqtt, d


def retained_configs(broker) -> dict[str, dict]:
    """What a Home Assistant starting now would read: the retained configs."""
    ha = Recorder(broker, topics=["homeassistant/#"])
    try:
        # a marker published after subscribing arrives after every retained message
        ha.publish("homeassistant/zz-marker", "x")
        ha.wait("homeassistant/zz-marker")
        with ha._lock:
            return {m.topic: json.loads(m.payload) for m in ha.messages if m.retain and m.payload}
    finally:
        ha.close()


def test_fresh_home_assistant_sees_every_device(broker) -> None:
    mqtt, d = connect(broker, DEVICES[:3])
    try:
        expected = {"homeassistant/device/gw/config"} | {f"homeassistant/device/gw_{x['id']}/config"
                                                         for x in DEVICES[:3]}
        configs = wait_for(lambda: (c := retained_configs(broker)) and set(c) == expected and c, 10,
                           "retained configs of the gateway and 3 Picos")
        for payload in configs.values():
            check_documented(payload)
        assert configs["homeassistant/device/gw_desk/config"]["cmps"]["temp"]["unique_id"] == "gw_desk_temp"
    finally:
        d.stop()
        mqtt.stop()


def test_republishes_after_home_assistant_birth(broker, recorder) -> None:
    mqtt, d = connect(broker, DEVICES[:1], republish_delay=0.3)
    try:
        topic = "homeassistant/device/gw_greenhouse/config"
        recorder.wait(topic)
        before = len(recorder.on(topic))
        recorder.publish("homeassistant/status", "offline")
        recorder.publish("homeassistant/status", "online")
        recorder.wait(topic, count=before + 1, timeout=5)
        assert d.stats["republish_requests"] == 1
        assert json.loads(recorder.last(topic))["cmps"]["led"]["command_topic"] == "pico/greenhouse/cmd/led"
    finally:
        d.stop()
        mqtt.stop()


def test_device_that_left_the_config_is_removed(broker) -> None:
    # an earlier run of gateway "gw" had greenhouse and porch; gateway "gw_x" has "porch" too
    first, d1 = connect(broker, DEVICES[:2])
    other, d2 = connect(broker, [{"id": "porch", "transport": "uart", "port": "/dev/ttyAMA1"}], gateway_id="gw_x")
    wait_for(lambda: {"homeassistant/device/gw_porch/config", "homeassistant/device/gw_x_porch/config"}
             <= set(retained_configs(broker)), 10, "both gateways' configs")
    d1.stop()
    first.stop()
    # now gw runs with greenhouse only: gw_porch goes, gw_x_porch (another gateway) stays
    mqtt, d = connect(broker, DEVICES[:1], stale_scan=0.5)
    try:
        wait_for(lambda: d.stats["removed"] == 1, 10, "the stale config cleared")
        configs = wait_for(lambda: (c := retained_configs(broker)) and "homeassistant/device/gw_porch/config"
                           not in c and c, 10, "gw_porch gone")
        assert "homeassistant/device/gw_greenhouse/config" in configs
        assert "homeassistant/device/gw_x_porch/config" in configs
        # previous_ids from the caller work too, and ignore configured devices
        assert d.remove_stale(["greenhouse", "porch"]) == ["gw_porch"]
    finally:
        d.stop()
        mqtt.stop()
        d2.stop()
        other.stop()


# -- the integration docs ------------------------------------------------------------------

def test_nodered_flow_is_importable() -> None:
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    nodes = json.loads((docs / "nodered-flow.json").read_text())
    assert isinstance(nodes, list)
    by_id = {n["id"]: n for n in nodes}
    assert len(by_id) == len(nodes)  # unique ids
    types = {n["type"] for n in nodes}
    assert {"mqtt in", "mqtt out", "mqtt-broker", "inject", "debug", "function", "tab"} <= types
    broker = next(n for n in nodes if n["type"] == "mqtt-broker")
    assert (broker["broker"], str(broker["port"])) == ("localhost", "1883")
    for n in nodes:
        for outputs in n.get("wires", []):
            assert all(target in by_id for target in outputs), n["id"]
        if n["type"] in ("mqtt in", "mqtt out"):
            assert n["broker"] == broker["id"]
        if "z" in n:
            assert by_id[n["z"]]["type"] == "tab"
    assert any(n["type"] == "mqtt in" and n["topic"] == "pico/+/sensor/+" for n in nodes)
    out = next(n for n in nodes if n["type"] == "mqtt out")
    assert out["topic"] == "pico/greenhouse/cmd/led" and out["retain"] in ("false", False)
    inject = next(n for n in nodes if n["type"] == "inject")
    assert inject["wires"] == [[out["id"]]] and inject["payload"] in ("on", "off", "toggle")


def test_mqtt_cli_doc_covers_every_topic() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt-cli.md").read_text()
    for needle in ("sensor/", "state/led", "cmd/led", "result/led", "/status", "bridge/pi-garden/status",
                   "pico/+/owner", "bridge/+/conflicts", "diagnostics", "-r -n -t pico/greenhouse/cmd/led",
                   "homeassistant/device/"):
        assert needle in text, needle


def test_the_running_gateway_announces_its_picos_to_home_assistant(virtual, broker, recorder) -> None:
    """Through `pico-gateway run`: what a fresh Home Assistant finds, and the switch works."""
    fleet, _ = virtual([{"id": "greenhouse", "transport": "uart", "port": "sim", "read_interval": 0.2}])
    fresh = type(recorder)(broker, topics=["homeassistant/#"])  # subscribes after the fact: retained only
    try:
        config = json.loads(fresh.wait("homeassistant/device/testgw_greenhouse/config")[0])
        switch = next(c for c in config["cmps"].values() if c["p"] == "switch")
        assert switch["command_topic"] == "pico/greenhouse/cmd/led"
        assert switch["state_topic"] == "pico/greenhouse/state/led"
        fresh.wait("homeassistant/device/testgw/config")
        recorder.publish(switch["command_topic"], switch["payload_on"])  # what HA sends when switched on
        fleet["greenhouse"].wait_led("on")
    finally:
        fresh.close()
