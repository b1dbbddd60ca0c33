"""A Pico as an I2C target that the Pi polls (smbus2): see docs/links.md.

``protocol = "picogw"`` reads our register map (docs/protocol.md §2): one
56-byte transaction per poll for the sequence number and every value (a
seqlock: ``SEQ_A == SEQ_B`` or it is read again); a new sequence number is a new
reading, an unchanged one is not. ``protocol = "tutorial"`` is the tutorial's
target: ``write_byte(1/0)`` switches, ``read_byte`` tells the state.

The Pi's I2C controller mishandles clock stretching, and Picos get unplugged:
every transaction is retried ``retries`` times, and a device that still fails is
marked offline and polled with backoff. Each device has its own thread and its
own bus handle, so a slow or absent target never delays the others (the kernel
serialises the transactions on the wire).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any, Literal

from pydantic import Field
from smbus2 import SMBus, i2c_msg

from gateway.links.base import CommandError, DeviceConfig, LedCommand, LinkEvents, PollingLink, now_ms
from gateway.protocols.picogw import is_key

# Register map v1 (docs/protocol.md §2)
MAGIC, LED, LED_CMD, SEQ_A, NAMES, SLOTS, NAME_LEN = 0x00, 0x04, 0x05, 0x08, 0x40, 12, 8
SNAPSHOT = struct.Struct("<I12iI")  # SEQ_A, VALUES, SEQ_B: 0x08..0x3F
IDLE = 0xFF
CMD_CODES = {LedCommand.OFF: 0, LedCommand.ON: 1, LedCommand.TOGGLE: 2}
TORN_READ_RETRIES = 5
COMMAND_POLL = 0.02  # seconds between LED_CMD reads while a command is applied


class I2cConfig(DeviceConfig):
    transport: Literal["i2c"]
    bus: int | str = Field(1, description="N for /dev/i2c-N, or a simulated bus's directory")
    address: int = Field(0x43, ge=0x08, le=0x77)
    poll_interval: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="extra attempts per failed transaction")


def open_bus(bus: int | str) -> Any:
    """smbus2 for a real bus; the simulator's socket bus for a path."""
    if isinstance(bus, int):
        return SMBus(bus)
    from gateway.simulator.i2c_bus import SimulatedSMBus

    return SimulatedSMBus(bus)


class I2cLink(PollingLink):
    transport = "i2c"
    Config = I2cConfig
    config: I2cConfig

    def __init__(self, config: I2cConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._lock = threading.Lock()  # one transaction sequence at a time on our handle
        self._bus: Any = None
        self._names: list[str] | None = None
        self._last_seq: int | None = None

    def closed(self) -> None:
        with self._lock:
            self._close_bus()

    # -- transactions ------------------------------------------------------------
    def _close_bus(self) -> None:
        if self._bus is not None:
            try:
                self._bus.close()
            except OSError:
                pass
            self._bus = None

    def _xfer(self, action: str, fn: Any) -> Any:
        """Run ``fn(bus)`` with bounded retries; OSError after the last one."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            try:
                if self._bus is None:
                    self._bus = open_bus(self.config.bus)
                return fn(self._bus)
            except OSError as exc:
                self.stats["i2c_errors"] += 1
                if attempt == attempts - 1:
                    self._close_bus()
                    raise OSError(exc.errno, f"{action} at 0x{self.config.address:02x} on bus "
                                             f"{self.config.bus}: {exc.strerror or exc}") from exc
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _read(self, register: int, length: int) -> bytes:
        addr = self.config.address

        def rdwr(bus: Any) -> bytes:
            write, read = i2c_msg.write(addr, [register]), i2c_msg.read(addr, length)
            bus.i2c_rdwr(write, read)
            return bytes(read)

        return self._xfer(f"read of {length} bytes from 0x{register:02x}", rdwr)

    def _write(self, register: int, value: int) -> None:
        self._xfer(f"write of 0x{register:02x}", lambda bus: bus.write_byte_data(self.config.address, register, value))

    # -- picogw register map -------------------------------------------------------
    def _read_identity(self) -> None:
        header = self._read(MAGIC, 4)
        if header[:2] != b"PG" or header[2] != 1:
            self.stats["bad_identity"] += 1
            raise OSError(f"no picogw register map v1 at 0x{self.config.address:02x} (read {header.hex()}); "
                          "is it the tutorial firmware? then set protocol = \"tutorial\"")
        count = min(header[3], SLOTS)
        raw = self._read(NAMES, SLOTS * NAME_LEN)
        names = [raw[i * NAME_LEN:(i + 1) * NAME_LEN].rstrip(b"\0").decode("ascii", "replace")
                 for i in range(count)]
        bad = [name for name in names if not is_key(name)]
        if bad:  # garbled on the bus, or not our firmware: they would become topics
            self.stats["bad_identity"] += 1
            raise OSError(f"register map names metric(s) {bad!r} at 0x{self.config.address:02x}; a metric name "
                          "is [a-z][a-z0-9_]*, at most 24 characters")
        self._names = names
        self.log.info("register map v1, metrics %s", ",".join(self._names))

    def _poll_picogw(self) -> None:
        if self._names is None:
            self._read_identity()
        for _ in range(TORN_READ_RETRIES):
            seq_a, *values, seq_b = SNAPSHOT.unpack(self._read(SEQ_A, SNAPSHOT.size))
            if seq_a == seq_b:
                break
            self.stats["torn_reads"] += 1
        else:
            raise OSError("snapshot kept changing while read")
        led = self._read(LED, 2)
        self.events.led_state(self.device, led[0] == 1)
        last = self._last_seq
        if last is not None and seq_a < last:
            self.stats["seq_resets"] += 1  # the Pico restarted: names may have changed
            self._names = None
            self._read_identity()
        elif last is not None and seq_a > last + 1:
            self.stats["snapshots_missed"] += seq_a - last - 1  # polled slower than the Pico samples
        if seq_a == last:
            return
        self._last_seq = seq_a
        names = self._names or []
        readings = [(name, values[i] / 100) for i, name in enumerate(names) if name]
        if readings:
            self.stats["frames"] += 1
            self.events.reading(self.device, readings, now_ms(), seq_a)

    # -- tutorial target ---------------------------------------------------------------
    def _poll_tutorial(self) -> None:
        value = self._xfer("read_byte", lambda bus: bus.read_byte(self.config.address))
        self.events.led_state(self.device, value != 0)

    # -- commands --------------------------------------------------------------------
    def set_led(self, command: LedCommand) -> bool:
        try:
            with self._lock:
                if self.config.protocol == "tutorial":
                    return self._set_led_tutorial(command)
                return self._set_led_picogw(command)
        except OSError as exc:
            self.stats["command_errors"] += 1
            raise CommandError(str(exc)) from exc

    def _set_led_tutorial(self, command: LedCommand) -> bool:
        addr = self.config.address
        if command is LedCommand.TOGGLE:
            on = self._xfer("read_byte", lambda bus: bus.read_byte(addr)) == 0
        else:
            on = command is LedCommand.ON
        self._xfer("write_byte", lambda bus: bus.write_byte(addr, 1 if on else 0))
        state = self._xfer("read_byte", lambda bus: bus.read_byte(addr)) != 0
        if state != on:
            raise CommandError(f"the Pico reads back {'on' if state else 'off'} after the write")
        return state

    def _set_led_picogw(self, command: LedCommand) -> bool:
        self._write(LED_CMD, CMD_CODES[command])
        deadline = time.monotonic() + self.config.command_timeout
        while True:
            led, cmd = self._read(LED, 2)
            if cmd == IDLE:
                return led == 1
            if time.monotonic() > deadline:
                self.stats["command_timeouts"] += 1
                raise CommandError(f"the Pico did not apply the command within {self.config.command_timeout:g} s")
            time.sleep(COMMAND_POLL)

    def poll(self) -> None:
        with self._lock:
            if self.config.protocol == "tutorial":
                self._poll_tutorial()
            else:
                self._poll_picogw()
