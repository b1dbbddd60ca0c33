# Tutorial program (not our firmware): LED over I2C, as in the well-known
# "connect a Pi to a Pico" tutorial. The Pico is an I2C target at 0x43 on
# I2C0 (GP4 SDA, GP5 SCL) served from IRQ handlers: a written non-zero byte
# turns the LED on, 0 turns it off; a read returns the last byte written.

import time

from machine import I2CTarget, Pin

ADDR = 0x43

try:  # not in the tutorial: lets several of these share one (simulated) bus
    from config import I2C
    ADDR = I2C["addr"]
except (ImportError, KeyError):
    pass

led = Pin("LED", Pin.OUT)
last = bytearray(1)     # the last byte written (0 = off)
rx = bytearray(1)


def on_i2c(target):
    flags = target.irq().flags()
    if flags & I2CTarget.IRQ_WRITE_REQ:
        target.readinto(rx)
        last[0] = rx[0]
        led.value(1 if rx[0] else 0)
    if flags & I2CTarget.IRQ_READ_REQ:
        target.write(last)


i2c = I2CTarget(0, ADDR, scl=Pin(5), sda=Pin(4))
i2c.irq(on_i2c, trigger=I2CTarget.IRQ_WRITE_REQ | I2CTarget.IRQ_READ_REQ, hard=True)

while True:
    time.sleep(1)
