# wifi link (Pico W): the Pico publishes to the MQTT broker itself.
#   <base>/<dev>/status        online (retained); last will: offline (retained)
#   <base>/<dev>/hello         {"proto":1,"fw":...,"metrics":[...],"boot":...,"ack":...} (retained)
#   <base>/<dev>/sensor/<m>    plain-text value, not retained (live readings, QoS 0)
#   <base>/<dev>/reading       every reading as JSON, QoS 1, kept until stored (below)
#   <base>/<dev>/state/led     on/off (retained), after every change and at connect
#   <base>/<dev>/cmd/led       subscribed: on/off/toggle any case, 1/0, true/false
#   <base>/<dev>/stored        subscribed: the gateway stored this boot's readings up to seq
#   <base>/<dev>/time          subscribed: the gateway's clock (and "send again")
# (docs/protocol.md, Wi-Fi.) Every reading gets this boot's number and a
# sequence number and is kept in RAM (WIFI_BUFFER readings, oldest dropped and
# counted when full) until the gateway says it stored it; after a reconnect, or
# when the gateway asks, what is kept is sent again, oldest first. Wi-Fi and
# broker are reconnected with exponential backoff (1 s doubling to 30 s, with
# jitter), and the subscriptions are renewed after every reconnect. A
# watchdog (WATCHDOG_MS) restarts the board when the main loop stops turning.

import json

import clock
import core
import frame
import led as ledmod
import wifi
from umqtt import simple as umqtt

DEFAULTS = {"ssid": "", "password": "", "broker": "192.168.1.2", "port": 1883,
            "base": "pico", "user": None, "mqtt_password": None, "client_id": None}
KEEPALIVE_S = 30   # the broker publishes our will this long (x1.5) after we vanish
LOOP_MS = 20
DEFAULT_BUFFER = 240       # readings kept until stored: 20 minutes at the default 5 s
DEFAULT_WATCHDOG_MS = 8000  # (the RP2040's watchdog takes 8388 ms at most)
SOCKET_TIMEOUT_S = 5       # a broker that does not answer this long: reconnect (the
# readings stay kept); without it a dead connection would block a read for ever.
# With the watchdog on, a third of its timeout at most (socket_timeout): a connect
# is two waits (the TCP connect, the CONNACK) with no turn of the loop between, and
# a watchdog that fired there would restart the board and lose what it keeps.
SEND_BURST = 8             # kept readings sent per loop turn at most (commands still get through)
ACK_WAIT_MS = 15000        # everything sent and nothing stored for this long: send again
RESET_CAUSES = {1: "power", 2: "hard", 3: "watchdog", 4: "deepsleep", 5: "soft"}


socket_timeout = SOCKET_TIMEOUT_S


class _TimedSockets:
    # umqtt.simple's view of the socket module: every socket it makes gets a
    # timeout, so that connecting to a broker that does not answer, or waiting
    # for a PUBACK that does not come, raises OSError instead of blocking.
    def __init__(self, mod):
        self.mod = mod

    def socket(self, *args):
        s = self.mod.socket(*args)
        s.settimeout(socket_timeout)
        return s

    def getaddrinfo(self, *args):
        return self.mod.getaddrinfo(*args)


if not isinstance(getattr(umqtt, "socket", None), (_TimedSockets, type(None))):
    umqtt.socket = _TimedSockets(umqtt.socket)


class Client(umqtt.MQTTClient):
    # umqtt's check_msg turns the socket non-blocking and back to blocking,
    # which drops the timeout: set it again after every message. Every wait for a
    # broker's answer (SUBACK, PUBACK) comes here: the watchdog is fed after each.
    wdt = None

    def wait_msg(self):
        try:
            return umqtt.MQTTClient.wait_msg(self)
        finally:
            if self.sock is not None:
                self.sock.settimeout(socket_timeout)
            if self.wdt is not None:
                self.wdt.feed()


def _reset_cause():
    try:
        import machine
        return RESET_CAUSES.get(machine.reset_cause(), "other")
    except Exception:
        return "other"


class WifiLink:
    def __init__(self, config, node):
        c = dict(DEFAULTS)
        c.update(getattr(config, "WIFI", None) or {})
        self.cfg = c
        self.node = node
        self.interval_ms = getattr(config, "READ_INTERVAL", 5.0) * 1000
        self.prefix = "%s/%s/" % (c["base"], node.device)
        self.cmd_topic = self.topic("cmd/led")
        self.stored_topic = self.topic("stored")
        self.time_topic = self.topic("time")
        self.reading_topic = self.topic("reading")
        self.client = None
        self.led_dirty = True
        size = getattr(config, "WIFI_BUFFER", DEFAULT_BUFFER)
        if size:
            node.enable_acks(size)
        self.boot = int(node.boot)
        self.acked = None          # the newest seq the gateway said it stored, not yet applied
        self.resend = False        # the gateway asked for everything kept again
        self.last_ack = clock.ticks_ms()
        self.readings = clock.Every(self.interval_ms)
        self.watchdog_ms = getattr(config, "WATCHDOG_MS", DEFAULT_WATCHDOG_MS)
        self.wdt = None            # started by run()

    def topic(self, rest):
        return (self.prefix + rest).encode()

    # --- what arrives (from check_msg, or while umqtt waits for a PUBACK) ---
    def on_message(self, topic, msg):
        if topic == self.cmd_topic:
            word = ledmod.parse_word(msg)
            if word is None:
                print("cmd/led: ignored", msg)   # the gateway reports rejections
                return
            ledmod.apply(self.node.led, word)
            self.led_dirty = True
            return
        if topic != self.stored_topic and topic != self.time_topic:
            return
        try:
            body = json.loads(msg)
            now = body.get("now")
        except Exception:
            self.node.counts["malformed"] += 1
            return
        if isinstance(now, int) and now > 0:
            self.node.time_ms = now
            self.node.time_ticks = self.node.ticks_ms() & core.T_MASK
        if topic == self.time_topic:
            if body.get("resend"):
                self.resend = True
            return
        seq = body.get("seq")
        if body.get("boot") != self.boot or not isinstance(seq, int):
            self.node.counts["ignored"] += 1   # meant for an earlier boot
            return
        if self.acked is None or core.seq_le(self.acked, seq):
            self.acked = seq

    # --- the loop's every turn, connected or not ---
    def tick(self):
        # Feed the watchdog, and take the readings that are due (kept until stored).
        if self.wdt is not None:
            self.wdt.feed()
        if self.node.ring is not None and self.readings.due():
            self.take_reading()

    def take_reading(self):
        node = self.node
        values = []
        for name, value in node.sensors.read():
            text = frame.fmt_number(value)
            if text is not None:
                values.append((name, text))
        if not values:
            return
        node.ring.add(node.next_seq(), node.ticks_ms() & core.T_MASK,
                      ",".join('"%s":%s' % nv for nv in values))
        if self.client is not None:
            for name, text in values:   # live, for whoever reads the plain topics
                self.client.publish(self.topic("sensor/" + name), text.encode())

    def message(self, i):
        # The JSON of kept reading i, as sent now (docs/protocol.md, Wi-Fi).
        ring, node = self.node.ring, self.node
        ticks = ring.ticks[i]
        age = core.t_diff(node.ticks_ms() & core.T_MASK, ticks)
        ts = node.unix_ms(ticks)
        return ('{"boot":%d,"seq":%d,"values":{%s},%s"age":%d,"lost":%d,"oldest":%d}' % (
            self.boot, ring.seqs[i], ring.texts[i], "" if ts is None else '"ts":%d,' % ts,
            max(0, age), ring.lost, ring.oldest_seq())).encode()

    def apply_acks(self):
        ring = self.node.ring
        if ring is None:
            return
        if self.acked is not None:
            if ring.ack(self.acked):
                self.last_ack = clock.ticks_ms()
            self.acked = None
        if self.resend:
            self.resend = False
            ring.rewind()
            self.last_ack = clock.ticks_ms()
        elif ring.count and not ring.unsent and clock.ticks_diff(clock.ticks_ms(), self.last_ack) > ACK_WAIT_MS:
            ring.rewind()   # everything went to the broker, none was stored: the gateway missed them
            self.last_ack = clock.ticks_ms()

    def send_kept(self):
        # Kept readings not yet sent, oldest first, each at QoS 1 (umqtt waits for its PUBACK).
        ring = self.node.ring
        for _ in range(SEND_BURST):
            i = ring.take_unsent()
            if i < 0:
                return
            self.client.publish(self.reading_topic, self.message(i), qos=1)
            self.tick()
            self.apply_acks()

    # --- the connection ---
    def hello(self):
        hello = {"proto": 1, "fw": core.FW_VERSION, "metrics": self.node.sensors.names,
                 "boot": self.boot, "reset": _reset_cause()}
        ring = self.node.ring
        if ring is not None:
            hello["ack"] = ring.size
            hello["lost"] = ring.lost
        return json.dumps(hello).encode()

    def connect_mqtt(self):
        c = self.cfg
        client = Client(c["client_id"] or ("pico-" + self.node.device), c["broker"],
                        port=c["port"], user=c["user"], password=c["mqtt_password"],
                        keepalive=KEEPALIVE_S)
        client.wdt = self.wdt
        client.set_callback(self.on_message)
        client.set_last_will(self.topic("status"), b"offline", retain=True)
        try:
            client.connect(timeout=socket_timeout)   # umqtt.simple 1.4 and later set their own
        except TypeError:
            client.connect()                           # earlier ones: the socket's own (_TimedSockets)
        self.client = client
        if self.wdt is not None:
            self.wdt.feed()   # (the connect's two waits are behind us; no reading before the hello)
        client.subscribe(self.cmd_topic)
        if self.node.ring is not None:
            client.subscribe(self.stored_topic)
            client.subscribe(self.time_topic)
            self.node.ring.rewind()   # whatever was sent before may not have arrived
            self.last_ack = clock.ticks_ms()
        client.publish(self.topic("status"), b"online", retain=True)
        client.publish(self.topic("hello"), self.hello(), retain=True)
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
        # Without a buffer (WIFI_BUFFER = 0): live readings on the plain topics only, as before.
        for name, value in self.node.sensors.read():
            text = frame.fmt_number(value)
            if text is not None:
                self.client.publish(self.topic("sensor/" + name), text.encode())

    def serve(self):
        # Runs while connected; any OSError means the link broke.
        client = self.client
        ring = self.node.ring
        last_sent = clock.ticks_ms()
        while True:
            self.tick()
            if not self.wlan.isconnected():
                raise OSError("wifi lost")
            client.check_msg()
            if self.led_dirty:
                self.led_dirty = False
                client.publish(self.topic("state/led"), self.node.led.word().encode(), retain=True)
                last_sent = clock.ticks_ms()
            if ring is None:
                if self.readings.due():
                    self.publish_readings()
                    last_sent = clock.ticks_ms()
            else:
                self.apply_acks()
                if ring.unsent:
                    self.send_kept()
                    last_sent = clock.ticks_ms()
            if clock.ticks_diff(clock.ticks_ms(), last_sent) > KEEPALIVE_S * 500:
                client.ping()
                last_sent = clock.ticks_ms()
            clock.sleep_ms(LOOP_MS)

    def run(self):
        if self.watchdog_ms:
            import machine
            global socket_timeout
            timeout_ms = min(int(self.watchdog_ms), 8388)
            socket_timeout = max(1, min(SOCKET_TIMEOUT_S, timeout_ms // 3000))
            self.wdt = machine.WDT(timeout=timeout_ms)
        self.wlan = wifi.station()
        backoff = wifi.Backoff()
        while True:
            wifi.connect(self.wlan, self.cfg, backoff, self.tick)
            try:
                self.connect_mqtt()
                backoff.reset()
                self.serve()
            except Exception as e:   # OSError, umqtt's MQTTException
                print("mqtt:", repr(e))
            self.drop_mqtt()
            backoff.wait(self.tick)


def run(config, node):
    WifiLink(config, node).run()
