# Wi-Fi station connection with exponential backoff, shared by the wifi and
# tcp links (Pico W).

import clock
import network

BACKOFF_START_S = 1
BACKOFF_CAP_S = 30
CONNECT_TIMEOUT_MS = 20000


class Backoff:
    def __init__(self, start=BACKOFF_START_S, cap=BACKOFF_CAP_S):
        self.start = start
        self.cap = cap
        self.delay = start

    def wait(self):
        print("retrying in", self.delay, "s")
        clock.sleep_ms(int(self.delay * 1000))
        self.delay = min(self.delay * 2, self.cap)

    def reset(self):
        self.delay = self.start


def station():
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    return wlan


def connect_once(wlan, ssid, password, timeout_ms=CONNECT_TIMEOUT_MS):
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
        if clock.ticks_diff(clock.ticks_ms(), start) > timeout_ms:
            return False
        clock.sleep_ms(200)
    return True


def connect(wlan, cfg, backoff):
    # Blocks until connected, backing off between attempts.
    while not connect_once(wlan, cfg["ssid"], cfg["password"]):
        print("wifi: no connection to", cfg["ssid"])
        backoff.wait()
    print("wifi: connected", wlan.ifconfig()[0])
