# A usb Pico program that turns Ctrl-C off and keeps printing: nothing on the console stops it.
import time

import micropython

micropython.kbd_intr(-1)
while True:
    print("busy")
    time.sleep_ms(20)
