# Tutorial program (not our firmware): LED over UART0, as in the well-known
# "connect a Pi to a Pico" tutorial. The Pi writes "led_on\r" or "led_off\r";
# the Pico answers "on\r\n" or "off\r\n". Anything else gets no answer.

import time

from machine import UART, Pin

uart = UART(0, baudrate=115200, tx=Pin(0), rx=Pin(1))
led = Pin("LED", Pin.OUT)
buf = b""

while True:
    if uart.any():
        buf += uart.read()
        while True:
            end = buf.find(b"\r")
            if end < 0:
                break
            command = buf[:end].strip()
            buf = buf[end + 1:]
            if command == b"led_on":
                led.value(1)
                uart.write(b"on\r\n")
            elif command == b"led_off":
                led.value(0)
                uart.write(b"off\r\n")
        if len(buf) > 64:      # a line that never ends: forget it
            buf = b""
    time.sleep_ms(10)
