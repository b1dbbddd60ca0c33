# machine for the virtual Pico on the MicroPython VM (rp2 flavour): every
# peripheral is a handle to the host's simulated one (the same UART ptys, LED
# and knobs as the CPython runtime), so only I/O crosses into the host.
import binascii
import time

from _picosim import HostObject, call, raw

PWRON_RESET = 1
WDT_RESET = 3


def freq(hz=None):
    return call("machine", ("freq",) if hz is None else ("freq", hz))


def unique_id():
    return call("machine", ("unique_id",))


def reset_cause():
    return call("machine", ("reset_cause",))


def reset():
    call("machine", ("reset",))


def soft_reset():
    call("machine", ("soft_reset",))


def bootloader(arg=None):
    call("machine", ("bootloader",))


def idle():
    time.sleep_ms(1)


def lightsleep(time_ms=None):
    if time_ms is None:
        while True:
            time.sleep(3600)
    time.sleep_ms(time_ms)


def deepsleep(time_ms=None):
    lightsleep(time_ms)
    reset()


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class Pin(HostObject):
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    ALT = 3
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def __init__(self, id, mode=-1, pull=-1, value=None, drive=None, alt=None):
        self._new("Pin", (id, mode, pull), {"value": value, "drive": drive, "alt": alt})

    def init(self, mode=-1, pull=-1, value=None, drive=None, alt=None):
        self._m("init", (mode, pull), {"value": value, "drive": drive, "alt": alt})

    def value(self, x=None):
        if x is None:
            return self._m("value")
        self._m("value", (1 if x else 0,))

    def __call__(self, x=None):
        return self.value(x)

    def on(self):
        self._m("value", (1,))

    def off(self):
        self._m("value", (0,))

    high = on
    low = off

    def toggle(self):
        self._m("toggle")

    def mode(self, mode=None):
        return self._m("mode") if mode is None else self._m("mode", (mode,))

    def pull(self, pull=None):
        return self._m("pull") if pull is None else self._m("pull", (pull,))

    def irq(self, handler=None, trigger=IRQ_FALLING | IRQ_RISING, hard=False):
        # Stored but never fired: simulated inputs do not change by themselves.
        self._irq = (handler, trigger)

    def __repr__(self):
        return self._m("__repr__")


class ADC(HostObject):
    CORE_TEMP = 4

    def __init__(self, pin, atten=None):
        self._new("ADC", (pin,), {"atten": atten})

    def read_u16(self):
        return self._m("read_u16")


class UART(HostObject):
    INV_TX = 1
    INV_RX = 2
    RTS = 1
    CTS = 2
    IRQ_RXIDLE = 4
    IRQ_TXIDLE = 8
    IRQ_BREAK = 16

    def __init__(self, id, baudrate=115200, bits=8, parity=None, stop=1, tx=None, rx=None,
                 rts=None, cts=None, txbuf=None, rxbuf=None, timeout=None, timeout_char=None,
                 invert=None, flow=None):
        self._new("UART", (id, baudrate, bits, parity, stop),
                  {"tx": tx, "rx": rx, "rts": rts, "cts": cts, "txbuf": txbuf, "rxbuf": rxbuf,
                   "timeout": timeout, "timeout_char": timeout_char, "invert": invert,
                   "flow": flow})
        self._hs = str(self._h)     # the payload of the raw poll calls, made once

    def init(self, baudrate=None, bits=8, parity=None, stop=1, tx=None, rx=None, rts=None,
             cts=None, txbuf=None, rxbuf=None, timeout=None, timeout_char=None, invert=None,
             flow=None):
        self._m("init", (baudrate, bits, parity, stop),
                {"tx": tx, "rx": rx, "rts": rts, "cts": cts, "txbuf": txbuf, "rxbuf": rxbuf,
                 "timeout": timeout, "timeout_char": timeout_char, "invert": invert,
                 "flow": flow})

    def deinit(self):
        self._m("deinit")

    # any() and read() are what a firmware polls: raw host calls, no JSON,
    # allocating only the answer (less garbage, fewer collections).
    def any(self):
        return int(raw("raw_any", self._hs))

    def read(self, nbytes=None):
        r = raw("raw_read", self._hs if nbytes is None else "%s %d" % (self._hs, nbytes))
        return binascii.unhexlify(r) if r else None

    def readinto(self, buf, nbytes=None):
        n = len(buf) if nbytes is None else min(nbytes, len(buf))
        data = self.read(n)
        if not data:
            return None
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        return self._m("readline")

    def write(self, buf):
        return self._m("write", (buf,))

    def flush(self):
        pass

    def txdone(self):
        return True

    def sendbreak(self):
        pass

    def __repr__(self):
        return self._m("__repr__")


class WDT(HostObject):
    # The host's watchdog: it resets the Pico unless fed in time.
    def __init__(self, id=0, timeout=5000):
        self._new("WDT", (id,), {"timeout": timeout})

    def feed(self):
        self._m("feed")


class I2CTarget(HostObject):
    # The host's I2C target on the simulated bus.  Memory mode: the host
    # serves the firmware's own buffer in place (its address, as the rp2
    # driver does from its IRQ), so what the firmware writes is what a
    # controller reads.
    IRQ_ADDR_MATCH_READ = 1
    IRQ_ADDR_MATCH_WRITE = 2
    IRQ_READ_REQ = 4
    IRQ_WRITE_REQ = 8
    IRQ_END_READ = 16
    IRQ_END_WRITE = 32

    def __init__(self, id=0, addr=None, addrsize=7, mem=None, mem_addrsize=8, scl=None, sda=None):
        kw = {"addrsize": addrsize, "mem_addrsize": mem_addrsize}
        if mem is not None:
            import uctypes
            self._mem = mem        # the host reads and writes it: keep it alive
            kw["mem"] = {"$mem": [uctypes.addressof(mem), len(mem)]}
        self._new("I2CTarget", (id, addr), kw)

        self.handler = None
        self.irqobj = _TargetIRQ()
        _targets[self._h] = self

    @property
    def memaddr(self):
        return self._m("memaddr")

    def deinit(self):
        self._m("deinit")

    def readinto(self, buf):
        data = self._m("take", (len(buf),))
        buf[:len(data)] = data
        return len(data)

    def write(self, buf):
        return self._m("write", (buf,))

    def irq(self, handler=None, trigger=IRQ_END_READ | IRQ_END_WRITE, hard=False):
        # The handler runs here in the guest (see _irq); the host only needs to
        # know there is one, for which events.  irq() alone returns the IRQ
        # object and changes nothing (what a handler calls for its flags).
        if handler is None and trigger == (self.IRQ_END_READ | self.IRQ_END_WRITE) and not hard:
            return self.irqobj
        self.handler = handler
        self.irqobj.armed = trigger if handler is not None else 0
        self._m("irq", (), {"handler": True if handler is not None else None,
                            "trigger": trigger, "hard": hard})
        return self.irqobj


class _TargetIRQ:
    def __init__(self):
        self.pending = 0
        self.armed = 0

    def flags(self):
        return self.pending

    def trigger(self, new=None):
        if new is None:
            return self.armed
        self.armed = new


_targets = {}


def _irq(handle, flags):
    # An I2C event from the host: run the target's handler, then let the bus go on.
    t = _targets.get(handle)
    try:
        if t is not None and t.handler is not None:
            t.irqobj.pending = flags
            t.handler(t)
    except Exception as e:
        import sys
        print("Uncaught exception in IRQ callback handler")
        sys.print_exception(e)
    finally:
        raw("raw_irq_done", "")
