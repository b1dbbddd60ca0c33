# Says how it booted on UART0; "reset" -> machine.reset(), "wdt" -> starve a
# watchdog, "led" -> LED on.
import time

import machine

uart = machine.UART(0, baudrate=115200, tx=machine.Pin(0), rx=machine.Pin(1), timeout=50)
uart.write(b"boot cause=%d\n" % machine.reset_cause())
led = machine.Pin("LED", machine.Pin.OUT)
while True:
    line = uart.readline()
    if line == b"reset\n":
        machine.reset()
    elif line == b"wdt\n":
        machine.WDT(timeout=100)
        time.sleep(1)
    elif line == b"led\n":
        led.on()
        uart.write(b"led on\n")
