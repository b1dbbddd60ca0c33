# Millisecond ticks and sleeps: MicroPython's time.ticks_* when present,
# otherwise a CPython stand-in (so pure-logic modules import on a PC).

import time

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
    sleep_ms = time.sleep_ms
except AttributeError:
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, delta):
        return a + delta

    def sleep_ms(ms):
        time.sleep(ms / 1000)


class Every:
    # A periodic timer for the main loops: due() is True once per period and
    # never bursts to catch up after a long stall.

    def __init__(self, period_ms, now=None):
        self.period = max(1, int(period_ms))
        self.next = ticks_ms() if now is None else now

    def due(self, now=None):
        if now is None:
            now = ticks_ms()
        if ticks_diff(now, self.next) < 0:
            return False
        self.next = ticks_add(self.next, self.period)
        if ticks_diff(now, self.next) >= 0:   # fell behind: restart from now
            self.next = ticks_add(now, self.period)
        return True
