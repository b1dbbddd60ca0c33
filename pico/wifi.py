# Wi-Fi station connection with exponential backoff, shared by the wifi and
# tcp links (Pico W). `idle`, when given, is called every IDLE_MS or so while
# these wait (the wifi link feeds its watchdog and keeps taking readings).

import clock
import network

BACKOFF_START_S = 1
BACKOFF_CAP_S = 30
CONNECT_TIMEOUT_MS = 20000
IDLE_MS = 100


def _jitter(ms):
    # ms scaled by a random factor in 0.5 .. 1.0, so Picos that lost the same
    # access point (or broker) at the same moment do not come back in step.
    try:
        import random
        r = random.getrandbits(10)
    except Exception:
        r = clock.ticks_ms() & 1023
    return ms // 2 + (ms // 2) * r // 1023


def sleep(ms, idle=None):
    # clock.sleep_ms, calling idle() every IDLE_MS meanwhile.
    if idle is None:
        clock.sleep_ms(ms)
        return
    end = clock.ticks_add(clock.ticks_ms(), ms)
    while True:
        idle()
        left = clock.ticks_diff(end, clock.ticks_ms())
        if left <= 0:
            return
        clock.sleep_ms(min(left, IDLE_MS))


class Backoff:
    def __init__(self, start=BACKOFF_START_S, cap=BACKOFF_CAP_S):
        self.start = start
        self.cap = cap
        self.delay = start

    def wait(self, idle=None):
        ms = _jitter(int(self.delay * 1000))
        print("retrying in", ms, "ms")
        sleep(ms, idle)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self):
        self.delay = self.start


def station():
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    return wlan


def connect_once(wlan, ssid, password, timeout_ms=CONNECT_TIMEOUT_MS, idle=None):
    # True when connected within timeout_ms.
    if wlan.isconnected():
        return True
    try:
        wlan.disconnect()
    except Exception:
        pass
    wlan.connect(ssid, password)
    start = clock.ticks_ms()
    while not wlan.isconnected():
        if clock.ticks_diff(clock.ticks_ms(), start) > timeout_ms or wlan.status() < 0:
            return False   # (a negative status is final: no AP found, wrong password, failed)
        sleep(200, idle)
    return True


def connect(wlan, cfg, backoff, idle=None):
    # Blocks until connected, backing off between attempts.
    while not connect_once(wlan, cfg["ssid"], cfg["password"], idle=idle):
        print("wifi: no connection to", cfg["ssid"])
        backoff.wait(idle)
    print("wifi: connected", wlan.ifconfig()[0])
