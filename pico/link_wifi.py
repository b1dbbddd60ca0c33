# wifi link (Pico W): the Pico publishes to the MQTT broker itself.
#   <base>/<dev>/status        online (retained); last will: offline (retained)
#   <base>/<dev>/hello         {"proto":1,"fw":...,"metrics":[...]} (retained)
#   <base>/<dev>/sensor/<m>    plain-text value, not retained
#   <base>/<dev>/state/led     on/off (retained), after every change and at connect
#   <base>/<dev>/cmd/led       subscribed: on/off/toggle any case, 1/0, true/false
# Wi-Fi and broker are reconnected with exponential backoff (cap 30 s), and
# the subscription is renewed after every reconnect.

import json

import clock
import core
import frame
import led as ledmod
import wifi
from umqtt.simple import MQTTClient

DEFAULTS = {"ssid": "", "password": "", "broker": "192.168.1.2", "port": 1883,
            "base": "pico", "user": None, "mqtt_password": None, "client_id": None}
KEEPALIVE_S = 30   # the broker publishes our will this long (x1.5) after we vanish
LOOP_MS = 20


class WifiLink:
    def __init__(self, config, node):
        c = dict(DEFAULTS)
        c.update(getattr(config, "WIFI", None) or {})
        self.cfg = c
        self.node = node
        self.interval_ms = getattr(config, "READ_INTERVAL", 5.0) * 1000
        self.prefix = "%s/%s/" % (c["base"], node.device)
        self.cmd_topic = (self.prefix + "cmd/led").encode()
        self.client = None
        self.led_dirty = True

    def topic(self, rest):
        return (self.prefix + rest).encode()

    def on_message(self, topic, msg):
        if topic != self.cmd_topic:
            return
        word = ledmod.parse_word(msg)
        if word is None:
            print("cmd/led: ignored", msg)   # the gateway reports rejections
            return
        ledmod.apply(self.node.led, word)
        self.led_dirty = True

    def connect_mqtt(self):
        c = self.cfg
        client = MQTTClient(c["client_id"] or ("pico-" + self.node.device), c["broker"],
                            port=c["port"], user=c["user"], password=c["mqtt_password"],
                            keepalive=KEEPALIVE_S)
        client.set_callback(self.on_message)
        client.set_last_will(self.topic("status"), b"offline", retain=True)
        client.connect()
        self.client = client
        client.publish(self.topic("status"), b"online", retain=True)
        hello = {"proto": 1, "fw": core.FW_VERSION, "metrics": self.node.sensors.names}
        client.publish(self.topic("hello"), json.dumps(hello).encode(), retain=True)
        client.subscribe(self.cmd_topic)
        self.led_dirty = True
        print("mqtt: connected to", c["broker"])

    def drop_mqtt(self):
        # Close the socket without DISCONNECT, so the broker sends our will.
        if self.client is not None:
            try:
                self.client.sock.close()
            except Exception:
                pass
        self.client = None

    def publish_readings(self):
        for name, value in self.node.sensors.read():
            text = frame.fmt_number(value)
            if text is not None:
                self.client.publish(self.topic("sensor/" + name), text.encode())

    def serve(self):
        # Runs while connected; any OSError means the link broke.
        client = self.client
        readings = clock.Every(self.interval_ms)
        last_sent = clock.ticks_ms()
        while True:
            if not self.wlan.isconnected():
                raise OSError("wifi lost")
            client.check_msg()
            if self.led_dirty:
                self.led_dirty = False
                client.publish(self.topic("state/led"), self.node.led.word().encode(), retain=True)
                last_sent = clock.ticks_ms()
            if readings.due():
                self.publish_readings()
                last_sent = clock.ticks_ms()
            if clock.ticks_diff(clock.ticks_ms(), last_sent) > KEEPALIVE_S * 500:
                client.ping()
                last_sent = clock.ticks_ms()
            clock.sleep_ms(LOOP_MS)

    def run(self):
        self.wlan = wifi.station()
        backoff = wifi.Backoff()
        while True:
            wifi.connect(self.wlan, self.cfg, backoff)
            try:
                self.connect_mqtt()
                backoff.reset()
                self.serve()
            except Exception as e:   # OSError, umqtt's MQTTException
                print("mqtt:", repr(e))
            self.drop_mqtt()
            backoff.wait()


def run(config, node):
    WifiLink(config, node).run()
