# Tutorial program (not our firmware): LED over TCP on a Pico W, as in the
# well-known "connect a Pi to a Pico" tutorial. A server on port 8080 takes
# one command per connection: "on\n", "off\n", or "?\n" (answered "on\n" or
# "off\n"); then it closes the connection.

import socket
import time

import network
from machine import Pin

SSID = "your-network"      # placeholders: fill in, or put WIFI in config.py
PASSWORD = "your-password"
PORT = 8080

try:
    from config import WIFI
    SSID = WIFI["ssid"]
    PASSWORD = WIFI["password"]
except (ImportError, KeyError):
    pass

led = Pin("LED", Pin.OUT)

wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect(SSID, PASSWORD)
while not wlan.isconnected():
    time.sleep(0.5)
print("connected", wlan.ifconfig()[0])

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(socket.getaddrinfo("0.0.0.0", PORT)[0][-1])
server.listen(1)

while True:
    conn, addr = server.accept()
    try:
        command = conn.recv(64).strip()
        if command == b"on":
            led.value(1)
        elif command == b"off":
            led.value(0)
        elif command == b"?":
            conn.send(b"on\n" if led.value() else b"off\n")
    except OSError:
        pass
    conn.close()
