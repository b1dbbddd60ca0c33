# Readings: RP2040 internal temperature (ADC 4), uptime, free heap, plus the
# ADC_PINS (volts) and DIGITAL_PINS (0/1) of config.py.

import gc

import clock

VREF = 3.3
BUILTIN = ("temp", "uptime", "mem_free")
ADC_GPIOS = (26, 27, 28)   # GPIO29 is VSYS/3 on a Pico, not for users


def volts(raw):
    return raw * VREF / 65535


def temp_c(raw):
    # RP2040 datasheet 4.9.5: T = 27 - (V - 0.706) / 0.001721, 2 decimals.
    return round(27 - (volts(raw) - 0.706) / 0.001721, 2)


def name_ok(name):
    # A metric name must be a frame key: [a-z][a-z0-9_]{0,23}.
    if not isinstance(name, str) or not 1 <= len(name) <= 24:
        return False
    if not ("a" <= name[0] <= "z") or name == "ts":   # ts= is a resent frame's time
        return False
    for ch in name:
        if not ("a" <= ch <= "z" or "0" <= ch <= "9" or ch == "_"):
            return False
    return True


class Uptime:
    # Seconds since boot. Accumulates ticks_diff steps, so it keeps counting
    # past the ticks_ms wrap (2**30 ms on rp2) as long as it is read at least
    # every few days.

    def __init__(self):
        self.last = clock.ticks_ms()
        self.ms = 0

    def seconds(self):
        now = clock.ticks_ms()
        self.ms += clock.ticks_diff(now, self.last)
        self.last = now
        return self.ms // 1000


def _mem_free():
    f = getattr(gc, "mem_free", None)
    return f() if f else 0


class Sensors:
    def __init__(self, adc_pins=None, digital_pins=None, machine=None):
        if machine is None:
            import machine
        self.temp_adc = machine.ADC(4)
        self.uptime = Uptime()
        self.adcs = []
        self.digitals = []
        seen = list(BUILTIN)
        for name, gpio in sorted((adc_pins or {}).items()):
            if not name_ok(name) or name in seen or gpio not in ADC_GPIOS:
                print("sensors: skipping ADC metric", name, gpio)
                continue
            seen.append(name)
            self.adcs.append((name, machine.ADC(gpio)))
        for name, gpio in sorted((digital_pins or {}).items()):
            if not name_ok(name) or name in seen:
                print("sensors: skipping digital metric", name, gpio)
                continue
            seen.append(name)
            self.digitals.append((name, machine.Pin(gpio, machine.Pin.IN, machine.Pin.PULL_UP)))
        self.names = seen

    def read(self):
        # One sample of every metric, in self.names order: [(name, number)].
        out = [
            ("temp", temp_c(self.temp_adc.read_u16())),
            ("uptime", self.uptime.seconds()),
            ("mem_free", _mem_free()),
        ]
        for name, adc in self.adcs:
            out.append((name, round(volts(adc.read_u16()), 3)))
        for name, pin in self.digitals:
            out.append((name, 1 if pin.value() else 0))
        return out
