"""A Pico as an I2C target that the Pi polls (smbus2): see docs/links.md.

``protocol = "picogw"`` reads our register map (docs/protocol.md §2): one
64-byte transaction per poll for the header, the LED, the sequence number and
every value (a seqlock: ``SEQ_A == SEQ_B`` or it is read again), then the 4-byte
``BOOT_ID``; a new sequence number is a new reading, an unchanged one is not. The
metric names are read at first contact, after every time the device was offline,
and when ``BOOT_ID`` (or, on firmware without it, the sequence number) shows that
the Pico restarted: its readings are never reported under another boot's names.
``protocol = "tutorial"`` is the tutorial's target: ``write_byte(1/0)`` switches,
``read_byte`` tells the state.

The Pi's I2C controller mishandles clock stretching, and Picos get unplugged:
every transaction is retried ``retries`` times, and a device that still fails is
marked offline and polled with backoff. Each device has its own thread and its
own bus handle, so a slow or absent target never delays the others (the kernel
serialises the transactions on the wire).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import Field
from smbus2 import SMBus, i2c_msg

from gateway.domain import MAY_STILL_HAPPEN, CommandError, LedCommand, now_ms
from gateway.links.base import DeviceConfig, LinkEvents, PollingLink
from gateway.links.simulation import Description, Simulation
from gateway.protocols import PROTOCOLS, ProtocolKind
from gateway.protocols.picogw import is_key

if TYPE_CHECKING:
    from gateway.store import Row

# Register map v1 (docs/protocol.md §2)
MAGIC, LED, LED_CMD, NAMES, BOOT_ID, SLOTS, NAME_LEN = 0x00, 0x04, 0x05, 0x40, 0xB0, 12, 8
# 0x00..0x3F in one transaction: MAGIC, VERSION, COUNT, LED, LED_CMD, CMD_DONE, then the
# snapshot (SEQ_A, VALUES, SEQ_B)
POLL = struct.Struct("<2sBBBBHI12iI")
# 0xB0..0xB7: BOOT_ID, FEATURES, RING_SIZE (and two reserved bytes)
BOOT = struct.Struct("<IBB2x")
FEATURE_RING = 0x01
# The snapshot ring (§2.1): the request (RING_WANT, then RING_REQ) and the answer read from
# RING_ACK to the end in one transaction: ACK, HAVE, a reserved byte, OLDEST, NOW, then the
# window (WIN_SEQ, WIN_MS, WIN_VALUES).
RING_WANT, RING_ACK = 0xB8, 0xBD
ANSWER = struct.Struct("<BBxIIII12i")
CLOCK_MASK = 0x3FFFFFFF  # the Pico's ms clock wraps at 2^30
RING_POLL = 0.005  # seconds between reads of the answer (the Pico answers within its 20 ms loop)
RING_BATCH = 32  # snapshots read back in one poll at most (about 20 ms each)
RING_ATTEMPTS = 3  # requests for one snapshot answered for another before the poll fails
IDLE = 0xFF
CMD_CODES = {LedCommand.OFF: 0, LedCommand.ON: 1, LedCommand.TOGGLE: 2}
TORN_READ_RETRIES = 5
RESTART_RETRIES = 3  # polls' worth of reads when the Pico turns out to have restarted meanwhile
COMMAND_POLL = 0.02  # seconds between LED_CMD reads while a command is applied


class I2cSpeech(NamedTuple):
    """How the i2c link speaks one protocol: one poll, and one LED command (both under the
    link's lock)."""

    poll: Callable[[I2cLink], None]
    set_led: Callable[[I2cLink, LedCommand], bool]


I2C: ProtocolKind[I2cSpeech] = ProtocolKind("i2c")


class I2cConfig(DeviceConfig):
    transport: Literal["i2c"]
    protocol_kind = I2C
    bus: int | str = Field(1, description="N for /dev/i2c-N, or a simulated bus's directory")
    address: int = Field(0x43, ge=0x08, le=0x77)
    poll_interval: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=10, description="extra attempts per failed transaction")

    def address_problems(self, label: str) -> tuple[list[str], list[str], tuple[str, ...] | None]:
        bus = self.bus
        if isinstance(bus, str):
            number = bus[len("/dev/i2c-"):] if bus.startswith("/dev/i2c-") else bus
            if number.strip().isdigit():
                return [f"{label}.bus: write the bus number without quotes, bus = {int(number)} "
                        f"(for /dev/i2c-{int(number)}; a string names a simulated bus)"], [], None
            return [], [], ("bus address", os.path.realpath(bus), str(self.address))
        if bus < 0:
            return [f"{label}.bus: write N of /dev/i2c-N, e.g. bus = 1"], [], None
        notes = [] if os.path.exists(f"/dev/i2c-{bus}") else [
            f"{label}.bus: /dev/i2c-{bus} does not exist now (is I2C enabled?); the gateway opens it when it appears"]
        return [], notes, ("bus address", f"/dev/i2c-{bus}", str(self.address))


def open_bus(bus: int | str) -> Any:
    """smbus2 for a real bus; the simulator's socket bus for a path."""
    if isinstance(bus, int):
        return SMBus(bus)
    from gateway.simulator.i2c_bus import SimulatedSMBus

    return SimulatedSMBus(bus)


class I2cSimulation(Simulation):
    """Every virtual I2C target is on one simulated bus (a folder of sockets, one per address)."""

    ready_key = "i2c_socket"
    tutorial = "i2c_main.py"
    # The tutorial's i2c_main.py answers at 0x43, as written: our firmware takes the other address.
    demo_devices = ({"id": "cellar", "transport": "i2c", "protocol": "picogw", "address": 0x44, "poll_interval": 1.0},
                    {"id": "attic", "transport": "i2c", "protocol": "tutorial", "poll_interval": 1.0})

    def prepare(self, desc: Description, broker: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"I2C": {"addr": int(desc.get("address", 0x43))}}, {}

    def claim(self, desc: Description) -> tuple[str, str] | None:
        address = int(desc.get("address", 0x43))
        if desc.get("firmware", desc.get("protocol")) == "tutorial" and address != 0x43:
            raise ValueError(f"device {desc.get('id')!r}: the tutorial's i2c_main.py answers at 0x43, not "
                             f"0x{address:02x} (give this device address 0x43, or run an edited copy with --firmware)")
        return "I2C address", f"0x{address:02x}"

    def point(self, device: dict[str, Any], endpoint: Any) -> dict[str, Any]:
        return {**device, "bus": os.path.dirname(endpoint)}  # the target's socket is <bus>/0x43.sock


class I2cLink(PollingLink):
    transport = "i2c"
    Config = I2cConfig
    config: I2cConfig
    firmware = "i2c"
    firmware_config = {"I2C": {"id": 0, "addr": 0x43, "sda": 4, "scl": 5}}
    simulation = I2cSimulation()

    @classmethod
    def config_py(cls, device: DeviceConfig) -> dict[str, Any]:
        return {"I2C": {"addr": int(getattr(device, "address", 0x43))}}

    def __init__(self, config: I2cConfig, events: LinkEvents) -> None:
        super().__init__(config, events)
        self._speech = PROTOCOLS.lookup(I2C, config.protocol)
        self._lock = threading.Lock()  # one transaction sequence at a time on our handle
        self._bus: Any = None
        self._names: list[str] | None = None  # None: read the identity before the next snapshot
        self._seen_names: list[str] | None = None  # the names read last (kept while _names is None)
        self._boot_id: int | None = None  # BOOT_ID of the identity read last (0: firmware without it)
        self._ring = 0  # snapshots the Pico keeps for us to read back (RING_SIZE; 0: no ring)
        self._ring_ack: int | None = None  # RING_ACK as last read (None: read it before a request)
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
    def _read_boot(self) -> tuple[int, int]:
        """(BOOT_ID, the snapshots its ring keeps: 0 without one)."""
        boot, features, size = BOOT.unpack(self._read(BOOT_ID, BOOT.size))
        return boot, size if boot and features & FEATURE_RING else 0

    def _read_identity(self) -> None:
        """COUNT and NAMES, and the BOOT_ID they belong to. BOOT_ID is read first: names
        read after it are this boot's or a later one's, and a later boot shows in the
        BOOT_ID that every poll reads after its snapshot, before reporting it."""
        boot, ring = self._read_boot()
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
        if self._boot_id is not None and boot != self._boot_id:
            self.stats["pico_restarts"] += 1
            self._last_seq = None  # a new boot counts its snapshots from 0 again
            self.log.info("the Pico restarted (boot id %08x, was %08x)", boot, self._boot_id)
        if names != self._seen_names or boot != self._boot_id:  # (not at every return from offline)
            self.log.info("register map v1, metrics %s%s%s", ",".join(names),
                          f"; keeps {ring} snapshots" if ring else "",
                          "" if boot else "; firmware without BOOT_ID: a restart shows only when the "
                                          "sequence number goes back, or after the device was offline")
        self._boot_id = boot
        self._ring = ring
        self._ring_ack = None
        self._names = self._seen_names = names

    def poll_picogw(self) -> None:
        try:
            for _ in range(RESTART_RETRIES):
                if self._names is None:
                    self._read_identity()
                if self._poll_snapshot():
                    return
            raise OSError(f"the Pico at 0x{self.config.address:02x} changed while it was read "
                          f"{RESTART_RETRIES} times over (restarting?)")
        except Exception:
            # A failed poll takes the device offline, and what answers when it is back may be
            # another firmware or other metrics (a Pico reflashed while unplugged): the
            # identity is read again first.
            self._names = None
            raise

    def _poll_snapshot(self) -> bool:
        """Read and report one snapshot; False, reporting nothing, when it may not belong
        to the identity read before (the Pico restarted or changed meanwhile): read it again."""
        names = self._names or []
        for _ in range(TORN_READ_RETRIES):
            magic, version, count, led, _cmd, _done, seq_a, *values, seq_b = POLL.unpack(
                self._read(MAGIC, POLL.size))
            if seq_a == seq_b:
                break
            self.stats["torn_reads"] += 1
        else:
            raise OSError("snapshot kept changing while read")
        boot, ring = self._read_boot()  # after the snapshot: unchanged, the snapshot is of this boot too
        if boot != self._boot_id or ring != self._ring or magic != b"PG" or version != 1 \
                or min(count, SLOTS) != len(names):
            self._names = None
            return False
        last = self._last_seq
        if last is not None and seq_a < last:  # restarted, on firmware without BOOT_ID
            self.stats["pico_restarts"] += 1
            self.log.info("the Pico restarted (sequence number %d after %d)", seq_a, last)
            self._names = None
            self._last_seq = None
            return False
        self.events.led_state(self.device, led == 1)
        if ring:
            return self._read_ring(names, last, seq_a)
        if last is not None and seq_a > last + 1:
            self.stats["snapshots_missed"] += seq_a - last - 1  # polled slower than the Pico samples
        if seq_a == last:
            return True
        self._last_seq = seq_a
        readings = [(name, values[i] / 100) for i, name in enumerate(names)]
        if readings:
            self.stats["frames"] += 1
            self.events.reading(self.device, readings, now_ms(), seq_a)
        return True

    def _read_ring(self, names: list[str], last: int | None, newest: int) -> bool:
        """Read every snapshot after ``last`` up to ``newest`` (the live one) back from the
        Pico's ring, RING_BATCH at most (the rest at the next poll), each stored at the time
        the Pico took it; at first contact, all the ring holds (the store refuses what a
        gateway before this one stored). What fell off the ring is counted in
        ``snapshots_missed``. False, reporting nothing, when the Pico restarted meanwhile."""
        if last == newest:
            return True
        want = (last + 1) if last is not None else max(0, newest - self._ring + 1)
        boot = self._boot_id
        rows: list[Row] = []
        for _ in range(RING_BATCH):  # (the rest at the next poll: commands wait on our lock meanwhile)
            if want > newest:
                break
            self.heartbeat.beat()  # (one request per snapshot: a long catch-up is no stall)
            have, oldest, taken_at, values = self._ring_request(want)
            if not have:
                if oldest > want and oldest <= newest:  # fell off the ring: what is kept starts later
                    if last is not None:
                        self.stats["snapshots_missed"] += oldest - want
                    want = oldest
                    continue
                if last is not None:  # (not kept for another reason: counted, never waited for)
                    self.stats["snapshots_missed"] += 1
                want += 1
                continue
            if want != newest:
                self.stats["snapshots_recovered"] += 1
            rows.extend((self.device, name, values[i] / 100, taken_at, want, boot, 1) for i, name in enumerate(names))
            self.stats["frames"] += 1
            want += 1
        if self._read_boot()[0] != boot:  # restarted while read: the answers may be the new boot's
            self._names = None
            return False
        self._last_seq = want - 1
        if rows:
            self.events.readings(self.device, rows)
        return True

    def _ring_request(self, want: int) -> tuple[bool, int, int, list[int]]:
        """Ask the Pico's ring for snapshot ``want``: (kept, the oldest kept, when it was taken
        in Unix ms, its values). OSError when the Pico does not answer in ``command_timeout``."""
        addr = self.config.address
        for _ in range(RING_ATTEMPTS):
            if self._ring_ack is None:
                self._ring_ack = self._read(RING_ACK, 1)[0]
            req = (self._ring_ack + 1) & 0xFF
            message = [RING_WANT, *want.to_bytes(4, "little"), req]  # (RING_REQ last: the Pico acts on it)
            self._xfer("ring request", lambda bus, message=message: bus.i2c_rdwr(i2c_msg.write(addr, message)))
            self._ring_ack = None  # (unknown until the answer: after a failure it is read again)
            deadline = time.monotonic() + self.config.command_timeout
            while True:
                raw = self._read(RING_ACK, ANSWER.size)
                read_at = now_ms()
                ack, have, oldest, now, seq, taken, *values = ANSWER.unpack(raw)
                if ack == req:
                    break
                if time.monotonic() > deadline:
                    raise OSError(f"the Pico at 0x{addr:02x} did not answer a ring request within "
                                  f"{self.config.command_timeout:g} s")
                time.sleep(RING_POLL)
            self._ring_ack = ack
            if seq == want:
                # The Pico wrote NOW just before it answered: the snapshot was taken
                # NOW - taken ms before we read the answer.
                return bool(have), oldest, read_at - ((now - taken) & CLOCK_MASK), values
            self.stats["ring_stale_answers"] += 1  # a request from before (a restart of ours): ask again
        raise OSError(f"the Pico at 0x{addr:02x} answered {RING_ATTEMPTS} ring requests for another snapshot")

    # -- tutorial target ---------------------------------------------------------------
    def poll_tutorial(self) -> None:
        value = self._xfer("read_byte", lambda bus: bus.read_byte(self.config.address))
        self.events.led_state(self.device, value != 0)

    # -- commands --------------------------------------------------------------------
    def set_led(self, command: LedCommand) -> bool:
        try:
            with self._lock:
                return self._speech.set_led(self, command)
        except OSError as exc:
            self.stats["command_errors"] += 1
            raise CommandError(str(exc)) from exc

    def set_led_tutorial(self, command: LedCommand) -> bool:
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

    def set_led_picogw(self, command: LedCommand) -> bool:
        self._write(LED_CMD, CMD_CODES[command])
        deadline = time.monotonic() + self.config.command_timeout
        while True:
            led, cmd = self._read(LED, 2)
            if cmd == IDLE:
                return led == 1
            if time.monotonic() > deadline:
                self.stats["command_timeouts"] += 1
                raise CommandError(f"the Pico did not apply the command within {self.config.command_timeout:g} s; "
                                   f"{MAY_STILL_HAPPEN}")
            time.sleep(COMMAND_POLL)

    def poll(self) -> None:
        with self._lock:
            self._speech.poll(self)


PROTOCOLS.register(I2C, "picogw", I2cSpeech(I2cLink.poll_picogw, I2cLink.set_led_picogw))
PROTOCOLS.register(I2C, "tutorial", I2cSpeech(I2cLink.poll_tutorial, I2cLink.set_led_tutorial))
