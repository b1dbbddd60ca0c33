"""Run one MicroPython firmware as a virtual Pico on this host.

    python -m gateway.simulator.pico --firmware DIR_OR_FILE --config-py PATH \\
        [--state-dir DIR] [--i2c-bus DIR] [--sim-json PATH] [--usb] [--device ID]

* ``--firmware DIR`` runs ``DIR/main.py`` with DIR on ``sys.path``;
  ``--firmware FILE.py`` runs that file.  Without ``--firmware`` the Pico runs
  stock MicroPython with no program: a REPL on its USB console (what the
  tutorial's usb link drives with ``mpremote``).
* ``--config-py PATH`` is imported by the firmware as ``config``.  Its
  ``LINK = "usb"`` (or ``--usb``) gives the Pico a USB console: the firmware's
  stdin/stdout are a pty.  ``DEVICE`` names the Pico in logs.
* ``--state-dir DIR`` receives ``pico.json``, rewritten (write-then-rename)
  whenever something in it changes::

      {"uart": "/dev/pts/7" | null,     # pty slave of machine.UART (first one)
       "usb": "/dev/pts/8" | null,      # pty slave of the USB console
       "i2c_socket": "<bus>/0x43.sock" | null,   # first I2CTarget's socket
       "tcp": ["127.0.0.1", 40123] | null,       # first listening TCP socket
       "led": "on" | "off",
       "pid": 12345,
       "firmware": "running" | "ended" | "crashed: <exception>" | "none"}

  Endpoints appear when the firmware creates them (``UART(...)``,
  ``I2CTarget(...)``, ``socket.listen()``).
* ``--i2c-bus DIR``: the simulated I2C bus (see ``gateway.simulator.i2c_bus``);
  default ``<state-dir>/i2c``.
* ``--sim-json PATH``: simulation knobs (see ``gateway.simulator.runtime``).

The process logs ``LED on`` / ``LED off`` lines (and endpoints) on stderr.
When the firmware ends or crashes, the Pico stays up as a real one does: its
peripherals keep working, and a USB console drops to the REPL.
``machine.reset()``, a watchdog expiry and ``machine.soft_reset()`` re-execute
the process in place (same pid, same ptys and socket paths).
"""

import argparse
import importlib.util
import json
import os
import runpy
import signal
import sys
import time
import traceback

from gateway.simulator import console as console_mod
from gateway.simulator import patches, runtime

_firmware = {"main": None, "dir": None, "modules": set()}


def _load_config(path):
    spec = importlib.util.spec_from_file_location("config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["config"] = mod
    return mod


def restart(cause, keep_led):
    """Re-execute this process (machine.reset / soft_reset / WDT)."""
    runtime.log("reset (cause %d)" % cause)
    env = os.environ
    env["PICOSIM_RESET_CAUSE"] = str(cause)
    env["PICOSIM_LED_INIT"] = str(runtime.led_value() if keep_led else 0)
    carry = {k: runtime.get_state(k) for k in ("uart", "usb", "i2c_socket", "tcp")}
    env["PICOSIM_STATE_CARRY"] = json.dumps(carry)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def _run_main():
    main = _firmware["main"]
    if main is None:
        return
    before = set(sys.modules)
    runtime.publish("firmware", "running")
    console_mod.executing = True
    try:
        runpy.run_path(main, run_name="__main__")
        runtime.publish("firmware", "ended")
    except SystemExit:
        runtime.publish("firmware", "ended")
    except BaseException as e:  # KeyboardInterrupt included, as on a Pico
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        sys.stdout.write(text)
        if sys.stdout is not sys.__stdout__:
            runtime.log(text.rstrip())
        runtime.publish("firmware", "crashed: %s" % (repr(e),))
    finally:
        console_mod.executing = False
        _firmware["modules"] |= set(sys.modules) - before


def _soft_reboot(run_main):
    # Forget modules the firmware imported, like MicroPython's soft reset.
    for name in list(_firmware["modules"]):
        sys.modules.pop(name, None)
    _firmware["modules"].clear()
    if run_main:
        _run_main()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gateway.simulator.pico",
                                description="Run MicroPython firmware as a virtual Pico.")
    p.add_argument("--firmware", help="firmware directory (runs main.py) or .py file; "
                   "omit for a bare MicroPython REPL on a USB console")
    p.add_argument("--config-py", help="config.py the firmware imports as `config`")
    p.add_argument("--state-dir", help="directory for pico.json")
    p.add_argument("--i2c-bus", help="simulated I2C bus directory")
    p.add_argument("--sim-json", help="sidecar JSON with simulation knobs")
    p.add_argument("--usb", action="store_true", help="give the Pico a USB console")
    p.add_argument("--device", help="device id for logs")
    p.add_argument("--board", default=None, help="board name in the REPL banner")
    args = p.parse_args(argv)

    carry = os.environ.pop("PICOSIM_STATE_CARRY", None)
    if carry:
        runtime._state.update(json.loads(carry))
    state_dir = args.state_dir
    i2c_dir = args.i2c_bus or (os.path.join(state_dir, "i2c") if state_dir else None)

    fw_dir = fw_main = None
    if args.firmware:
        fw = os.path.abspath(args.firmware)
        if os.path.isdir(fw):
            fw_dir, fw_main = fw, os.path.join(fw, "main.py")
        else:
            fw_dir, fw_main = os.path.dirname(fw), fw
        if not os.path.exists(fw_main):
            p.error("no such firmware: %s" % fw_main)

    patches.install(fw_dir)
    cfg = _load_config(os.path.abspath(args.config_py)) if args.config_py else None
    link = getattr(cfg, "LINK", None)
    device = args.device or getattr(cfg, "DEVICE", None) or "pico"
    runtime.configure(state_dir=state_dir, sim_json=args.sim_json, i2c_bus_dir=i2c_dir,
                      device=device)
    runtime.publish("firmware", "none" if fw_main is None else "starting")
    if os.environ.get("PICOSIM_LED_INIT") == "1":
        runtime.set_led(1)
    _firmware["main"], _firmware["dir"] = fw_main, fw_dir
    if fw_dir:
        os.chdir(fw_dir)   # the Pico's filesystem root holds main.py

    con = None
    if args.usb or link == "usb" or fw_main is None:
        con = console_mod.Console()
        sys.stdin = con.stdin
        sys.stdout = con.stdout
    board = args.board or ("Raspberry Pi Pico W" if link in ("wifi", "tcp") else "Raspberry Pi Pico")
    runtime.log("boot: firmware=%s link=%s" % (fw_main, link))

    _run_main()
    if con is not None:
        from gateway.simulator.repl import Repl
        Repl(con, board=board, soft_reboot=_soft_reboot).run()
    while True:       # a Pico whose program ended idles; peripherals live on
        signal.pause()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
