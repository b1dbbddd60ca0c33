# Answers "t\n" on UART0 with the internal temperature (RP2040 datasheet
# formula) and "a\n" with the raw count of ADC(26).
import time

from machine import ADC, UART, Pin

sensor = ADC(4)
pot = ADC(Pin(26))
uart = UART(0, baudrate=115200, tx=Pin(0), rx=Pin(1), timeout=100)
while True:
    line = uart.readline()
    if not line:
        continue
    line = line.strip()
    if line == b"t":
        raw = sensor.read_u16()
        volts = raw * 3.3 / 65535
        temp = 27 - (volts - 0.706) / 0.001721
        uart.write(b"%d %.2f\n" % (raw, temp))
    elif line == b"a":
        uart.write(b"%d\n" % pot.read_u16())
    elif line == b"ticks":
        t = time.ticks_ms()
        uart.write(b"%d\n" % t)
