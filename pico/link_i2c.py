# i2c link: the Pico is an I2C target serving the register map of
# docs/protocol.md 2 in memory mode. The I2C driver answers reads from the
# buffer without running Python (no clock stretching); the main loop polls
# LED_CMD every 20 ms and writes a snapshot every READ_INTERVAL. BOOT_ID is
# new at every boot, so the Pi can tell a restart (perhaps with other metrics)
# from a sequence number that merely moved on. The last I2C_RING snapshots are
# kept, each with the clock when it was taken, and served one at a time on the
# Pi's request (regmap.Ring), so a poll that failed loses nothing the ring holds.

import clock
import machine
import regmap

DEFAULTS = {"id": 0, "addr": 0x43, "sda": 4, "scl": 5}
POLL_MS = 20
DEFAULT_RING = 32   # snapshots kept: 160 s at the default 5 s READ_INTERVAL, 56 bytes each


def run(config, node):
    c = dict(DEFAULTS)
    c.update(getattr(config, "I2C", None) or {})
    led = node.led
    names = node.sensors.names[:regmap.SLOTS]
    boot = regmap.new_boot_id()
    size = min(max(int(getattr(config, "I2C_RING", DEFAULT_RING)), 0), regmap.MAX_RING)
    ring = regmap.Ring(size) if size else None
    buf = regmap.new_buffer()
    regmap.init(buf, node.device, names, led.state, boot, size)
    seq = 0
    # The first snapshot is in place before the target answers, so a Pi
    # never sees an empty one.
    snapshot(buf, ring, seq, node)
    target = machine.I2CTarget(c["id"], c["addr"], mem=buf,
                               scl=machine.Pin(c["scl"]), sda=machine.Pin(c["sda"]))
    readings = clock.Every(getattr(config, "READ_INTERVAL", 5.0) * 1000)
    readings.due()   # the boot snapshot counts as this period's reading
    try:
        while True:
            want = regmap.pending_command(buf, led.state)
            if want is not None:
                led.set(want)
                regmap.command_done(buf, led.state)
            if readings.due():
                seq = (seq + 1) & 0xFFFFFFFF
                # re-assert the read-only registers in case a controller
                # wrote over them, then the snapshot in seqlock order
                regmap.write_static(buf, node.device, names, led.state, boot, size)
                snapshot(buf, ring, seq, node)
            if ring is not None:
                ring.serve(buf, clock.ticks_ms())
            clock.sleep_ms(POLL_MS)
    finally:
        target.deinit()


def snapshot(buf, ring, seq, node):
    # One reading: into the ring (with the clock now) and the live snapshot.
    values = [v for _, v in node.sensors.read()]
    if ring is not None:
        ring.put(seq, clock.ticks_ms(), values)
    regmap.write_snapshot(buf, seq, values)
