# The USB console of a virtual Pico on the MicroPython VM (usb Picos only).
# This VM build's sys.stdin/sys.stdout are its WASI fds, which cannot be
# polled the way a firmware polls a board's USB CDC, and sys is read-only;
# so `import sys`, `import time` and `import micropython` get the modules
# below (installed in sys.modules), which delegate everything to the real
# ones but the console: stdin/stdout are the host's pty, time.sleep* can be
# interrupted by Ctrl-C, micropython.kbd_intr() reaches the host.  An i2c
# Pico gets the time module only: its IRQ handlers run in time.sleep*.
# print() needs nothing: the host sends the VM's own stdout to the console.
import binascii
import io

import _picosim
from _picosim import raw

MP_STREAM_POLL = 3
POLLIN = 1


class _Stdin(io.IOBase):
    # Input the REPL read ahead (a host call per byte made flashing slow),
    # shared by every reader of the console, so a program gets what is left.
    pending = [b""]

    def getc(self):
        p = _Stdin.pending
        while not p[0]:
            p[0] = binascii.unhexlify(raw("raw_con_read", "512"))
        c = p[0][0]
        p[0] = p[0][1:]
        return c

    def read(self, n=-1):
        if n is None or n < 0:
            n = 4096
        p = _Stdin.pending
        out = p[0][:n]
        p[0] = p[0][n:]
        while len(out) < n:
            r = raw("raw_con_read", str(n - len(out)))
            if not r:
                break
            out += binascii.unhexlify(r)
        return out

    def readinto(self, buf, nbytes=None):
        data = self.read(len(buf) if nbytes is None else nbytes)
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        out = b""
        while not out.endswith(b"\n"):
            c = self.read(1)
            if not c:
                break
            out += c
        return out

    def ioctl(self, req, arg):
        if req == MP_STREAM_POLL:
            if _Stdin.pending[0] or raw("raw_con_poll", "") == "1":
                return arg & POLLIN
            return 0
        return 0


class _TextStdin(_Stdin):
    def __init__(self):
        self.buffer = _Stdin()

    def read(self, n=-1):
        return _Stdin.read(self, n).decode()

    def readline(self):
        return _Stdin.readline(self).decode()


class _StdoutBuffer(io.IOBase):
    def write(self, data):
        raw("raw_con_write", binascii.hexlify(data).decode())
        return len(data)

    def flush(self):
        pass


class _Stdout(_StdoutBuffer):
    # Text: \n goes out as \r\n, as MicroPython's USB console cooks it.
    def __init__(self):
        self.buffer = _StdoutBuffer()

    def write(self, s):
        data = s.encode() if isinstance(s, str) else bytes(s)
        raw("raw_con_write", binascii.hexlify(data.replace(b"\n", b"\r\n")).decode())
        return len(s)


class _Module:
    # What `import sys` gets: an object, as modules cannot be made here.
    pass


def _module(name, real):
    m = _Module()
    for k in dir(real):
        if not k.startswith("__"):
            setattr(m, k, getattr(real, k))
    m.__name__ = name
    return m


def install_time(modules):
    # time.sleep* as host calls: Ctrl-C ends them, I2C IRQ handlers run in them.
    import time as real_time

    t = _module("time", real_time)

    def sleep_ms(ms):
        r = raw("raw_sleep", str(int(ms)))
        while r:
            h, flags, left = r[1:].split()
            modules["machine"]._irq(int(h), int(flags))  # noqa: SLF001 (the guest machine module's IRQ entry, not an API)
            r = raw("raw_sleep", left)

    def sleep(sec):
        sleep_ms(int(sec * 1000))

    def sleep_us(us):
        if us >= 1000:
            sleep_ms(us // 1000)
        else:
            real_time.sleep_us(us)

    t.sleep, t.sleep_ms, t.sleep_us = sleep, sleep_ms, sleep_us
    modules["time"] = t
    return t


def install(sys_module):
    import micropython as real_mp
    modules = sys_module.modules
    s = _module("sys", sys_module)
    s.stdin = _TextStdin()
    s.stdout = s.stderr = _Stdout()
    modules["sys"] = s
    install_time(modules)

    m = _module("micropython", real_mp)

    def kbd_intr(ch):
        _picosim.call("kbd_intr", (ch,))

    m.kbd_intr = kbd_intr
    modules["micropython"] = m
    return s
