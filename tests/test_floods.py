"""Floods anyone who may publish to the broker can send (a Node-RED flow in a loop will),
against the real gateway process and a real mosquitto: owner claims, Home Assistant's
birth message, commands, and metric names no topic may have. Each is bounded in
memory, threads, log lines and what the gateway publishes, and a command from someone
else still gets through.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from peers import PicogwPeer, TutorialTcpPeer

from gateway.bridge import REFUSAL_BURST
from gateway.ownership import MAX_CLAIMANTS
from gateway.payloads import Conflicts, check

SPACING = 2.0  # s: the republish_delay the birth-flood test sets, and so the republishes' spacing


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status: ``Threads``, ``VmRSS`` (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(gw: GatewayProcess) -> float:
    return proc_status(gw.proc.pid, "VmRSS") / 1024


def flood(broker: Broker, topic: str, lines: list[str], qos: int = 1) -> subprocess.Popen[bytes]:
    """``mosquitto_pub -l``: one message per line, as fast as the broker takes them."""
    proc = subprocess.Popen(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", str(qos),
                             "-t", topic, "-l"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(("\n".join(lines) + "\n").encode())
    proc.stdin.close()
    return proc


def finished(proc: subprocess.Popen[bytes]) -> None:
    assert proc.wait(60) == 0


def diagnostics(recorder: Recorder, device: str | None = None) -> dict:
    topic = f"pico/{device}/diagnostics" if device else "pico/bridge/testgw/diagnostics"
    last = recorder.last(topic)
    return json.loads(last) if last else {}


def answers(recorder: Recorder, device: str) -> list[dict]:
    return [json.loads(p) for p in recorder.on(f"pico/{device}/result/led")]


def error_lines(gw: GatewayProcess, needle: str) -> list[str]:
    return [line for line in gw.output().splitlines() if needle in line and "ERROR" in line]


@pytest.fixture
def run_gateway(tmp_path: Path, broker: Broker, recorder: Recorder) -> Iterator:
    started: list[GatewayProcess] = []

    def start(devices: list[dict], extra: str = "") -> GatewayProcess:
        """The gateway with diagnostics every second; ``extra``: TOML tables appended."""
        config = write_config(tmp_path / "testgw.toml", broker, devices, diagnostics_interval=1)
        config.write_text(config.read_text() + extra)
        gw = GatewayProcess(config, recorder)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def picos() -> Iterator[dict[str, PicogwPeer]]:
    made = {name: PicogwPeer(name) for name in ("greenhouse", "porch")}
    yield made
    for peer in made.values():
        peer.close()


def uart(peer: PicogwPeer) -> dict:
    return {"id": peer.device, "transport": "uart", "port": peer.path}


def command_answered(watcher: Recorder, device: str, payload: str, sender: Recorder | None = None,
                     timeout: float = 20) -> dict:
    """Publish a command (from ``sender``, else ``watcher``) and wait for the next answer."""
    mark = len(answers(watcher, device))
    (sender or watcher).publish(f"pico/{device}/cmd/led", payload)
    return wait_for(lambda: answers(watcher, device)[mark:][:1], timeout, f"an answer for {device}")[0]


def test_a_flood_of_owner_claims_is_bounded(run_gateway, broker: Broker, recorder: Recorder) -> None:
    gw = run_gateway([{"id": "greenhouse", "transport": "wifi"}])
    rss_before = rss_mb(gw)
    finished(flood(broker, "pico/greenhouse/owner", [f"intruder-{i}" for i in range(1, 3001)]))
    wait_for(lambda: diagnostics(recorder).get("bridge", {}).get("owner_conflicts") == 3000, 60,
             "3,000 claims counted")

    def settled() -> dict | None:
        body = json.loads(recorder.last("pico/bridge/testgw/conflicts") or "{}")
        return body if "intruder-3000" in body.get("devices", {}).get("greenhouse", []) else None

    body = wait_for(settled, 30, "the conflicts message naming the last claimant")
    check(Conflicts, body)
    published = recorder.on("pico/bridge/testgw/conflicts")
    assert max(len(p) for p in published) <= 1024  # (180 KB before: every claim so far)
    assert sum(len(p) for p in published) <= 64 * 1024, len(published)  # (270 MB before)
    assert body["devices"]["greenhouse"] == sorted(f"intruder-{i}" for i in range(3001 - MAX_CLAIMANTS, 3001))
    assert body["forgotten"] == {"greenhouse": 3000 - MAX_CLAIMANTS}
    # An error for each claimant up to the cap, then one line saying the rest are only counted.
    assert len(error_lines(gw, "'greenhouse'")) == MAX_CLAIMANTS + 1
    assert rss_mb(gw) - rss_before < 25  # (+430 MB before)
    assert recorder.last("pico/greenhouse/owner") == "intruder-3000"  # (theirs: nothing is fought over)


def test_a_flood_of_home_assistant_births_is_one_republish(run_gateway, broker: Broker, recorder: Recorder,
                                                          picos: dict[str, PicogwPeer]) -> None:
    gw = run_gateway([uart(picos["greenhouse"])], f"[homeassistant]\nrepublish_delay = {SPACING}\n")
    recorder.wait("pico/greenhouse/status", "online", timeout=15)
    assert command_answered(recorder, "greenhouse", "on")["ok"]  # (its command worker now exists)
    idle = proc_status(gw.proc.pid, "Threads")
    config = "homeassistant/device/testgw_greenhouse/config"
    mark = recorder.mark(config)

    most = [idle]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], proc_status(gw.proc.pid, "Threads"))
            sampling.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        began = time.monotonic()
        finished(flood(broker, "homeassistant/status", ["online"] * 5000))
        # Handled in order on the gateway's MQTT thread: once this is answered, so are the 5,000.
        assert command_answered(recorder, "greenhouse", "off", timeout=60)["ok"]
        lasted = time.monotonic() - began
        wait_for(lambda: len(recorder.on(config)) > mark, 15, "the republish")
        wait_for(lambda: proc_status(gw.proc.pid, "Threads") <= idle, 30, "the gateway's threads back to idle")
    finally:
        sampling.set()
        sampler.join()
    # Published before this answer, so received before it: every republish is counted now.
    assert command_answered(recorder, "greenhouse", "on")["ok"]
    assert most[0] <= idle + 2, (most[0], idle)  # (about 2,100 threads before)
    # One pending at a time, SPACING s apart: the first, and one per SPACING s the flood lasted.
    # (The gateway takes well under a second for the 5,000 alone: 2; one per message before.)
    assert len(recorder.on(config)) - mark <= 2 + int(lasted / SPACING), lasted


def test_a_command_flood_is_refused_at_once_and_others_still_get_through(
        run_gateway, broker: Broker, recorder: Recorder, picos: dict[str, PicogwPeer]) -> None:
    gw = run_gateway([uart(picos["greenhouse"]), uart(picos["porch"])])
    # Its own subscriber: the test's "#" recorder gets the whole flood first.
    watcher = Recorder(broker, topics=["pico/+/result/led", "pico/+/diagnostics"])
    try:
        for device in picos:
            recorder.wait(f"pico/{device}/status", "online", timeout=15)
        assert command_answered(watcher, "greenhouse", "on", recorder)["ok"]
        rss_before = rss_mb(gw)
        n = 20_000
        flooding = flood(broker, "pico/greenhouse/cmd/led", ["toggle"] * n)
        # Someone else, meanwhile, switches another Pico.
        assert command_answered(watcher, "porch", "on", recorder, timeout=60) == {
            "ok": True, "command": "on", "state": "on", "error": None}
        finished(flooding)
        assert picos["porch"].led is True

        def accounted() -> dict | None:
            d = diagnostics(watcher, "greenhouse")
            return d if d.get("commands_ok", 0) + d.get("commands_failed", 0) == n + 1 else None

        report = wait_for(accounted, 60, f"all {n} commands carried out or refused")
        carried_out = report["commands_ok"] - 1
        unanswered = report["counters"].get("refusals_unanswered", 0)

        def flood_answers() -> tuple[list[dict], list[dict]] | None:
            got = answers(watcher, "greenhouse")[1:]
            ok, refused = [a for a in got if a["ok"]], [a for a in got if not a["ok"]]
            return (ok, refused) if len(ok) == carried_out and len(refused) + unanswered == n - carried_out else None

        # Every carried-out command is answered; only a few refusals are, the rest counted (and said so).
        _, refusals = wait_for(flood_answers, 30, "an answer for every carried-out command")
        assert len(refusals) < REFUSAL_BURST + 100, len(refusals)  # (one each, 20,000, before)
        assert all(a["error"].startswith("busy") for a in refusals)
        assert unanswered == 0 or any("refused without an answer" in a["error"] for a in refusals)
        assert rss_mb(gw) - rss_before < 20
        # Afterwards the Pico is commanded as usual.
        assert picos["greenhouse"].led is (carried_out % 2 == 0)
        assert command_answered(watcher, "greenhouse", "off", recorder)["ok"]
        assert picos["greenhouse"].led is False
    finally:
        watcher.close()


def test_one_metric_name_rule_for_every_link(run_gateway, recorder: Recorder, tmp_path: Path) -> None:
    peer = TutorialTcpPeer(readings="Temp/../x=1 a#=3 temp=21.5")
    try:
        gw = run_gateway([{"id": "hut", "transport": "tcp", "host": "127.0.0.1", "port": peer.port,
                           "poll_interval": 0.2}, {"id": "balcony", "transport": "wifi"}])
        for metric in ("x" * 60_000, "Temp", "a.b"):
            recorder.publish(f"pico/balcony/sensor/{metric}", "1")
        recorder.publish("pico/balcony/sensor/temp", "19.5")
        recorder.wait("pico/hut/sensor/temp", "21.5", count=2)
        wait_for(lambda: diagnostics(recorder, "balcony").get("counters", {}).get("bad_metric") == 3, 15,
                 "balcony's 3 bad names counted")
        wait_for(lambda: diagnostics(recorder, "hut").get("counters", {}).get("bad_metric", 0) >= 4, 15,
                 "hut's bad names counted, two per poll")
        assert diagnostics(recorder, "hut")["rejected"] >= 4
        with sqlite3.connect(tmp_path / "readings.db") as db:
            stored = {m for (m,) in db.execute("SELECT DISTINCT metric FROM readings")}
        assert stored == {"temp"}
        published = {m.topic for m in recorder.messages if m.topic.startswith(("pico/hut/sensor/",
                                                                               "pico/balcony/sensor/"))}
        assert published <= {"pico/hut/sensor/temp"} | {f"pico/balcony/sensor/{m}" for m in
                                                         ("x" * 60_000, "Temp", "a.b", "temp")}
        log = gw.output()
        assert log.count("counted as bad_metric") == 2  # once per device
        assert "x" * 100 not in log
    finally:
        peer.close()
