# An I2C target in memory mode: reads never run Python code. Register 5 is a
# command register polled by the main loop: 0 = LED off, 1 = LED on; the loop
# sets it to 0xFF when done and counts commands in register 6.
import time

from machine import I2CTarget, Pin

import config

mem = bytearray(32)
mem[0:2] = b"PG"
mem[5] = 0xFF
led = Pin("LED", Pin.OUT)
events = []


def on_irq(t):
    f = t.irq().flags()
    if f & I2CTarget.IRQ_END_WRITE:
        events.append(t.memaddr)


i2c = I2CTarget(config.I2C["id"], config.I2C["addr"], mem=mem)
i2c.irq(on_irq)
while True:
    cmd = mem[5]
    if cmd != 0xFF:
        if cmd in (0, 1):
            led.value(cmd)
            mem[6] = (mem[6] + 1) & 0xFF
        mem[5] = 0xFF
    mem[7] = len(events) & 0xFF
    time.sleep_ms(5)
