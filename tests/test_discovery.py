"""Home Assistant discovery (gateway/discovery.py): payloads against HA's documented keys,
and what a fresh Home Assistant subscribing to ``homeassistant/#`` gets from a real broker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mqtt_helpers import Recorder, wait_for

from gateway.config import MqttConfig, parse_config
from gateway.discovery import Discovery, DiscoveryConfig
from gateway.mqtt import MqttConnection

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


def check_entity_documented(topic: str, config: dict) -> None:
    """One entity-mode config: <prefix>/<platform>/<node>/<key>/config, the entity's own keys
    plus the device and origin blocks (no platform key: the topic names it)."""
    platform = topic.split("/")[1]
    keys = PLATFORM_KEYS[platform] - {"p", "platform"} | {"dev", "device", "o", "origin"}
    assert set(config) <= keys, (topic, set(config) - keys)
    assert config["unique_id"] and isinstance(config["dev"]["ids"], list)
    assert set(config["dev"]) <= DEVICE_KEYS and config["o"]["name"] == "pico-gateway"


def make(devices: list[dict], publish=None, subscribe=None, gateway_id: str = "gw", **cfg) -> Discovery:
    config = parse_config({"gateway_id": gateway_id, "devices": devices})
    return Discovery(DiscoveryConfig(**cfg), gateway_id, "pico", config.devices,
                     publish or (lambda *a: None), subscribe or (lambda *a: None), migrate_wait=0.2)


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


def entities(configs: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """unique_id -> (discovery id "<node> <key>", the entity as Home Assistant reads it: its own
    options, platform, device and origin), from configs of either mode."""
    found: dict[str, tuple[str, dict]] = {}
    for topic, config in configs.items():
        parts = topic.split("/")
        if parts[1] == "device":
            shared = {"dev": config["dev"], "o": config["o"]}
            for key, cmp in config["cmps"].items():
                found[cmp["unique_id"]] = (f"{parts[2]} {key}", {**cmp, **shared})
        else:
            found[config["unique_id"]] = (f"{parts[2]} {parts[3]}", {**config, "p": parts[1]})
    return found


def all_configs(d: Discovery) -> dict[str, dict]:
    configs = d.gateway_configs()
    for device in d.devices:
        configs |= d.device_configs(device)
    return configs


def test_entity_mode_announces_every_entity_device_mode_does() -> None:
    by_device, by_entity = make(DEVICES), make(DEVICES, mode="entity")
    for d in (by_device, by_entity):  # (what firmware_seen adds to the device block, in both)
        d.firmware_seen("greenhouse", "0.1.0")
    device_form, entity_form = all_configs(by_device), all_configs(by_entity)
    assert all(t.startswith("homeassistant/device/") for t in device_form) and len(device_form) == 6
    for topic, config in entity_form.items():
        check_entity_documented(topic, config)
    # Same entities, same discovery ids (what lets HA hand them over), and each one the same
    # entity: unique id, state and command topics, availability, device and origin blocks.
    assert entities(entity_form) == entities(device_form)
    temp = entity_form["homeassistant/sensor/gw_greenhouse/temp/config"]
    assert (temp["state_topic"], temp["dev"]["ids"], temp["dev"]["sw"]) == \
        ("pico/greenhouse/sensor/temp", ["gw_greenhouse"], "0.1.0")
    assert [a["topic"] for a in temp["availability"]] == ["pico/bridge/gw/status", "pico/greenhouse/status"]
    led = entity_form["homeassistant/switch/gw_greenhouse/led/config"]
    assert led["command_topic"] == "pico/greenhouse/cmd/led" and led["dev"]["via_device"] == "pico-gateway_gw"
    conn = entity_form["homeassistant/binary_sensor/gw/connectivity/config"]
    assert conn["state_topic"] == "pico/bridge/gw/status" and conn["dev"]["ids"] == ["pico-gateway_gw"]
    # A new metric comes as one more entity config, the others again with it.
    sent: list[tuple[str, str, int, bool]] = []
    make(DEVICES, publish=lambda *a: sent.append(a), mode="entity").metric_seen("greenhouse", "light")
    light = {t: json.loads(p) for t, p, _, _ in sent}["homeassistant/sensor/gw_greenhouse/light/config"]
    assert light["state_topic"] == "pico/greenhouse/sensor/light"
    assert len(sent) == 1 + sum(t.split("/")[2] == "gw_greenhouse" for t in entity_form)
    assert all(m[2:] == (1, True) for m in sent)


def test_mode_is_validated() -> None:
    assert (DiscoveryConfig().mode, DiscoveryConfig(mode="entity").mode) == ("device", "entity")
    with pytest.raises(ValueError, match="'device' or 'entity'"):
        DiscoveryConfig(mode="entities")


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


def test_firmware_seen_republishes_once_and_refuses_what_is_not_a_version(caplog) -> None:
    sent: list[tuple[str, str, int, bool]] = []
    d = make(DEVICES, publish=lambda *a: sent.append(a))
    d.firmware_seen("greenhouse", "0.1.0")
    d.firmware_seen("greenhouse", "0.1.0")  # every reconnect's hello says it again: once is enough
    assert [json.loads(m[1])["dev"]["sw"] for m in sent] == ["0.1.0"]
    for bad in ("0.1.0\nowned", "x" * 33, "0.1.0 beta"):
        d.firmware_seen("greenhouse", bad)
    d.firmware_seen("greenhouse", "")  # a hello that names no firmware
    d.firmware_seen("nobody", "0.1.0")
    assert len(sent) == 1 and d.stats["bad_firmware"] == 3
    assert len([r for r in caplog.records if "bad_firmware" in r.getMessage()]) == 1  # logged once
    assert d.device_payload("greenhouse")["dev"]["sw"] == "0.1.0"


def test_a_config_made_before_a_hello_never_replaces_the_one_made_after() -> None:
    """At a connect every device's config is made and sent on the network thread, while a
    hello on a link's thread may make a newer one (its firmware): the newer one stays."""
    retained: dict[str, str] = {}
    hello = threading.Thread(target=lambda: d.firmware_seen("greenhouse", "0.1.0"))

    def publish(topic: str, payload: str, qos: int, retain: bool) -> None:
        if topic.endswith("_greenhouse/config") and hello.ident is None:
            hello.start()  # the hello arrives while the config made before it is on its way
            hello.join(0.5)
        retained[topic] = payload

    d = make(DEVICES, publish=publish)
    d.publish_device("greenhouse")  # (what a connect does for every device)
    hello.join(5)
    assert json.loads(retained["homeassistant/device/gw_greenhouse/config"])["dev"].get("sw") == "0.1.0"


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
        return {m.topic: json.loads(m.payload) for m in ha.received() if m.retain and m.payload}
    finally:
        ha.client.disconnect()  # first: the network thread then ends at once, not at its next select timeout
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


@pytest.mark.parametrize("mode", ["device", "entity"])
def test_device_that_left_the_config_is_removed(broker, mode: str) -> None:
    # an earlier run of gateway "gw" had greenhouse and porch; gateway "gw_x" has "porch" too
    first, d1 = connect(broker, DEVICES[:2], mode=mode)
    other, d2 = connect(broker, [{"id": "porch", "transport": "uart", "port": "/dev/ttyAMA1"}], gateway_id="gw_x",
                        mode=mode)
    before = set(all_configs(d1)) | set(all_configs(d2))
    wait_for(lambda: before <= set(retained_configs(broker)), 10, "both gateways' configs")
    d1.stop()
    first.stop()
    # now gw runs with greenhouse only: gw_porch goes, gw_x_porch (another gateway) stays
    mqtt, d = connect(broker, DEVICES[:1], stale_scan=1.0, mode=mode)  # (1 s: time for a loaded broker)
    try:
        porch = {t for t in before if "/gw_porch/" in t}
        assert porch and len(porch) == (1 if mode == "device" else 1 + 8)  # the LED and the link counters
        wait_for(lambda: d.stats["removed"] == len(porch), 10, "the stale configs cleared")
        # "removed" counts the clears sent; the broker has them a moment later
        def cleared() -> dict | None:
            configs = retained_configs(broker)
            return configs if set(configs) == before - porch else None

        configs = wait_for(cleared, 10, "the broker without the stale configs")
        assert set(all_configs(d)) | set(all_configs(d2)) == set(configs)
        assert d.stats["handed_over"] == 0  # nothing of the other mode was there
    finally:
        d.stop()
        mqtt.stop()
        d2.stop()
        other.stop()


@pytest.mark.parametrize(("old", "new"), [("device", "entity"), ("entity", "device")])
def test_switching_mode_hands_the_entities_over_and_clears_the_old_form(broker, old: str, new: str) -> None:
    """What a user switching ``homeassistant.mode`` (and dropping a device on the way) leaves
    on the broker: the new form only, each entity handed over as Home Assistant documents it."""
    first, d1 = connect(broker, DEVICES[:2], mode=old)
    old_configs = all_configs(d1)
    wait_for(lambda: set(old_configs) <= set(retained_configs(broker)), 10, f"the {old}-mode configs")
    d1.stop()
    first.stop()
    ha = Recorder(broker, topics=["homeassistant/#"])  # what Home Assistant receives, in order
    # porch is gone now (1 s: time for a loaded broker)
    mqtt, d = connect(broker, DEVICES[:1], stale_scan=1.0, mode=new)
    try:
        new_configs = all_configs(d)
        assert not set(new_configs) & set(old_configs)
        configs = wait_for(lambda: (c := retained_configs(broker)) and set(c) == set(new_configs) and c, 10,
                           f"only the {new}-mode configs retained")
        assert configs == new_configs
        kept = {t for t in old_configs if "/gw_porch/" not in t}
        assert d.stats["handed_over"] == len(kept) and d.stats["removed"] == len(old_configs) - len(kept)
        def received() -> list[tuple[str, str, bool]] | None:  # once the subscriber has the clears too
            got = [(m.topic, m.payload.decode(), bool(m.retain)) for m in ha.received()]
            return got if {t for t, p, _ in got if t in old_configs and not p} == set(old_configs) else None

        got = wait_for(received, 10, "the clears delivered")
        migrate = {t: i for i, (t, p, _) in enumerate(got) if p.startswith("{") and json.loads(p) == {
            "migrate_discovery": True}}
        assert set(migrate) == kept and not any(got[i][2] for i in migrate.values())  # not retained
        cleared = {t: i for i, (t, p, _) in enumerate(got) if t in old_configs and not p}
        assert set(cleared) == set(old_configs)
        # Home Assistant's order: the hand-over, then the new form (again), then the old cleared.
        republished = min(i for i, (t, p, _) in enumerate(got) if t in new_configs and i > max(migrate.values()))
        assert max(migrate.values()) < republished < min(cleared[t] for t in kept)
        assert entities(new_configs) == {k: v for k, v in entities(old_configs).items()
                                         if not k.startswith("gw_porch_")}
    finally:
        ha.client.disconnect()
        ha.close()
        d.stop()
        mqtt.stop()


# -- the integration docs ------------------------------------------------------------------

def test_nodered_flow_is_importable() -> None:
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
    # MQTT 5, or a reading published late (after an outage) arrives without the user property
    # saying when it was taken, and the flow stamps the whole backlog with its arrival time.
    assert str(broker["protocolVersion"]) == "5"
    func = next(n for n in nodes if n["type"] == "function")["func"]
    assert "msg.userProperties" in func and ".ts" in func
    if shutil.which("node"):  # (Node-RED's runtime: run the function as it would)
        topic = "pico/greenhouse/sensor/temp"
        late, live = run_function(func, [{"topic": topic, "payload": "21.5", "userProperties": {"ts": "1700000000000"}},
                                         {"topic": topic, "payload": "21.5"}])
        assert late == {"device": "greenhouse", "metric": "temp", "value": 21.5, "time": "2023-11-14T22:13:20.000Z",
                        "late": True}
        assert live["late"] is False and live["time"] >= time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 60))


def run_function(body: str, messages: list[dict]) -> list[dict]:
    """A Node-RED function node's body run by node.js on each message: the payloads it returns."""
    script = ("const f = new Function('msg', 'node', process.argv[1]);"
              "const out = JSON.parse(process.argv[2]).map(m => f(m, {status() {}}).payload);"
              "process.stdout.write(JSON.stringify(out));")
    done = subprocess.run(["node", "-e", script, body, json.dumps(messages)], capture_output=True, text=True,
                          timeout=20, check=True)
    return json.loads(done.stdout)


def test_mqtt_cli_doc_covers_every_topic() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt-cli.md").read_text()
    for needle in ("sensor/", "state/led", "cmd/led", "result/led", "/status", "bridge/pi-garden/status",
                   "pico/+/owner", "bridge/+/conflicts", "diagnostics", "-r -n -t pico/greenhouse/cmd/led",
                   "homeassistant/device/"):
        assert needle in text, needle


FIRMWARE = re.search(r'FW_VERSION = "([^"]+)"', (Path(__file__).parent.parent / "pico" / "core.py").read_text())[1]


def test_the_running_gateway_announces_its_picos_to_home_assistant(virtual, broker, recorder) -> None:
    """Through `pico-gateway run`: what a fresh Home Assistant finds, with each Pico's firmware
    version from its hello (a serial frame; a Pico W's retained message), and the switch works."""
    fleet, _ = virtual([{"id": "greenhouse", "transport": "uart", "port": "sim", "read_interval": 0.2},
                        {"id": "balcony", "transport": "wifi", "read_interval": 0.2}])
    fresh = type(recorder)(broker, topics=["homeassistant/#"])  # subscribes after the fact: retained only
    try:
        config = json.loads(fresh.wait("homeassistant/device/testgw_greenhouse/config")[0])
        switch = next(c for c in config["cmps"].values() if c["p"] == "switch")
        assert switch["command_topic"] == "pico/greenhouse/cmd/led"
        assert switch["state_topic"] == "pico/greenhouse/state/led"
        fresh.wait("homeassistant/device/testgw/config")
        recorder.publish(switch["command_topic"], switch["payload_on"])  # what HA sends when switched on
        fleet["greenhouse"].wait_led("on")
        for device in ("greenhouse", "balcony"):
            topic = f"homeassistant/device/testgw_{device}/config"
            wait_for(lambda topic=topic: json.loads(fresh.last(topic) or "{}").get("dev", {}).get("sw") == FIRMWARE, 10,
                     f"{device}'s firmware version in its discovery config")
        retained = retained_configs(broker)  # what Home Assistant reads when it starts
        assert [retained[f"homeassistant/device/testgw_{x}/config"]["dev"]["sw"] for x in ("greenhouse", "balcony")] \
            == [FIRMWARE, FIRMWARE]
    finally:
        fresh.client.disconnect()
        fresh.close()
