# A Pico W TCP server on the port of a real board (8080, all interfaces):
# the simulator binds 127.0.0.1 and remaps the port. One command per
# connection, read with MicroPython's socket stream methods.
import socket
import time

import network
from machine import Pin

led = Pin("LED", Pin.OUT)
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect("ssid", "password")
while not wlan.isconnected():
    time.sleep_ms(10)
s = socket.socket()
s.bind(socket.getaddrinfo("0.0.0.0", 8080)[0][-1])
s.listen(1)
while True:
    conn, addr = s.accept()
    cmd = conn.readline().strip()
    if cmd == b"on":
        led.on()
    elif cmd == b"off":
        led.off()
    conn.write(b"on\n" if led.value() else b"off\n")
    conn.close()
