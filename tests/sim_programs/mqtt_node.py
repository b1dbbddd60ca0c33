# A Pico W program: Wi-Fi, umqtt with a last will, echoes <base>/<dev>/cmd
# messages to <base>/<dev>/echo, drives the LED from cmd "on"/"off".
import time

import network
from machine import Pin
from umqtt.simple import MQTTClient

import config

W = config.WIFI
base = "%s/%s/" % (W["base"], config.DEVICE)
led = Pin("LED", Pin.OUT)

wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect(W["ssid"], W["password"])
while not wlan.isconnected():
    time.sleep_ms(50)


def on_msg(topic, msg):
    if msg == b"on":
        led.on()
    elif msg == b"off":
        led.off()
    client.publish(base + "echo", b"got " + msg)


client = MQTTClient("pico-" + config.DEVICE, W["broker"], port=W["port"], keepalive=30)
client.set_callback(on_msg)
client.set_last_will(base + "status", "offline", retain=True)
client.connect()
client.subscribe(base + "cmd")          # waits for the SUBACK
client.publish(base + "status", b"online", retain=True)
n = 0
while True:
    client.check_msg()
    time.sleep_ms(10)
    n += 1
    if n % 500 == 0:
        client.ping()
