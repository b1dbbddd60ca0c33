"""Patches of CPython modules where MicroPython extends them, and the sys.path
set-up that makes the shim modules (``gateway/simulator/mpy``) importable.

* ``time``: ticks_ms/ticks_us/ticks_cpu/ticks_add/ticks_diff (MicroPython
  wrap-around at 2**30), sleep_ms, sleep_us.
* ``gc``: mem_free, mem_alloc, threshold.
* ``socket``: ``socket.socket`` becomes a subclass whose ``bind`` maps any
  host to 127.0.0.1 (only loopback is ever used), remaps ports per the
  ``tcp_port_map`` knob, sets SO_REUSEADDR (lwIP rebinds at once after a reset),
  publishes the listening address as ``tcp`` in the state file, whose
  ``connect`` to anything but loopback fails with EHOSTUNREACH (a virtual
  Pico never reaches the network, e.g. with a flashed config naming a real
  broker), and that has MicroPython's stream methods read/readinto/readline/write.
* ``sys``: ``sys.implementation`` is left alone (firmware must not sniff it);
  ``sys.print_exception`` is added (MicroPython's spelling).
"""

import errno
import gc
import os
import random
import socket as _socket_mod
import sys
import time
import traceback

from gateway.simulator import runtime

MPY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpy")

TICKS_PERIOD = 1 << 30
TICKS_MAX = TICKS_PERIOD - 1
TICKS_HALFPERIOD = TICKS_PERIOD >> 1

_t0 = time.monotonic_ns()
_offset_ms = None


def _elapsed_ns():
    return time.monotonic_ns() - _t0


def _offset():
    global _offset_ms
    if _offset_ms is None:   # read once: ticks never jump
        _offset_ms = int(runtime.knob("ticks_offset_ms") or 0)
    return _offset_ms


def ticks_ms():
    return (_elapsed_ns() // 1_000_000 + _offset()) & TICKS_MAX


def ticks_us():
    return (_elapsed_ns() // 1000 + _offset() * 1000) & TICKS_MAX


def ticks_cpu():
    return ticks_us()


def ticks_add(ticks, delta):
    if not -TICKS_HALFPERIOD <= delta < TICKS_HALFPERIOD:
        raise OverflowError("ticks interval overflow")
    return (ticks + delta) & TICKS_MAX


def ticks_diff(ticks1, ticks2):
    return ((ticks1 - ticks2 + TICKS_HALFPERIOD) & TICKS_MAX) - TICKS_HALFPERIOD


def sleep_ms(ms):
    if ms > 0:
        time.sleep(ms / 1000)


def sleep_us(us):
    if us > 0:
        time.sleep(us / 1_000_000)


def _give(module: object, **names: object) -> None:
    """Add MicroPython's extra names to a CPython module (setattr: CPython's stubs do not have them)."""
    for name, value in names.items():
        setattr(module, name, value)


def patch_time():
    _give(time, **{f.__name__: f for f in (ticks_ms, ticks_us, ticks_cpu, ticks_add, ticks_diff, sleep_ms, sleep_us)})


def patch_gc():
    def mem_free():
        return int(runtime.knob("mem_free")) - random.randrange(0, 2048, 16)

    def mem_alloc():
        return 264 * 1024 - 30 * 1024 - mem_free()

    def threshold(amount=None):
        return -1 if amount is None else None

    _give(gc, mem_free=mem_free, mem_alloc=mem_alloc, threshold=threshold)


def _print_exception(exc, file=None):
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=file or sys.stdout)


_BaseSocket = _socket_mod.socket


def _check_loopback(family, address):
    if family not in (_socket_mod.AF_INET, _socket_mod.AF_INET6) or not isinstance(address, tuple):
        return
    import ipaddress
    host = address[0]
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise OSError(errno.EHOSTUNREACH, f"EHOSTUNREACH (a virtual Pico reaches loopback only: {host})")


class MpSocket(_BaseSocket):
    """CPython socket with MicroPython's extras (stream methods, safe bind), behind the
    Pico W's radio: ``wifi_fail`` and ``wifi_hang`` (gateway/simulator/mpy/network.py)."""

    _dropped = False

    def _dead(self):
        if self.family not in (_socket_mod.AF_INET, _socket_mod.AF_INET6):
            return False
        from gateway.simulator.mpy import network
        self._dropped = network.radio(self._dropped)
        return self._dropped

    def _wait_readable(self):
        # A blocking read in slices, so that a drop meanwhile is noticed; True: readable.
        import select
        timeout = self.gettimeout()
        if timeout == 0.0:
            return not self._dead()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._dead():
                return False
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError("timed out")
            if select.select([self], [], [], left)[0]:
                return True

    def recv(self, n, flags=0):
        if self.family in (_socket_mod.AF_INET, _socket_mod.AF_INET6) and not self._wait_readable():
            from gateway.simulator.mpy import network
            network.nothing_arrives(self.gettimeout())
        return super().recv(n, flags)

    def recv_into(self, buf, nbytes=0, flags=0):
        if self.family in (_socket_mod.AF_INET, _socket_mod.AF_INET6) and not self._wait_readable():
            from gateway.simulator.mpy import network
            network.nothing_arrives(self.gettimeout())
        return super().recv_into(buf, nbytes, flags)

    def send(self, data, flags=0):
        if self._dead():
            return len(data)  # (into the air)
        return super().send(data, flags)

    def sendall(self, data, flags=0):
        if self._dead():
            return None
        return super().sendall(data, flags)

    def bind(self, address):
        if self.family in (_socket_mod.AF_INET, _socket_mod.AF_INET6) and isinstance(address, tuple):
            host, port = address[0], address[1]
            port = runtime.tcp_port_map().get(port, port)
            host = "127.0.0.1" if self.family == _socket_mod.AF_INET else "::1"
            address = (host, port) + tuple(address[2:])
            try:
                self.setsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_REUSEADDR, 1)
            except OSError:
                pass
        return super().bind(address)

    def connect(self, address):
        _check_loopback(self.family, address)
        if self._dead():
            raise OSError(errno.EHOSTUNREACH, "EHOSTUNREACH (no Wi-Fi: wifi_fail)")
        return super().connect(address)

    def connect_ex(self, address):
        _check_loopback(self.family, address)
        return super().connect_ex(address)

    def listen(self, backlog=5):
        super().listen(backlog)
        if self.family == _socket_mod.AF_INET and self.type == _socket_mod.SOCK_STREAM:
            host, port = self.getsockname()[:2]
            if runtime.get_state("tcp") is None or runtime.get_state("tcp")[1] != port:
                runtime.publish("tcp", [host, port])
                runtime.log(f"TCP listening on {host}:{port}")

    def read(self, n=-1):
        if n is None or n < 0:
            out = bytearray()
            while True:
                chunk = self.recv(4096)
                if not chunk:
                    return bytes(out)
                out += chunk
        out = bytearray()
        while len(out) < n:
            chunk = self.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readinto(self, buf, nbytes=None):
        return self.recv_into(buf, nbytes or 0)

    def readline(self):
        out = bytearray()
        while True:
            c = self.recv(1)
            if not c:
                break
            out += c
            if c == b"\n":
                break
        return bytes(out)

    def write(self, buf):
        if isinstance(buf, str):
            buf = buf.encode()
        self.sendall(buf)
        return len(buf)


def patch_socket():
    _give(_socket_mod, socket=MpSocket)   # the firmware's socket.socket(...) makes MicroPython sockets


def install(firmware_dir=None):
    """Make MicroPython's modules importable and patch CPython's."""
    patch_time()
    patch_gc()
    patch_socket()
    if not hasattr(sys, "print_exception"):
        _give(sys, print_exception=_print_exception)
    paths = [MPY_DIR] + ([firmware_dir] if firmware_dir else [])
    for p in reversed(paths):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
