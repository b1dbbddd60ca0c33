"""Run one MicroPython firmware as a virtual Pico on this host.

    python -m gateway.simulator.pico --firmware DIR_OR_FILE --config-py PATH \\
        [--state-dir DIR] [--fs DIR] [--i2c-bus DIR] [--sim-json PATH] [--usb] [--device ID]

* The Pico has its own filesystem, a host directory that is the board's
  ``/`` (``--fs DIR``, default ``<state-dir>/fs``; see
  ``gateway.simulator.boardfs``); the process's cwd is that directory, and
  the fs and its ``lib`` are on ``sys.path``.  At power-on (not on resets)
  ``--firmware DIR`` copies DIR's ``*.py`` files into it, ``--firmware
  FILE.py`` copies the file as ``main.py`` (its directory stays on sys.path,
  last, for helper modules).  Without ``--firmware`` the fs starts empty: stock
  MicroPython with no program, a REPL on its USB console (what the tutorial's
  usb link drives with ``mpremote``, and what ``pico-gateway flash`` writes to).
* Boot, as MicroPython's: ``boot.py`` then ``main.py`` from the fs, when
  they exist; again after a soft reset (Ctrl-D at the friendly REPL,
  ``machine.soft_reset()``; Ctrl-D in the raw REPL runs boot.py only, as on a
  board) and after a hard reset.
* ``--config-py PATH`` describes the virtual hardware: its ``LINK = "usb"``
  (or ``--usb``) gives the Pico a USB console (the firmware's stdin/stdout are
  a pty), ``DEVICE`` names the Pico in logs.  With a firmware it is copied to
  the fs as ``config.py``.  ``import config`` finds the fs's ``config.py``
  when there is one (so a flashed config takes effect at the next reset),
  else the ``--config-py`` module.
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
  default ``<state-dir>/i2c-bus``.
* ``--sim-json PATH``: simulation knobs (see ``gateway.simulator.runtime``).

The process logs ``LED on`` / ``LED off`` lines (and endpoints) on stderr.
When the firmware ends or crashes, the Pico stays up as a real one does: its
peripherals keep working, and a USB console drops to the REPL.
``machine.reset()``, a watchdog expiry, ``machine.soft_reset()`` and SIGUSR1
(the RUN pin: ``VirtualPico.reset()``, reset_cause() PWRON_RESET) re-execute
the process in place (same pid, same ptys and socket paths, same fs).
"""

import argparse
import importlib.util
import json
import os
import runpy
import signal
import sys
import traceback
from types import ModuleType

from gateway.simulator import boardfs, patches, runtime, vm
from gateway.simulator import console as console_mod


class _Firmware:
    """What this process knows about the Pico it runs, set by main()."""

    def __init__(self) -> None:
        self.fs = ""                          # the board's filesystem on this host
        self.config_py: str | None = None     # --config-py
        self.modules: set[str] = set()        # modules the firmware imported, forgotten at a soft reset
        self.argv: list[str] = []             # the command line that re-executes this Pico


_firmware = _Firmware()


def _load_config(path: str, install: bool = True) -> ModuleType:
    spec = importlib.util.spec_from_file_location("config", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as config")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if install:
        sys.modules["config"] = mod
    return mod


def _preload_config():
    """``import config`` finds the fs's config.py; without one, --config-py's."""
    sys.modules.pop("config", None)
    fs, path = _firmware.fs, _firmware.config_py
    if path and not (fs and os.path.isfile(os.path.join(fs, "config.py"))):
        _load_config(path)


def restart(cause, keep_led):
    """Re-execute this process (machine.reset / soft_reset / WDT)."""
    runtime.log(f"reset (cause {cause})")
    env = os.environ
    env["PICOSIM_RESET_CAUSE"] = str(cause)
    env["PICOSIM_LED_INIT"] = str(runtime.led_value() if keep_led else 0)
    carry = {k: runtime.get_state(k) for k in runtime.ENDPOINTS}
    env["PICOSIM_STATE_CARRY"] = json.dumps(carry)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    # A reset requested while the new process boots waits (pending) until it
    # can take it: the signal mask survives exec, main() unblocks.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    os.execv(sys.executable, _firmware.argv or [sys.executable] + sys.orig_argv[1:])


def _run_on_resetpin(signum, frame):
    """SIGUSR1: the RUN pin was pulled low (VirtualPico.reset())."""
    restart(1, keep_led=False)   # machine.PWRON_RESET


def _run_main(run_main=True):
    fs = _firmware.fs
    boot, main = (os.path.join(fs, n) for n in ("boot.py", "main.py"))
    if os.path.isfile(boot):
        _run_file(boot, final=False)
    if run_main and os.path.isfile(main):
        _run_file(main, final=True)


def _run_file(main, final):
    before = set(sys.modules)
    runtime.publish("firmware", "running")
    console_mod.executing = True
    try:
        runpy.run_path(main, run_name="__main__")
        if final:
            runtime.publish("firmware", "ended")
    except SystemExit:
        runtime.publish("firmware", "ended")
    except BaseException as e:  # KeyboardInterrupt included, as on a Pico
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        sys.stdout.write(text)
        if sys.stdout is not sys.__stdout__:
            runtime.log(text.rstrip())
        runtime.publish("firmware", f"crashed: {e!r}")
    finally:
        console_mod.executing = False
        _firmware.modules |= set(sys.modules) - before


def _soft_reboot(run_main):
    # Forget modules the firmware imported (and any loaded from the fs, e.g.
    # at the REPL), like MicroPython's soft reset; config is looked up afresh.
    fs = _firmware.fs
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if name in _firmware.modules or (fs and f.startswith(fs + os.sep)):
            sys.modules.pop(name, None)
    _firmware.modules.clear()
    _preload_config()
    _run_main(run_main)


def _exec_argv(args, fs):
    """The command line that re-executes this Pico (absolute paths: the cwd is the fs)."""
    opts = sys.orig_argv[1:sys.orig_argv.index("-m")] if "-m" in sys.orig_argv else []
    out = [sys.executable] + opts + ["-m", "gateway.simulator.pico"]
    for name in ("firmware", "config_py", "state_dir", "i2c_bus", "sim_json", "device", "board",
                 "runtime"):
        v = getattr(args, name)
        if v is not None:
            out += ["--" + name.replace("_", "-"), v]
    out += ["--fs", fs]
    if args.usb:
        out.append("--usb")
    return out


def _board(args, link):
    """(the board's name, whether it has a USB console), for config.py's ``LINK``: what
    --board and --usb say, else what the gateway's link registry says of the link (the
    board it implies, whether our firmware speaks on the USB console). A fleet passes
    --board (and --usb), so its Picos skip importing the registry at every boot."""
    if args.board is not None:
        return args.board, args.usb
    from gateway.links import for_firmware
    from gateway.links.base import Link
    known = for_firmware(link)
    if known is None:
        return Link.board, args.usb
    return known.board, args.usb or bool(known.simulation is not None and known.simulation.console)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gateway.simulator.pico",
                                description="Run MicroPython firmware as a virtual Pico.")
    p.add_argument("--firmware", help="firmware directory (runs main.py) or .py file; "
                   "omit for a bare MicroPython REPL on a USB console")
    p.add_argument("--config-py", help="config.py the firmware imports as `config`")
    p.add_argument("--state-dir", help="directory for pico.json")
    p.add_argument("--fs", help="the board's filesystem (default <state-dir>/fs)")
    p.add_argument("--i2c-bus", help="simulated I2C bus directory")
    p.add_argument("--sim-json", help="sidecar JSON with simulation knobs")
    p.add_argument("--usb", action="store_true", help="give the Pico a USB console")
    p.add_argument("--device", help="device id for logs")
    p.add_argument("--board", default=None, help="board name in the REPL banner (given: --usb alone says "
                   "whether the Pico has a USB console; else the board and console follow config.py's LINK)")
    p.add_argument("--runtime", choices=vm.RUNTIMES, default=vm.DEFAULT_RUNTIME,
                   help="run the firmware on the MicroPython VM (gateway.simulator.vm, the default) "
                   "or on CPython with MicroPython's modules imitated (cheaper, not faithful)")
    args = p.parse_args(argv)
    for name in ("firmware", "config_py", "state_dir", "fs", "i2c_bus", "sim_json"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    carry = os.environ.pop("PICOSIM_STATE_CARRY", None)
    first_boot = carry is None      # else a reset: the fs keeps what it holds
    fs = args.fs or (os.path.join(args.state_dir, "fs") if args.state_dir else None)
    if fs is None:
        import tempfile
        fs = tempfile.mkdtemp(prefix="picosim-fs-")
    _firmware.argv = _exec_argv(args, fs)
    signal.signal(signal.SIGUSR1, _run_on_resetpin)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    if carry:
        for key, value in json.loads(carry).items():   # before configure(): no state file yet
            runtime.publish(key, value)
    state_dir = args.state_dir
    i2c_dir = args.i2c_bus or (os.path.join(state_dir, "i2c-bus") if state_dir else None)

    fw_dir = fw_main = None
    if args.firmware:
        fw = os.path.abspath(args.firmware)
        if os.path.isdir(fw):
            fw_dir, fw_main = fw, os.path.join(fw, "main.py")
        else:
            fw_dir, fw_main = os.path.dirname(fw), fw
        if not os.path.exists(fw_main):
            p.error(f"no such firmware: {fw_main}")

    if first_boot:
        boardfs.populate(fs, fw_dir, fw_main, args.config_py)
    else:
        os.makedirs(fs, exist_ok=True)
    runtime.on_restart(restart)
    patches.install(fs)
    sys.path.insert(sys.path.index(fs) + 1, os.path.join(fs, "lib"))
    if fw_main is not None and fw_dir is not None and fw_main != os.path.join(fw_dir, "main.py"):
        sys.path.append(os.path.dirname(fw_main))   # helpers next to a FILE.py
    cfg = _load_config(args.config_py, install=False) if args.config_py else None
    _firmware.fs, _firmware.config_py = fs, args.config_py
    _preload_config()
    link = getattr(cfg, "LINK", None)
    device = args.device or getattr(cfg, "DEVICE", None) or "pico"
    runtime.configure(state_dir=state_dir, sim_json=args.sim_json, i2c_bus_dir=i2c_dir,
                      device=device)
    has_main = os.path.isfile(os.path.join(fs, "main.py"))
    runtime.publish("firmware", "starting" if has_main else "none")
    if os.environ.get("PICOSIM_LED_INIT") == "1":
        runtime.set_led(1)
    board, usb = _board(args, link)
    usb = usb or not has_main
    if args.runtime == "micropython":
        if not usb and link not in vm.TRANSPORTS:
            p.error(f"the MicroPython runtime runs {'/'.join(vm.TRANSPORTS)} Picos, not {link}")
        from gateway.simulator.vm import host as vm_host
        return vm_host.run(fs, usb=usb, board=board, link=link)
    boardfs.install(fs)   # cwd = the board's "/"

    con = None
    if usb:
        con = console_mod.Console()
        sys.stdin = con.stdin
        sys.stdout = con.stdout
    runtime.log(f"boot: fs={fs} main.py={'yes' if has_main else 'no'} link={link}")

    _run_main()
    if con is not None:
        from gateway.simulator.repl import Repl
        Repl(con, board=board, soft_reboot=_soft_reboot).run()
    runtime.idle_forever()   # a Pico whose program ended idles; peripherals live on


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
