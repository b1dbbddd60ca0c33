# picogw I2C register map (docs/protocol.md section 2). Pure logic on a
# 256-byte bytearray that machine.I2CTarget serves in memory mode (and
# new_boot_id, its one question to the port); runs on MicroPython and CPython
# alike, held to tests/vectors/regmap.json.
#
#   0x00 MAGIC "PG"  0x02 VERSION  0x03 COUNT  0x04 LED  0x05 LED_CMD
#   0x06 CMD_DONE (u16)  0x08 SEQ_A (u32)  0x0C VALUES (12 x i32, value*100)
#   0x3C SEQ_B (u32)  0x40 NAMES (12 x 8 bytes)  0xA0 DEVICE (16 bytes)
#   0xB0 BOOT_ID (u32, non-zero, new at every boot; 0 on older firmware)
# All little-endian.

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

MAP_VERSION = 1
SLOTS = 12
NAME_LEN = 8
DEVICE_LEN = 16
IDLE = 0xFF
CMD_OFF = 0
CMD_ON = 1
CMD_TOGGLE = 2

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


def write_static(buf, device, names, led, boot=0):
    # MAGIC, VERSION, COUNT, NAMES, DEVICE, LED, BOOT_ID. Call once at boot
    # (before the I2C target starts, with LED_CMD idle) and again at will, with
    # the same boot: it never touches LED_CMD, CMD_DONE or the snapshot.
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


def init(buf, device, names, led, boot=0):
    # Boot-time layout: static registers, LED_CMD idle, CMD_DONE 0, no snapshot.
    for i in range(SIZE):
        buf[i] = 0
    write_static(buf, device, names, led, boot)
    buf[LED_CMD] = IDLE


def write_snapshot(buf, seq, values):
    # Seqlock order: SEQ_B, then all VALUES, then SEQ_A. A reader that reads
    # 0x08..0x3F in one transaction and sees SEQ_A == SEQ_B got a whole snapshot.
    seq &= 0xFFFFFFFF
    struct.pack_into("<I", buf, SEQ_B, seq)
    for i in range(SLOTS):
        struct.pack_into("<i", buf, VALUES + 4 * i, fixed100(values[i]) if i < len(values) else 0)
    struct.pack_into("<I", buf, SEQ_A, seq)


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
    }
