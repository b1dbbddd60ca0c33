"""The i2c link against a register map on a fake bus: the machine has no I2C bus, so
the fake is the bus itself (smbus2's ``i2c_rdwr`` and ``write_byte_data``); everything
above it is the production link."""

from __future__ import annotations

import ctypes
import struct

import pytest

import gateway.links.i2c as i2c
from gateway.links.i2c import I2cConfig, I2cLink
from mqtt_helpers import wait_for
from peers import Events


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
