"""Host implementation of MicroPython's ``machine`` module (rp2 flavour).

Covered: Pin, ADC (ADC(4) = internal temperature sensor), UART (backed by a
pseudo-terminal), I2CTarget (memory mode and IRQ mode, served on a Unix socket,
see gateway.simulator.i2c_bus), I2C (controller with an empty bus), Timer,
WDT, unique_id, reset, soft_reset, reset_cause, freq, idle, lightsleep,
deepsleep, disable_irq/enable_irq, bootloader.

One module, past 400 lines, because a firmware imports ``machine`` as one module,
and each class here is the host half of one of its peripherals.
"""

import errno
import fcntl
import hashlib
import os
import random
import select
import struct
import sys
import termios
import threading
import time
import traceback
import tty

from gateway.simulator import runtime

PWRON_RESET = 1
WDT_RESET = 3


# --- misc ---------------------------------------------------------------------

_freq = 125_000_000


def freq(hz=None):
    global _freq
    if hz is None:
        return _freq
    _freq = int(hz)


def unique_id():
    uid = runtime.knob("unique_id")
    if uid:
        return bytes.fromhex(uid)
    return hashlib.sha256(runtime.device_id.encode()).digest()[:8]


def idle():
    time.sleep(0.001)


def lightsleep(time_ms=None):
    if time_ms is None:
        while True:
            time.sleep(3600)
    time.sleep(time_ms / 1000)


def deepsleep(time_ms=None):
    lightsleep(time_ms)
    reset()


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


def reset_cause():
    return int(os.environ.get("PICOSIM_RESET_CAUSE", PWRON_RESET))


def reset():
    """Hard reset: the process re-executes itself, keeping its endpoints.

    rp2 resets through the watchdog, so reset_cause() then says WDT_RESET."""
    _restart(WDT_RESET, keep_led=False)


def soft_reset():
    _restart(reset_cause(), keep_led=True)


def bootloader(*args):
    runtime.log("bootloader() called: the virtual Pico stops")
    os._exit(0)


def _restart(cause, keep_led):
    runtime.restart(cause, keep_led)


# --- Pin ------------------------------------------------------------------------

_LED_NAMES = ("LED", "WL_GPIO0", 25, "GP25", "GPIO25")
_pin_levels: dict = {}


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    ALT = 3
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def __init__(self, id, mode=-1, pull=-1, *, value=None, drive=None, alt=None):
        if isinstance(id, Pin):
            id = id._id  # noqa: SLF001 (a Pin given for a Pin: its number)
        if isinstance(id, str) and id.startswith("GP") and id[2:].isdigit():
            id = int(id[2:])
        if not isinstance(id, (int, str)):
            raise TypeError("invalid pin")
        if isinstance(id, int) and not 0 <= id <= 47:
            raise ValueError("invalid pin")
        self._id: int | str = id
        self._is_led = id in _LED_NAMES
        self._mode = Pin.IN
        self._pull = None
        self._irq = None
        self.init(mode, pull, value=value)

    def init(self, mode=-1, pull=-1, *, value=None, drive=None, alt=None):
        if mode != -1 and mode is not None:
            self._mode = mode
        if pull != -1:
            self._pull = pull
        if value is not None:
            self.value(value)

    def _level(self):
        if self._is_led:
            return runtime.led_value()
        pins = runtime.knob("pins") or {}
        if self._mode == Pin.IN and str(self._id) in pins:
            return 1 if pins[str(self._id)] else 0
        default = 1 if (self._mode == Pin.IN and self._pull == Pin.PULL_UP) else 0
        return _pin_levels.get(self._id, default)

    def value(self, x=None):
        if x is None:
            return self._level()
        if self._is_led:
            runtime.set_led(x)
        else:
            _pin_levels[self._id] = 1 if x else 0

    def __call__(self, x=None):
        return self.value(x)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    high = on
    low = off

    def toggle(self):
        self.value(0 if self._level() else 1)

    def mode(self, mode=None):
        if mode is None:
            return self._mode
        self._mode = mode

    def pull(self, pull=None):
        if pull is None:
            return self._pull
        self._pull = pull

    def irq(self, handler=None, trigger=IRQ_FALLING | IRQ_RISING, hard=False):
        # Stored but never fired: simulated inputs do not change by themselves.
        self._irq = (handler, trigger)
        return None

    def __repr__(self):
        if isinstance(self._id, str):
            return "Pin({}, mode={})".format(self._id, "OUT" if self._mode == Pin.OUT else "IN")
        return f"Pin(GPIO{self._id:d}, mode={'OUT' if self._mode == Pin.OUT else 'IN'})"


Signal = None  # not provided


# --- ADC ------------------------------------------------------------------------

def temp_to_u16(temp_c):
    """RP2040 datasheet: V = 0.706 - (T - 27) * 0.001721; 12-bit ADC, 3.3 V ref.

    read_u16() scales the 12-bit sample to 16 bits as MicroPython does:
    (raw << 4) | (raw >> 8)."""
    volts = 0.706 - (temp_c - 27.0) * 0.001721
    raw12 = max(0, min(4095, int(round(volts / 3.3 * 4095))))
    return (raw12 << 4) | (raw12 >> 8)


class ADC:
    CORE_TEMP = 4

    def __init__(self, pin, *, atten=None):
        if isinstance(pin, Pin):
            pin = pin._id  # noqa: SLF001 (a Pin given for its ADC channel)
        if isinstance(pin, int) and 26 <= pin <= 29:
            pin -= 26
        if pin not in (0, 1, 2, 3, 4):
            raise ValueError("invalid pin")
        self._ch = pin

    def read_u16(self):
        v = runtime.adc_value(self._ch)
        if v is None:
            v = runtime.adc_value(self._ch + 26) if self._ch < 4 else None
        if v is not None:
            return v
        if self._ch == 4:
            t = float(runtime.knob("temp_c"))
            noise = float(runtime.knob("temp_noise") or 0)
            if noise:
                t += random.uniform(-noise, noise)
            return temp_to_u16(t)
        if self._ch == 3:  # VSYS/3 on a Pico: ~5 V USB supply
            return (int(5.0 / 3 / 3.3 * 4095) << 4)
        return 0

    def __repr__(self):
        return f"<ADC channel={self._ch:d}>"


# --- UART -----------------------------------------------------------------------

_uart_ptys: dict = {}   # uart id -> (master_fd, slave_fd, path)
_uart_lock = threading.Lock()


def _make_pty():
    master, slave = os.openpty()
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fl = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    return master, slave, os.ttyname(slave)


def uart_pty(uart_id):
    """The (master, slave, path) of UART `uart_id`, created on first use or
    inherited across a reset (PICOSIM_FD_UART<id>=master,slave,path)."""
    with _uart_lock:
        if uart_id not in _uart_ptys:
            inherited = os.environ.get(f"PICOSIM_FD_UART{uart_id:d}")
            if inherited:
                m, s, path = inherited.split(",", 2)
                _uart_ptys[uart_id] = (int(m), int(s), path)
            else:
                _uart_ptys[uart_id] = _make_pty()
            m, s, path = _uart_ptys[uart_id]
            os.set_inheritable(m, True)
            os.set_inheritable(s, True)
            os.environ[f"PICOSIM_FD_UART{uart_id:d}"] = f"{m:d},{s:d},{path}"
            if uart_id == 0 or runtime.get_state("uart") is None:
                runtime.publish("uart", path)
            runtime.log(f"UART{uart_id:d} is {path}")
        return _uart_ptys[uart_id]


def _fionread(fd):
    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]
    except OSError:
        return 0


class UART:
    INV_TX = 1
    INV_RX = 2
    RTS = 1
    CTS = 2
    IRQ_RXIDLE = 4
    IRQ_TXIDLE = 8
    IRQ_BREAK = 16

    def __init__(self, id, baudrate=115200, bits=8, parity=None, stop=1, **kw):
        if id not in (0, 1):
            raise ValueError(f"UART({id!r}) doesn't exist")
        self._id = id
        self._fd, self._slave, self.path = uart_pty(id)
        self._timeout = 0
        self._timeout_char = 1
        self.baudrate = 115200
        self.init(baudrate, bits, parity, stop, **kw)

    def init(self, baudrate=None, bits=8, parity=None, stop=1, *, tx=None, rx=None,
             rts=None, cts=None, txbuf=None, rxbuf=None, timeout=None,
             timeout_char=None, invert=None, flow=None):
        if baudrate is not None:
            self.baudrate = int(baudrate)
        if timeout is not None:
            self._timeout = int(timeout)
        if timeout_char is not None:
            self._timeout_char = max(1, int(timeout_char))
        self.bits, self.parity, self.stop = bits, parity, stop

    def deinit(self):
        pass

    def fileno(self):
        return self._fd

    def any(self):
        return _fionread(self._fd)

    def _wait(self, ms):
        if ms < 0:
            ms = None
        r, _, _ = select.select([self._fd], [], [], None if ms is None else ms / 1000)
        return bool(r)

    def _read_some(self, n):
        try:
            return os.read(self._fd, n)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise

    def read(self, nbytes=None):
        if nbytes == 0:
            return b""
        if not self.any() and not self._wait(self._timeout):
            return None
        out = bytearray()
        while nbytes is None or len(out) < nbytes:
            want = 4096 if nbytes is None else nbytes - len(out)
            chunk = self._read_some(want)
            if chunk:
                out += chunk
                continue
            if not self._wait(self._timeout_char):
                break
        return bytes(out) if out else None

    def readinto(self, buf, nbytes=None):
        n = len(buf) if nbytes is None else min(nbytes, len(buf))
        data = self.read(n)
        if not data:
            return None
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        out = bytearray()
        while True:
            if not self.any() and not self._wait(self._timeout):
                break
            c = self._read_some(1)
            if not c:
                if not self._wait(self._timeout):
                    break
                continue
            out += c
            if c == b"\n":
                break
        return bytes(out) if out else None

    def write(self, buf):
        if isinstance(buf, str):
            buf = buf.encode()
        data = bytearray(buf)
        p = float(runtime.knob("uart_bitflip") or 0)
        if p:
            for i in range(len(data)):
                if random.random() < p:
                    data[i] ^= 1 << random.randrange(8)
        try:
            os.write(self._fd, bytes(data))
        except (BlockingIOError, OSError):
            pass  # nobody drains the wire: bytes are lost, as on a real UART
        return len(buf)

    def flush(self):
        pass

    def txdone(self):
        return True

    def sendbreak(self):
        pass

    def irq(self, handler=None, trigger=0, hard=False):
        self._irq = (handler, trigger)
        return None

    def __repr__(self):
        return (f"UART({self._id:d}, baudrate={self.baudrate:d}, bits=8, parity=None, stop=1, "
                f"tx=?, rx=?, pty={self.path})")


# --- I2C controller (nothing on its bus) --------------------------------------

class I2C:
    def __init__(self, id=0, *, scl=None, sda=None, freq=400000, timeout=50000):
        self._id = id

    def scan(self):
        return []

    def _nodev(self, *a, **k):
        raise OSError(errno.EIO)

    readfrom = readfrom_into = writeto = writevto = _nodev
    readfrom_mem = readfrom_mem_into = writeto_mem = _nodev


SoftI2C = I2C


# --- I2CTarget ----------------------------------------------------------------

class _TargetIRQ:
    def __init__(self, target):
        self._target = target
        self.handler = None
        self.hard = False
        self.armed = 0
        self.pending = 0

    def flags(self):
        return self.pending

    def trigger(self, new=None):
        if new is None:
            return self.armed
        self.armed = new
        self.pending = 0


class I2CTarget:
    IRQ_ADDR_MATCH_READ = 1 << 0
    IRQ_ADDR_MATCH_WRITE = 1 << 1
    IRQ_READ_REQ = 1 << 2
    IRQ_WRITE_REQ = 1 << 3
    IRQ_END_READ = 1 << 4
    IRQ_END_WRITE = 1 << 5
    _HARD_ONLY = IRQ_ADDR_MATCH_READ | IRQ_ADDR_MATCH_WRITE | IRQ_READ_REQ | IRQ_WRITE_REQ

    # state machine
    _IDLE, _ADDR_READ, _ADDR_WRITE, _MEM_ADDR, _READING, _WRITING, _INACTIVE = range(7)

    def __init__(self, id=0, addr=None, *, addrsize=7, mem=None, mem_addrsize=8,
                 scl=None, sda=None):
        if addr is None:
            raise TypeError("'addr' argument required")
        if id not in (0, 1):
            raise ValueError(f"I2C({id!r}) doesn't exist")
        if addrsize not in (7, 10):
            raise ValueError("invalid addrsize")
        if mem is not None:
            memoryview(mem)  # buffer protocol, raises TypeError otherwise
            if mem_addrsize not in (0, 8, 16, 24, 32):
                raise ValueError("mem_addrsize must be 0, 8, 16, 24 or 32")
        self._id = id
        self.addr = addr
        self._mem = mem
        self._mem_addrbytes = mem_addrsize // 8
        self._mem_addr = 0
        self._mem_addr_last = 0
        self._addr_count = 0
        self._state = self._IDLE
        self._irq = _TargetIRQ(self)
        self._rx = bytearray()   # bytes written by the controller, not yet taken
        self._tx = bytearray()   # bytes queued by write() for the controller
        from gateway.simulator import i2c_bus
        self._server = i2c_bus.target_server()
        self._server.register(addr, self)

    @property
    def memaddr(self):
        return self._mem_addr_last

    def deinit(self):
        if self._state != self._INACTIVE:
            self._state = self._INACTIVE
            self._server.unregister(self.addr, self)

    def readinto(self, buf):
        n = min(len(buf), len(self._rx))
        buf[:n] = self._rx[:n]
        del self._rx[:n]
        return n

    def write(self, buf):
        self._tx += bytes(buf)
        return len(buf)

    def irq(self, handler=None, trigger=IRQ_END_READ | IRQ_END_WRITE, hard=False, **_):
        if handler is not None or trigger != (self.IRQ_END_READ | self.IRQ_END_WRITE) or hard:
            if (trigger & self._HARD_ONLY) and not hard:
                raise ValueError("hard IRQ required")
            self._irq.handler = handler
            self._irq.hard = hard
            self._irq.armed = trigger if handler is not None else 0
            self._irq.pending = 0
        return self._irq

    def __repr__(self):
        return f"I2CTarget({self._id:d}, addr={self.addr:d})"

    # -- bus events (called by the bus server, one transaction at a time) --

    def _event(self, ev):
        irq = self._irq
        if irq.handler is None or not (ev & irq.armed):
            return False
        irq.pending = ev & irq.armed
        try:
            irq.handler(self)
        except Exception:
            sys.stderr.write("Uncaught exception in IRQ callback handler\n")
            traceback.print_exc()
        return True

    def _end(self):
        if self._state == self._READING:
            self._tx.clear()
            self._event(self.IRQ_END_READ)
        elif self._state in (self._ADDR_WRITE, self._WRITING):
            self._event(self.IRQ_END_WRITE)
        if self._state != self._INACTIVE:
            self._state = self._IDLE

    def _addr_match(self, read):
        self._end()
        if read:
            self._event(self.IRQ_ADDR_MATCH_READ)
            self._state = self._ADDR_READ
        else:
            self._event(self.IRQ_ADDR_MATCH_WRITE)
            self._state = self._ADDR_WRITE

    def _set_mem_addr_done(self):
        self._mem_addr %= len(self._mem)
        self._mem_addr_last = self._mem_addr

    def _write_byte(self, b):
        self._rx = bytearray([b])
        self._event(self.IRQ_WRITE_REQ)
        pending, self._rx = self._rx, bytearray()
        if self._mem is None:
            self._state = self._WRITING
            return
        for val in pending:
            if self._state == self._ADDR_WRITE:
                self._state = self._MEM_ADDR
                self._mem_addr = 0
                self._addr_count = self._mem_addrbytes
            if self._state == self._MEM_ADDR and self._addr_count > 0:
                self._mem_addr = (self._mem_addr << 8) | val
                self._addr_count -= 1
                if self._addr_count == 0:
                    self._set_mem_addr_done()
            else:
                self._state = self._WRITING
                self._mem[self._mem_addr] = val
                self._mem_addr = (self._mem_addr + 1) % len(self._mem)

    def _read_byte(self):
        if self._mem is None:
            handled = False
            if not self._tx:
                handled = self._event(self.IRQ_READ_REQ)
            self._state = self._READING
            if self._tx:
                v = self._tx[0]
                del self._tx[0]
                return v
            return 0 if not handled else 0xFF
        self._event(self.IRQ_READ_REQ)
        if self._state == self._MEM_ADDR:
            self._set_mem_addr_done()
        self._state = self._READING
        v = self._mem[self._mem_addr]
        self._mem_addr = (self._mem_addr + 1) % len(self._mem)
        return v


# --- Timer ----------------------------------------------------------------------

class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kw):
        self._thread = None
        self._stop = threading.Event()
        if kw:
            self.init(**kw)

    def init(self, *, mode=PERIODIC, freq=-1, period=-1, tick_hz=1000, callback=None, hard=None):
        self.deinit()
        if freq > 0:
            interval = 1.0 / freq
        elif period > 0:
            interval = period / tick_hz
        else:
            raise ValueError("period or freq required")
        stop = self._stop = threading.Event()

        def run():
            nxt = time.monotonic() + interval
            while not stop.wait(max(0.0, nxt - time.monotonic())):
                if callback is not None:
                    try:
                        callback(self)
                    except Exception:
                        traceback.print_exc()
                if mode == Timer.ONE_SHOT:
                    return
                nxt += interval

        self._thread = threading.Thread(target=run, daemon=True, name="machine.Timer")
        self._thread.start()

    def deinit(self):
        self._stop.set()


# --- WDT ------------------------------------------------------------------------

class WDT:
    def __init__(self, id=0, timeout=5000):
        if not 1 <= timeout <= 8388:
            raise ValueError("timeout exceeds 8388")
        self._timeout = timeout / 1000
        self._deadline = time.monotonic() + self._timeout
        threading.Thread(target=self._watch, daemon=True, name="machine.WDT").start()

    def feed(self):
        self._deadline = time.monotonic() + self._timeout

    def _watch(self):
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                runtime.log("watchdog expired: reset")
                _restart(WDT_RESET, keep_led=False)
                return
            time.sleep(min(left, 0.05))
