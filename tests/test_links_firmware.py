"""Every link end to end against virtual Picos running the real firmware (pico/)
and the tutorial's programs (pico/tutorial/), through the gateway process."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from mqtt_helpers import Recorder, wait_for

FAST = 0.2  # seconds between readings / polls, to keep the tests short


def stored(tmp_path: Path, device: str, metric: str) -> list[tuple[float, int | None]]:
    db = tmp_path / "readings.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value, seq FROM readings WHERE device=? AND metric=? ORDER BY id",
                            (device, metric)).fetchall()


def switch(recorder: Recorder, device: str, payload: str, n: int = 1) -> dict:
    recorder.publish(f"pico/{device}/cmd/led", payload)
    return json.loads(recorder.wait(f"pico/{device}/result/led", count=n)[n - 1])


@pytest.mark.parametrize("transport", ["uart", "usb"])
def test_serial_picogw_firmware(virtual, recorder: Recorder, tmp_path: Path, transport: str) -> None:
    fleet, _ = virtual([{"id": "pico1", "transport": transport, "port": "sim", "read_interval": FAST,
                         "sim": {"temp_c": 30.0, "temp_noise": 0}}])
    temps = [float(t) for t in recorder.wait("pico/pico1/sensor/temp", count=3)]
    assert all(29.0 < t < 31.0 for t in temps)  # the firmware's ADC conversion of the simulated 30 °C
    recorder.wait("pico/pico1/status", "online")
    recorder.wait("pico/pico1/state/led", "off")  # from the hello; nothing switched at start
    assert fleet["pico1"].led == "off"
    assert switch(recorder, "pico1", "on")["state"] == "on"
    fleet["pico1"].wait_led("on")
    assert switch(recorder, "pico1", "TOGGLE", 2)["state"] == "off"
    fleet["pico1"].wait_led("off")
    seqs = [s for _, s in stored(tmp_path, "pico1", "temp")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one row per reading, in order


def test_commands_during_a_burst_of_readings(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([{"id": "busy", "transport": "uart", "port": "sim", "read_interval": 0.005}])
    recorder.wait("pico/busy/sensor/temp", count=50)
    for i, word in enumerate(["on", "off", "on", "off", "toggle"], start=1):
        assert switch(recorder, "busy", word, i)["ok"] is True
    fleet["busy"].wait_led("on")


def test_uart_tutorial_program(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([{"id": "porch", "transport": "uart", "protocol": "tutorial", "port": "sim"}],
                       diagnostics_interval=1)
    assert switch(recorder, "porch", "on")["state"] == "on"
    fleet["porch"].wait_led("on")
    assert switch(recorder, "porch", "toggle", 2)["state"] == "off"
    fleet["porch"].wait_led("off")
    # That program cannot be asked its state: the diagnostics say the one shown is assumed
    # (from the last answer; a reset of the Pico since would go unseen).
    def assumed() -> dict | None:
        reports = [json.loads(p) for p in recorder.on("pico/porch/diagnostics")]
        return next((r for r in reports if r.get("led_state") == "assumed"), None)

    report = wait_for(assumed, 5, "diagnostics saying the LED state is assumed")
    assert report["online"] is True  # type: ignore[index]


def test_i2c_picogw_firmware_and_no_duplicates(virtual, recorder: Recorder, tmp_path: Path) -> None:
    # The gateway polls five times faster than the Pico samples: still one row per sample.
    fleet, _ = virtual([{"id": "cellar", "transport": "i2c", "poll_interval": 0.05, "read_interval": 0.25}])
    recorder.wait("pico/cellar/sensor/temp", count=4)
    rows = stored(tmp_path, "cellar", "temp")
    seqs = [s for _, s in rows]
    assert len(seqs) == len(set(seqs))
    assert switch(recorder, "cellar", "on")["state"] == "on"
    fleet["cellar"].wait_led("on")
    recorder.wait("pico/cellar/state/led", "on")


def test_i2c_targets_on_one_bus_and_one_unplugged(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([
        {"id": "one", "transport": "i2c", "address": 0x43, "poll_interval": FAST, "read_interval": FAST},
        {"id": "two", "transport": "i2c", "address": 0x44, "poll_interval": FAST, "read_interval": FAST,
         "retries": 1},
    ])
    recorder.wait("pico/two/status", "online")
    fleet["two"].kill()  # yanked: the address stops answering
    recorder.wait("pico/two/status", "offline")
    before = len(recorder.on("pico/one/sensor/temp"))
    recorder.wait("pico/one/sensor/temp", count=before + 5)  # the other target keeps its pace
    answer = switch(recorder, "two", "on")
    assert answer["ok"] is False


def test_i2c_tutorial_program(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([{"id": "attic", "transport": "i2c", "protocol": "tutorial", "poll_interval": FAST}])
    recorder.wait("pico/attic/state/led", "off")
    assert switch(recorder, "attic", "1")["state"] == "on"
    fleet["attic"].wait_led("on")
    assert switch(recorder, "attic", "toggle", 2)["state"] == "off"


def test_usb_stock_micropython_through_the_raw_repl(virtual, recorder: Recorder, tmp_path: Path) -> None:
    fleet, _ = virtual([{"id": "bench", "transport": "usb", "protocol": "tutorial", "port": "sim",
                         "poll_interval": FAST}])
    recorder.wait("pico/bench/sensor/temp", count=2)
    assert switch(recorder, "bench", "on")["state"] == "on"
    fleet["bench"].wait_led("on")
    # A payload that would be code if anything ever pasted it into a snippet:
    answer = switch(recorder, "bench", "off')\nPin('LED').on()#", 2)
    assert answer["ok"] is False
    recorder.publish("pico/bench/cmd/led", "off")
    fleet["bench"].wait_led("off")
    assert stored(tmp_path, "bench", "uptime")


def test_wifi_firmware_publishes_itself(virtual, recorder: Recorder, tmp_path: Path) -> None:
    fleet, _ = virtual([{"id": "balcony", "transport": "wifi", "read_interval": FAST}])
    recorder.wait("pico/balcony/status", "online")
    wait_for(lambda: len(stored(tmp_path, "balcony", "temp")) >= 2, 10, "wifi readings in SQLite")
    recorder.publish("pico/balcony/cmd/led", "on")  # the Pico takes it itself
    fleet["balcony"].wait_led("on")
    recorder.wait("pico/balcony/state/led", "on")
    assert recorder.on("pico/balcony/result/led") == []
    fleet["balcony"].kill()
    recorder.wait("pico/balcony/status", "offline")  # its last will, from the broker


def test_tcp_tutorial_program(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([{"id": "shed", "transport": "tcp", "protocol": "tutorial", "host": "sim",
                         "poll_interval": FAST}])
    recorder.wait("pico/shed/status", "online")
    assert switch(recorder, "shed", "on")["state"] == "on"
    fleet["shed"].wait_led("on")
    fleet["shed"].kill()
    recorder.wait("pico/shed/status", "offline")


def test_tcp_picogw_firmware_readings(virtual, recorder: Recorder) -> None:
    virtual([{"id": "hut", "transport": "tcp", "host": "sim", "poll_interval": FAST, "read_interval": FAST}])
    recorder.wait("pico/hut/sensor/temp", count=2)
    assert switch(recorder, "hut", "toggle")["state"] == "on"


def test_wifi_firmware_comes_back_after_a_broker_restart(virtual, broker, recorder: Recorder) -> None:
    """The Pico W reconnects with backoff and renews its subscription: after the broker
    restarts, it is online again and takes commands again."""
    fleet, _ = virtual([{"id": "balcony", "transport": "wifi", "read_interval": FAST}])
    recorder.wait("pico/balcony/status", "online")
    recorder.close()
    broker.stop()
    broker.start()  # same port, no persistence: every retained message and subscription is gone
    fresh = Recorder(broker)
    try:
        fresh.wait("pico/balcony/status", "online", timeout=40)  # its backoff is capped at 30 s
        fresh.wait("pico/balcony/sensor/temp", timeout=10)
        fresh.publish("pico/balcony/cmd/led", "on")
        fleet["balcony"].wait_led("on", timeout=10)
        fresh.wait("pico/balcony/state/led", "on")
    finally:
        fresh.close()
