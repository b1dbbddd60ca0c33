# A MicroPython program: echo every UART line back upper-cased; "led_on" /
# "led_off" drive the LED like the tutorial.
import time

from machine import UART, Pin

led = Pin("LED", Pin.OUT)
uart = UART(0, baudrate=115200, tx=Pin(0), rx=Pin(1))
buf = b""
while True:
    if uart.any():
        buf += uart.read()
        while b"\r" in buf or b"\n" in buf:
            i = min(x for x in (buf.find(b"\r"), buf.find(b"\n")) if x >= 0)
            line, buf = buf[:i], buf[i + 1:]
            if not line:
                continue
            if line == b"led_on":
                led.on()
            elif line == b"led_off":
                led.off()
            uart.write(b"ECHO " + line.upper() + b"\r\n")
    time.sleep_ms(5)
