# An I2C target without memory: every byte goes through hard IRQ handlers
# (like the tutorial). A written non-zero byte turns the LED on, 0 off; a read
# returns the last byte written, then 0xA5, 0x5A ...
import time

from machine import I2CTarget, Pin

led = Pin("LED", Pin.OUT)
last = bytearray(1)
rx = bytearray(1)
counts = {"addr_r": 0, "addr_w": 0, "end_r": 0, "end_w": 0}


def handler(t):
    f = t.irq().flags()
    if f & I2CTarget.IRQ_ADDR_MATCH_READ:
        counts["addr_r"] += 1
        t.write(last)
    if f & I2CTarget.IRQ_ADDR_MATCH_WRITE:
        counts["addr_w"] += 1
    if f & I2CTarget.IRQ_WRITE_REQ:
        t.readinto(rx)
        last[0] = rx[0]
        led.value(1 if rx[0] else 0)
    if f & I2CTarget.IRQ_READ_REQ:
        t.write(b"\xa5\x5a")
    if f & I2CTarget.IRQ_END_READ:
        counts["end_r"] += 1
    if f & I2CTarget.IRQ_END_WRITE:
        counts["end_w"] += 1


t = I2CTarget(0, 0x43, scl=Pin(5), sda=Pin(4))
all_triggers = (I2CTarget.IRQ_ADDR_MATCH_READ | I2CTarget.IRQ_ADDR_MATCH_WRITE
                | I2CTarget.IRQ_READ_REQ | I2CTarget.IRQ_WRITE_REQ
                | I2CTarget.IRQ_END_READ | I2CTarget.IRQ_END_WRITE)
try:
    t.irq(handler, trigger=all_triggers)        # must be refused: not hard
except ValueError:
    t.irq(handler, trigger=all_triggers, hard=True)
while True:
    time.sleep(1)
