"""The i2c link against a register map on a fake bus (the machine has no I2C bus, so
the fake is the bus itself: smbus2's ``i2c_rdwr`` and ``write_byte_data``; everything
above it is the production link), and against the real firmware on a virtual Pico."""

from __future__ import annotations

import ctypes
import json
import os
import sqlite3
import struct
import time
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from peers import Events
from smbus2 import i2c_msg

import gateway.links.i2c as i2c
from gateway.links.i2c import I2cConfig, I2cLink
from gateway.simulator.fleet import start_fleet
from gateway.simulator.i2c_bus import SimulatedSMBus


class RegisterBus:
    """A picogw v1 register map (docs/protocol.md) behind smbus2's calls."""

    def __init__(self, names: list[bytes]) -> None:
        self.memory = bytearray(256)
        self.memory[0:4] = b"PG\x01" + bytes([len(names)])
        for i, name in enumerate(names):
            self.memory[0x40 + 8 * i:0x40 + 8 * i + len(name)] = name
        self.memory[0x08:0x40] = struct.pack("<I12iI", 7, *[2150] * 12, 7)  # a settled snapshot, seq 7

    def i2c_rdwr(self, write, read) -> None:
        register = list(write)[0]
        ctypes.memmove(read.buf, bytes(self.memory[register:register + read.len]), read.len)

    def write_byte_data(self, addr: int, register: int, value: int) -> None:
        self.memory[register] = value

    def close(self) -> None:
        pass


@pytest.mark.parametrize("names, good", [([b"temp", b"hum"], True), ([b"temp", b"a+b"], False),
                                         ([b"temp", b"\xff\xfe"], False)])
def test_metric_names_from_the_register_map_are_checked(monkeypatch: pytest.MonkeyPatch,
                                                        names: list[bytes], good: bool) -> None:
    # A name read off the bus becomes an MQTT topic level: a garbled one (a wildcard,
    # not ASCII) must leave the device offline and counted, not reach the outbox.
    bus = RegisterBus(names)
    monkeypatch.setattr(i2c, "open_bus", lambda number: bus)
    events = Events()
    link = I2cLink(I2cConfig(id="cellar", transport="i2c", poll_interval=0.05), events)
    link.start()
    try:
        if good:
            wait_for(lambda: len(events.got) >= 2, 5, "a reading")
            assert [metric for _, metric, _, _ in events.got[:2]] == ["temp", "hum"]
            assert link.stats["bad_identity"] == 0 and events.online[-1:] == [True]
        else:
            wait_for(lambda: link.stats["bad_identity"] >= 2, 5, "the map refused, and read again")
            assert events.got == [] and True not in events.online
    finally:
        link.stop()


class Unplugged(RegisterBus):
    """The register map of firmware without BOOT_ID, behind a connector that can be pulled."""

    def __init__(self, names: list[bytes]) -> None:
        super().__init__(names)
        self.plugged = True

    def i2c_rdwr(self, write, read) -> None:
        if not self.plugged:
            raise OSError(121, "Remote I/O error")  # no ACK, as the Pi's driver says
        super().i2c_rdwr(write, read)

    def reflash(self, names: list[bytes], seq: int) -> None:
        fresh = RegisterBus(names)
        fresh.memory[0x08:0x40] = struct.pack("<I12iI", seq, *[5600] * 12, seq)
        self.memory[:] = fresh.memory


def test_offline_then_online_reads_the_names_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Firmware without BOOT_ID, unplugged and reflashed with other metrics (as many as before);
    # its sequence number happens to be ahead of the last one seen, so only going offline
    # tells of the change.
    bus = Unplugged([b"temp", b"hum"])
    monkeypatch.setattr(i2c, "open_bus", lambda number: bus)
    events = Events()
    link = I2cLink(I2cConfig(id="cellar", transport="i2c", poll_interval=0.05, retries=0), events)
    link.start()
    try:
        wait_for(lambda: len(events.got) >= 2, 5, "a reading")
        bus.plugged = False
        wait_for(lambda: events.online[-1:] == [False], 5, "offline")
        bus.reflash([b"temp", b"light"], seq=9)
        bus.plugged = True
        wait_for(lambda: any(seq == 9 for *_, seq in events.got), 5, "a reading of the reflashed Pico")
        assert [(metric, value) for _, metric, value, seq in events.got if seq == 9] == [
            ("temp", 56.0), ("light", 56.0)]
        assert {metric for _, metric, _, _ in events.got} == {"temp", "hum", "light"}
    finally:
        link.stop()


def block(bus: SimulatedSMBus, register: int, length: int) -> bytes:
    write, read = i2c_msg.write(0x43, [register]), i2c_msg.read(0x43, length)
    bus.i2c_rdwr(write, read)
    return bytes(read)


def assert_snapshots_of(events: Events, names: list[str]) -> None:
    """What the link reported is one or more whole snapshots, each of exactly ``names``."""
    metrics = [metric for _, metric, _, _ in events.got]
    assert metrics and metrics == names * (len(metrics) // len(names)), metrics


def test_a_pico_restarted_with_other_metrics_between_two_polls(tmp_path: Path) -> None:
    # The real firmware on a virtual Pico: 5 metrics, then reflashed with 4 (hum where light
    # was) and reset between two polls, whose sequence numbers still go up: without BOOT_ID the
    # gateway would publish hum's value as light, and a phantom door 0.
    before, after = ["temp", "uptime", "mem_free", "light", "door"], ["temp", "uptime", "mem_free", "hum"]
    hum_raw = 16384  # 0.825 V at ADC 27
    desc = {"id": "cellar", "transport": "i2c", "read_interval": 0.05,
            "sim": {"adc": {"27": hum_raw}},
            "config": {"ADC_PINS": {"light": 26}, "DIGITAL_PINS": {"door": 15}}}
    with start_fleet([desc], str(tmp_path / "picos")) as fleet:
        pico = fleet["cellar"]
        events = Events()
        link = I2cLink(I2cConfig(id="cellar", transport="i2c", bus=fleet.i2c_bus_dir), events)
        probe = SimulatedSMBus(fleet.i2c_bus_dir)
        try:
            link.poll()  # (the link's thread is not started: the test decides when it polls)
            assert_snapshots_of(events, before)  # (every snapshot the Pico's ring still holds)
            seen = events.got[-1][3]
            assert seen is not None
            config = Path(pico.fs, "config.py")
            config.write_text(config.read_text() + 'ADC_PINS = {"hum": 27}\nDIGITAL_PINS = {}\n')
            pico.reset()

            def rebooted_and_past_the_last_poll() -> bool:
                try:
                    header, names = block(probe, 0x00, 0x40), block(probe, 0x40, 8)
                except OSError:  # booting: nobody answers at the address
                    return False
                return header[3] == 4 and names.rstrip(b"\0") == b"temp" and \
                    struct.unpack_from("<I", header, 0x08)[0] > seen

            wait_for(rebooted_and_past_the_last_poll, 10, "the reflashed Pico's sequence number past the last poll's")
            del events.got[:]
            link.poll()
            assert_snapshots_of(events, after)
            assert events.got[-1][2] == pytest.approx(hum_raw * 3.3 / 65535, abs=0.01)
            assert link.stats["pico_restarts"] == 1
            link.poll()  # the same boot: nothing read again, nothing counted
            assert link.stats["pico_restarts"] == 1
        finally:
            probe.close()
            link.closed()


def test_a_long_catch_up_is_read_back_a_batch_per_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At first contact the link reads back all the Pico's ring holds, RING_BATCH snapshots a
    # poll (commands wait on the link's lock meanwhile): each snapshot once, in order, none missed.
    monkeypatch.setattr(i2c, "RING_BATCH", 5)
    desc = {"id": "cellar", "transport": "i2c", "read_interval": 0.05, "config": {"I2C_RING": 40}}
    with start_fleet([desc], str(tmp_path / "picos")) as fleet:
        events = Events()
        link = I2cLink(I2cConfig(id="cellar", transport="i2c", bus=fleet.i2c_bus_dir), events)
        probe = SimulatedSMBus(fleet.i2c_bus_dir)
        try:
            wait_for(lambda: int.from_bytes(block(probe, 0x08, 4), "little") >= 20, 10, "20 snapshots taken")
            link.poll()
            first = sorted({seq for *_, seq in events.got})
            assert len(first) == 5 and first[0] <= 1, first  # (the oldest kept: the ring holds them all)
            for _ in range(20):
                link.poll()
            seqs = [seq for _, metric, _, seq in events.got if metric == "temp"]
            assert seqs == list(range(seqs[0], seqs[-1] + 1)) and len(seqs) > 20, seqs
            assert link.stats["snapshots_missed"] == 0 and link.stats["snapshots_recovered"] >= 19
        finally:
            probe.close()
            link.closed()


# -- the snapshot ring, end to end: the real gateway process, the real firmware on a virtual Pico ------

OUTAGE = float(os.environ.get("PICOGW_TEST_OUTAGE_I2C", "5"))  # seconds the I2C target is unreachable
RATE = max(0.5, OUTAGE / 10)  # seconds between snapshots: the default ring (32) outlasts the outage
# and the offline backoff after it; a ring of SMALL_RING does not
SMALL_RING = 4


def stored(db: Path, device: str) -> list[tuple[int, int, float, int]]:
    """(seq, ts, uptime, ts_pico) of a device's snapshots, in the order they were stored."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT seq, ts, value, ts_pico FROM readings WHERE device = ? AND metric = 'uptime' "
                            "ORDER BY id", (device,)).fetchall()


def counters(recorder: Recorder, device: str) -> dict[str, int]:
    payload = recorder.last(f"pico/{device}/diagnostics")
    return json.loads(payload)["counters"] if payload else {}


def test_i2c_target_unreachable_loses_nothing_the_ring_holds(virtual, recorder: Recorder, tmp_path: Path) -> None:
    """The I2C target does not answer for OUTAGE seconds: the gateway reads the snapshots
    it missed back from the Pico's ring, each stored once, in order, at the time the Pico
    took it; what fell off a small ring is counted in snapshots_missed, nothing else is.
    A Pico without the ring (as older firmware) loses the outage's snapshots, counted."""
    addresses = {"cellar": 0x44, "attic": 0x45, "shed": 0x46}
    rings = {"cellar": None, "attic": SMALL_RING, "shed": 0}  # (None: the firmware's default)
    fleet, _ = virtual([{"id": device, "transport": "i2c", "address": addresses[device], "poll_interval": RATE,
                         "read_interval": RATE, **({"config": {"I2C_RING": ring}} if ring is not None else {})}
                        for device, ring in rings.items()], diagnostics_interval=1)
    db = tmp_path / "readings.db"
    probe = SimulatedSMBus(fleet.i2c_bus_dir)

    def pico_seq(address: int) -> int | None:
        """The Pico's sequence number now; None while it does not answer."""
        write, read = i2c_msg.write(address, [0x08]), i2c_msg.read(address, 4)
        try:
            probe.i2c_rdwr(write, read)
        except OSError:
            return None
        return int.from_bytes(bytes(read), "little")

    try:
        for device in rings:
            wait_for(lambda device=device: len(stored(db, device)) >= 3, 20, f"{device}'s live snapshots stored")
        for device in rings:
            fleet[device].set_sim(i2c_fail=True)
        recorder.wait("pico/cellar/status", "offline", timeout=10)
        time.sleep(OUTAGE)  # the fault's duration, not a wait for something
        for device in rings:
            fleet[device].set_sim(i2c_fail=False)
        last = {device: wait_for(lambda address=address: pico_seq(address), 5, f"{device} answering again")
                for device, address in addresses.items()}
        for device in rings:
            wait_for(lambda device=device: stored(db, device)[-1][0] > last[device], 30,
                     f"{device}'s snapshots past the outage stored")
        cellar, attic, shed = (stored(db, device) for device in rings)
        for device, rows in zip(rings, (cellar, attic, shed), strict=True):
            wait_for(lambda device=device, rows=rows: counters(recorder, device).get("frames", 0) >= len(rows), 10,
                     f"{device}'s diagnostics counting what is stored")
    finally:
        probe.close()

    # Exactly once, in the Pico's order: the default ring held the whole outage.
    seqs = [row[0] for row in cellar]
    assert seqs == list(range(seqs[-1] + 1)), seqs
    assert counters(recorder, "cellar").get("snapshots_missed", 0) == 0
    assert counters(recorder, "cellar")["snapshots_recovered"] >= OUTAGE / RATE - 1
    # The small ring: what fell off it is exactly what snapshots_missed counts; the rest once,
    # in order. (Its first snapshot is the oldest it held when the gateway first read it.)
    seqs = [row[0] for row in attic]
    assert seqs == sorted(set(seqs)), seqs
    missed = sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert missed >= 1 and counters(recorder, "attic")["snapshots_missed"] == missed, seqs
    # Each at the time the Pico took it: ts minus the Pico's uptime (whole seconds) is its
    # boot time, the same for every snapshot to within the second the uptime cuts off (and
    # 0.4 s for a loaded machine). Stamped when read, those read back would be seconds late.
    for rows in (cellar, attic):
        boots = [ts - int(uptime) * 1000 for _, ts, uptime, _ in rows]
        assert max(boots) - min(boots) <= 1000 + 400, (max(boots) - min(boots))
        assert all(ts_pico == 1 for *_, ts_pico in rows)
    # Without the ring: the outage's snapshots are gone, and counted; the others are
    # stored as before, at the time the gateway read them.
    seqs = [row[0] for row in shed]
    gaps = [b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1]
    assert sum(gaps) >= OUTAGE / RATE - 1 and counters(recorder, "shed")["snapshots_missed"] == sum(gaps)
    assert all(ts_pico == 0 for *_, ts_pico in shed)


def test_gateway_killed_and_restarted_reads_back_what_it_missed_and_stores_nothing_twice(
        tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """kill -9 of the gateway, down for 3 s: the new one reads all the Pico's ring holds at
    first contact; what the old one stored is refused (the same boot and sequence number),
    the rest stored once, in order, at the Pico's time."""
    fleet = start_fleet([{"id": "cellar", "transport": "i2c", "read_interval": RATE}], str(tmp_path / "picos"),
                        broker=(broker.host, broker.port))
    db = tmp_path / "readings.db"
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "cellar", "transport": "i2c",
                                                          "bus": fleet.i2c_bus_dir, "poll_interval": RATE}],
                          db=db, diagnostics_interval=1)
    gw = GatewayProcess(config, recorder)
    try:
        wait_for(lambda: len(stored(db, "cellar")) >= 3, 20, "live snapshots stored")
        gw.proc.kill()
        gw.proc.wait()
        gw.log.close()
        before = stored(db, "cellar")[-1][0]
        time.sleep(3)  # the gateway is down for 3 s (the fault, not a wait for something)
        gw = GatewayProcess(config, recorder)
        wait_for(lambda: stored(db, "cellar")[-1][0] > before + 3 / RATE, 20, "snapshots past the outage stored")
        rows = stored(db, "cellar")
        wait_for(lambda: counters(recorder, "cellar").get("duplicates_refused", 0) > 0, 10,
                 "the snapshots stored before, refused")
    finally:
        gw.stop()
        fleet.stop()
    seqs = [row[0] for row in rows]
    assert seqs == list(range(seqs[-1] + 1)), seqs
    boots = [ts - int(uptime) * 1000 for _, ts, uptime, _ in rows]
    assert max(boots) - min(boots) <= 1000 + 400, (max(boots) - min(boots))
