"""Process-wide state of one virtual Pico: knobs, LED, published endpoints.

The shim modules (``machine``, ``network``, ...) import this module; the
runner (``gateway.simulator.pico``) configures it before the firmware starts.

Simulation knobs
----------------
Each knob comes from (later wins): the defaults below, the sidecar JSON file
(``--sim-json PATH``, re-read whenever its mtime changes, so a test can change
the temperature of a running Pico), then environment variables.

===================  ===========================  ===============================
sidecar key          env var                      meaning
===================  ===========================  ===============================
``temp_c``           ``PICOSIM_TEMP_C``           internal sensor temperature, °C
                                                  (default 21.5)
``temp_noise``       ``PICOSIM_TEMP_NOISE``       +/- uniform noise in °C
                                                  (default 0.2; 0 = exact)
``adc``              ``PICOSIM_ADC_<pin>``        raw u16 value per ADC channel or
                                                  GPIO (dict ``{"26": 32768}``)
``uart_bitflip``     ``PICOSIM_UART_BITFLIP``     probability that a byte the
                                                  Pico sends has one bit flipped
``ticks_offset_ms``  ``PICOSIM_TICKS_OFFSET_MS``  start value of ticks_ms (test
                                                  wrap-around: 2**30 - 5000)
``tcp_port_map``     ``PICOSIM_TCP_PORT_MAP``     ``"8080=40123,80=40124"``: ports
                                                  a firmware binds are remapped
``mem_free``         ``PICOSIM_MEM_FREE``         gc.mem_free() base (171000)
``wifi_fail``        ``PICOSIM_WIFI_FAIL``        WLAN.connect() never succeeds
                                                  (status -2, no AP found); a joined
                                                  station drops, with its connections
``wifi_hang``        ``PICOSIM_WIFI_HANG``        every socket call blocks (the
                                                  radio chip stopped answering)
``i2c_byte_delay_us`` ``PICOSIM_I2C_BYTE_DELAY_US`` delay between bytes of a
                                                  memory-mode read (torn reads)
``i2c_fail``         ``PICOSIM_I2C_FAIL``         the Pico's I2C targets do not
                                                  acknowledge their address (a
                                                  pulled wire): every transaction
                                                  fails with EREMOTEIO; the
                                                  firmware runs on
``unique_id``        ``PICOSIM_UNIQUE_ID``        hex string for unique_id()
``pins``             (sidecar only)               level of input pins, e.g.
                                                  ``{"15": 0}`` (a pressed button)
===================  ===========================  ===============================

Every bind of a socket to a non-loopback host is rewritten to 127.0.0.1.
"""

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

DEFAULTS = {
    "temp_c": 21.5,
    "temp_noise": 0.2,
    "adc": {},
    "uart_bitflip": 0.0,
    "ticks_offset_ms": 0,
    "tcp_port_map": "",
    "mem_free": 171000,
    "wifi_fail": False,
    "wifi_hang": False,
    "i2c_byte_delay_us": 0,
    "i2c_fail": False,
    "unique_id": "",
    "pins": {},
}

_ENV: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp_c": ("PICOSIM_TEMP_C", float),
    "temp_noise": ("PICOSIM_TEMP_NOISE", float),
    "uart_bitflip": ("PICOSIM_UART_BITFLIP", float),
    "ticks_offset_ms": ("PICOSIM_TICKS_OFFSET_MS", int),
    "tcp_port_map": ("PICOSIM_TCP_PORT_MAP", str),
    "mem_free": ("PICOSIM_MEM_FREE", int),
    "wifi_fail": ("PICOSIM_WIFI_FAIL", lambda s: s.lower() in ("1", "true", "yes")),
    "wifi_hang": ("PICOSIM_WIFI_HANG", lambda s: s.lower() in ("1", "true", "yes")),
    "i2c_byte_delay_us": ("PICOSIM_I2C_BYTE_DELAY_US", int),
    "i2c_fail": ("PICOSIM_I2C_FAIL", lambda s: s.lower() in ("1", "true", "yes")),
    "unique_id": ("PICOSIM_UNIQUE_ID", str),
}

_lock = threading.RLock()
_sidecar_path = None
_sidecar_mtime = None
_sidecar_checked = 0.0
_sidecar: dict = {}

state_path = None          # pico.json, or None (no state file)
i2c_bus_dir: str | None = None   # directory of the simulated bus: <dir>/0x43.sock per target
device_id = "pico"
ENDPOINTS = ("uart", "usb", "i2c_socket", "tcp")  # pico.json's entries for the board's ports, kept across resets
_state = {**dict.fromkeys(ENDPOINTS), "led": "off", "pid": os.getpid()}
_log = sys.stderr
BOOT = time.monotonic()


def configure(state_dir=None, sim_json=None, i2c_bus_dir=None, device="pico", log=None):
    global state_path, _sidecar_path, device_id, _log
    if state_dir:
        os.makedirs(state_dir, exist_ok=True)
        state_path = os.path.join(state_dir, "pico.json")
    _sidecar_path = sim_json
    globals()["i2c_bus_dir"] = i2c_bus_dir
    device_id = device
    if log is not None:
        _log = log
    _state["pid"] = os.getpid()
    write_state()


def log(msg):
    try:
        _log.write(f"[virtual-pico {device_id}] {msg}\n")
        _log.flush()
    except (OSError, ValueError):
        pass


def _reload_sidecar():
    global _sidecar_mtime, _sidecar_checked, _sidecar
    now = time.monotonic()
    if _sidecar_path is None or now - _sidecar_checked < 0.1:
        return
    _sidecar_checked = now
    try:
        mtime = os.stat(_sidecar_path).st_mtime_ns
    except OSError:
        return
    if mtime == _sidecar_mtime:
        return
    try:
        with open(_sidecar_path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        log(f"ignoring unreadable sidecar {_sidecar_path}: {e}")
        return
    _sidecar_mtime = mtime
    _sidecar = data if isinstance(data, dict) else {}


def knob(name):
    with _lock:
        _reload_sidecar()
        value = _sidecar.get(name, DEFAULTS.get(name))
    if name in _ENV:
        env, conv = _ENV[name]
        if env in os.environ:
            value = conv(os.environ[env])
    return value


def adc_value(channel):
    """Configured raw u16 for ADC channel / GPIO `channel`, or None."""
    env = os.environ.get(f"PICOSIM_ADC_{channel:d}")
    if env is not None:
        return int(env) & 0xFFFF
    table = knob("adc") or {}
    v = table.get(str(channel), table.get(channel))
    return None if v is None else int(v) & 0xFFFF


def tcp_port_map():
    spec = knob("tcp_port_map") or ""
    out = {}
    if isinstance(spec, dict):
        return {int(k): int(v) for k, v in spec.items()}
    for part in spec.split(","):
        if "=" in part:
            a, b = part.split("=", 1)
            out[int(a)] = int(b)
    return out


# --- state file -----------------------------------------------------------

def write_state():
    if state_path is None:
        return
    with _lock:
        tmp = f"{state_path}.{os.getpid():d}.tmp"
        with open(tmp, "w") as f:
            json.dump(_state, f)
        os.replace(tmp, state_path)


def publish(key, value):
    with _lock:
        _state[key] = value
        write_state()


def get_state(key):
    return _state.get(key)


# --- the LED ----------------------------------------------------------------

_led = 0


def led_value():
    return _led


def set_led(v):
    global _led
    v = 1 if v else 0
    with _lock:
        if v == _led:
            return
        _led = v
        _state["led"] = "on" if v else "off"
        write_state()
    log("LED on" if v else "LED off")


def idle_forever() -> NoReturn:
    """The main thread's wait once the firmware runs elsewhere (the VM's thread) or has
    ended: until a signal's handler (the RUN pin's SIGUSR1, Ctrl-C) ends the process.

    Not ``signal.pause()``: the kernel may hand a signal to any thread that does not
    block it, and Python runs handlers in the main thread only, when it next runs
    Python code, so a pause() that the signal did not interrupt never returned and the
    reset was lost (seen on a loaded machine). The wakeup fd is written whichever
    thread takes the signal; waking on it, the main thread runs the handler at once."""
    import select
    import signal
    import socket

    r, w = socket.socketpair()
    w.setblocking(False)
    signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    while True:
        select.select([r], [], [])
        r.recv(512)   # (the signals' numbers; their handlers run on the way back to Python)


_restarter = None   # the process running the firmware (gateway.simulator.pico) sets it


def on_restart(fn):
    """``fn(cause, keep_led)`` re-executes the virtual Pico: set by the process that runs it,
    so that the machine modules reset the board without importing that process's module."""
    global _restarter
    _restarter = fn


def restart(cause, keep_led):
    if _restarter is None:
        raise RuntimeError("no virtual Pico process to reset (gateway.simulator.pico sets one)")
    _restarter(cause, keep_led)
