# picogw I2C register map (docs/protocol.md section 2). Pure logic on a
# 256-byte bytearray that machine.I2CTarget serves in memory mode (and
# new_boot_id, its one question to the port); runs on MicroPython and CPython
# alike, held to tests/vectors/regmap.json.
#
#   0x00 MAGIC "PG"  0x02 VERSION  0x03 COUNT  0x04 LED  0x05 LED_CMD
#   0x06 CMD_DONE (u16)  0x08 SEQ_A (u32)  0x0C VALUES (12 x i32, value*100)
#   0x3C SEQ_B (u32)  0x40 NAMES (12 x 8 bytes)  0xA0 DEVICE (16 bytes)
#   0xB0 BOOT_ID (u32, non-zero, new at every boot; 0 on older firmware)
#   0xB4 FEATURES (bit 0: snapshot ring)  0xB5 RING_SIZE (K)
#   0xB8 RING_WANT (u32, Pi writes)  0xBC RING_REQ (Pi writes, after WANT)
#   0xBD RING_ACK  0xBE RING_HAVE  0xC0 RING_OLDEST (u32)  0xC4 RING_NOW (u32)
#   0xC8 WIN_SEQ (u32)  0xCC WIN_MS (u32)  0xD0 WIN_VALUES (12 x i32)
# All little-endian. Older firmware reads 0 from 0xB4 on: no ring.

import struct

SIZE = 256
MAGIC = 0x00
VERSION = 0x02
COUNT = 0x03
LED = 0x04
LED_CMD = 0x05
CMD_DONE = 0x06
SEQ_A = 0x08
VALUES = 0x0C
SEQ_B = 0x3C
NAMES = 0x40
DEVICE = 0xA0
BOOT_ID = 0xB0
FEATURES = 0xB4
RING_SIZE = 0xB5
RING_WANT = 0xB8
RING_REQ = 0xBC
RING_ACK = 0xBD
RING_HAVE = 0xBE
RING_OLDEST = 0xC0
RING_NOW = 0xC4
WIN_SEQ = 0xC8
WIN_MS = 0xCC
WIN_VALUES = 0xD0

MAP_VERSION = 1
SLOTS = 12
NAME_LEN = 8
DEVICE_LEN = 16
IDLE = 0xFF
CMD_OFF = 0
CMD_ON = 1
CMD_TOGGLE = 2

FEATURE_RING = 1
MAX_RING = 255      # RING_SIZE is one byte
ENTRY = 56          # a kept snapshot: seq u32, ms u32, 12 x i32 (as WIN_SEQ .. the end)
CLOCK_MASK = 0x3FFFFFFF   # the Pico's ms clock, as the serial protocol's t=
SEQ_MASK = 0xFFFFFFFF

I32_MIN = -0x80000000
I32_MAX = 0x7FFFFFFF


def new_buffer():
    return bytearray(SIZE)


def _put_text(buf, off, size, text):
    b = text.encode()[:size]
    for i in range(size):
        buf[off + i] = b[i] if i < len(b) else 0


def fixed100(v):
    # A reading as the register's signed 32-bit value*100, rounded half away
    # from zero and clamped to the int32 range. ints stay exact (no float).
    if isinstance(v, int):
        n = v * 100
    else:
        if v != v:            # nan: no meaningful value
            return 0
        x = v * 100.0
        if x >= I32_MAX:
            return I32_MAX
        if x <= I32_MIN:
            return I32_MIN
        n = int(x + 0.5) if x >= 0 else -int(-x + 0.5)
    if n > I32_MAX:
        return I32_MAX
    if n < I32_MIN:
        return I32_MIN
    return n


def boot_id(n):
    # A BOOT_ID from a random number: 32 bits and never 0, which is what a
    # controller reads on firmware that predates the register.
    n &= 0xFFFFFFFF
    return n if n else 1


def new_boot_id():
    # A fresh BOOT_ID for this boot. os.urandom is the RP2040's ring
    # oscillator; a port without it (or without random) gets the microsecond
    # clock, which still differs between boots that are not alike to the us.
    try:
        import os
        return boot_id(int.from_bytes(os.urandom(4), "little"))
    except Exception:
        pass
    try:
        import random
        return boot_id(random.getrandbits(32))
    except Exception:
        pass
    import time
    ticks_us = getattr(time, "ticks_us", None)
    return boot_id(ticks_us() if ticks_us else int(time.time() * 1000000))


def write_static(buf, device, names, led, boot=0, ring=0):
    # MAGIC, VERSION, COUNT, NAMES, DEVICE, LED, BOOT_ID, FEATURES and
    # RING_SIZE (ring: K snapshots kept, 0 for none). Call once at boot
    # (before the I2C target starts, with LED_CMD idle) and again at will, with
    # the same boot: it never touches LED_CMD, CMD_DONE, the snapshot or the
    # ring's request and window.
    names = names[:SLOTS]
    buf[0] = 0x50  # "P"
    buf[1] = 0x47  # "G"
    buf[VERSION] = MAP_VERSION
    buf[COUNT] = len(names)
    buf[LED] = 1 if led else 0
    for i in range(SLOTS):
        _put_text(buf, NAMES + NAME_LEN * i, NAME_LEN, names[i] if i < len(names) else "")
    _put_text(buf, DEVICE, DEVICE_LEN, device)
    struct.pack_into("<I", buf, BOOT_ID, boot & 0xFFFFFFFF)
    ring = min(max(ring, 0), MAX_RING)
    buf[FEATURES] = FEATURE_RING if ring else 0
    buf[RING_SIZE] = ring


def init(buf, device, names, led, boot=0, ring=0):
    # Boot-time layout: static registers, LED_CMD idle, CMD_DONE 0, no snapshot,
    # no ring request (RING_REQ == RING_ACK).
    for i in range(SIZE):
        buf[i] = 0
    write_static(buf, device, names, led, boot, ring)
    buf[LED_CMD] = IDLE


def write_snapshot(buf, seq, values):
    # Seqlock order: SEQ_B, then all VALUES, then SEQ_A. A reader that reads
    # 0x08..0x3F in one transaction and sees SEQ_A == SEQ_B got a whole snapshot.
    seq &= 0xFFFFFFFF
    struct.pack_into("<I", buf, SEQ_B, seq)
    for i in range(SLOTS):
        struct.pack_into("<i", buf, VALUES + 4 * i, fixed100(values[i]) if i < len(values) else 0)
    struct.pack_into("<I", buf, SEQ_A, seq)


class Ring:
    # The last k snapshots, each with its seq and the Pico's clock (ms) when
    # it was taken, in a fixed bytearray (k * ENTRY bytes; nothing allocated
    # per snapshot). The Pi asks for one by seq: it writes RING_WANT, then
    # RING_REQ (a byte other than RING_ACK); serve(), called from the main
    # loop, answers in the window: RING_HAVE, RING_OLDEST, RING_NOW, WIN_*,
    # then RING_ACK = RING_REQ last, so a Pi that reads RING_ACK first in one
    # transaction with the rest gets a whole answer. The window changes only
    # at the next request.

    def __init__(self, k):
        self.k = min(max(int(k), 1), MAX_RING)
        self.data = bytearray(ENTRY * self.k)
        self.held = 0       # snapshots kept, up to k
        self.newest = 0     # seq of the newest kept

    def put(self, seq, ms, values):
        seq &= SEQ_MASK
        off = (seq % self.k) * ENTRY
        struct.pack_into("<II", self.data, off, seq, ms & CLOCK_MASK)
        for i in range(SLOTS):
            struct.pack_into("<i", self.data, off + 8 + 4 * i, fixed100(values[i]) if i < len(values) else 0)
        if self.held and ((seq - self.newest) & SEQ_MASK) != 1:
            self.held = 0   # not the next one: the ring starts over from it
        self.newest = seq
        if self.held < self.k:
            self.held += 1

    def oldest(self):
        return (self.newest - self.held + 1) & SEQ_MASK

    def find(self, want):
        # The offset of snapshot want in data, or -1 when it is not kept.
        want &= SEQ_MASK
        if not self.held or ((self.newest - want) & SEQ_MASK) >= self.held:
            return -1
        off = (want % self.k) * ENTRY
        if struct.unpack_from("<I", self.data, off)[0] != want:
            return -1
        return off

    def serve(self, buf, now):
        # Answer a pending request (RING_REQ != RING_ACK); True when it did.
        req = buf[RING_REQ]
        if req == buf[RING_ACK]:
            return False
        want = struct.unpack_from("<I", buf, RING_WANT)[0]
        off = self.find(want)
        struct.pack_into("<II", buf, RING_OLDEST, self.oldest() if self.held else 0, now & CLOCK_MASK)
        if off >= 0:
            buf[RING_HAVE] = 1
            buf[WIN_SEQ:WIN_SEQ + ENTRY] = memoryview(self.data)[off:off + ENTRY]
        else:
            buf[RING_HAVE] = 0
            struct.pack_into("<II", buf, WIN_SEQ, want, 0)
            for i in range(WIN_VALUES, WIN_VALUES + 4 * SLOTS):
                buf[i] = 0
        buf[RING_ACK] = req
        return True


def pending_command(buf, led):
    # Polled every 20 ms. Returns the LED state (0/1) a pending LED_CMD asks
    # for, given the current state led, or None. Invalid values are reset to
    # IDLE here and ignored.
    c = buf[LED_CMD]
    if c == IDLE:
        return None
    if c == CMD_OFF:
        return 0
    if c == CMD_ON:
        return 1
    if c == CMD_TOGGLE:
        return 0 if led else 1
    buf[LED_CMD] = IDLE
    return None


def command_done(buf, led):
    # After the LED was set: LED, then CMD_DONE += 1, then LED_CMD = IDLE
    # (last, so a Pi that sees IDLE reads the new LED and CMD_DONE).
    buf[LED] = 1 if led else 0
    n = (buf[CMD_DONE] | (buf[CMD_DONE + 1] << 8)) + 1
    buf[CMD_DONE] = n & 0xFF
    buf[CMD_DONE + 1] = (n >> 8) & 0xFF
    buf[LED_CMD] = IDLE


def set_led(buf, led):
    buf[LED] = 1 if led else 0


def _text(buf, off, size):
    b = bytes(buf[off:off + size])
    z = b.find(b"\x00")
    if z >= 0:
        b = b[:z]
    return b.decode()


def parse(buf):
    # The whole map as a dict (what a controller would see); for tests and
    # for the simulator, not used by the firmware.
    n = buf[COUNT]
    seq_a = struct.unpack_from("<I", buf, SEQ_A)[0]
    seq_b = struct.unpack_from("<I", buf, SEQ_B)[0]
    return {
        "magic": bytes(buf[0:2]).decode(),
        "version": buf[VERSION],
        "count": n,
        "led": buf[LED],
        "led_cmd": buf[LED_CMD],
        "cmd_done": buf[CMD_DONE] | (buf[CMD_DONE + 1] << 8),
        "seq_a": seq_a,
        "seq_b": seq_b,
        "values": [struct.unpack_from("<i", buf, VALUES + 4 * i)[0] for i in range(min(n, SLOTS))],
        "names": [_text(buf, NAMES + NAME_LEN * i, NAME_LEN) for i in range(min(n, SLOTS))],
        "device": _text(buf, DEVICE, DEVICE_LEN),
        "boot_id": struct.unpack_from("<I", buf, BOOT_ID)[0],
        "features": buf[FEATURES],
        "ring_size": buf[RING_SIZE],
        "ring_ack": buf[RING_ACK],
        "ring_have": buf[RING_HAVE],
        "ring_oldest": struct.unpack_from("<I", buf, RING_OLDEST)[0],
        "ring_now": struct.unpack_from("<I", buf, RING_NOW)[0],
        "win_seq": struct.unpack_from("<I", buf, WIN_SEQ)[0],
        "win_ms": struct.unpack_from("<I", buf, WIN_MS)[0],
        "win_values": [struct.unpack_from("<i", buf, WIN_VALUES + 4 * i)[0] for i in range(min(n, SLOTS))],
    }
