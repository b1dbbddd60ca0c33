# The virtual Pico's boot on the MicroPython VM, as a board's: boot.py, then
# main.py, from the board's filesystem (preopened as "/"); a usb Pico then
# drops to the REPL on its USB console.  The guest-side modules live in
# /.picosim: machine is preloaded over the VM's own (the unix port's), the
# others come after the board's /lib, as if frozen.
import sys

sys.path.insert(0, "/.picosim")
import _picosim

sys.path[:] = ["", "/lib", "/.picosim"] + [p for p in sys.path if p.startswith(".frozen")]

USB, BOARD, LINK = _picosim.call("board", ())
BANNER = "%s; %s with RP2040\r\nType \"help()\" for more information.\r\n" % (
    sys.version.split("; ", 1)[-1], BOARD)
if USB:
    import _console
    _console.install(sys)
elif LINK == "i2c":
    import _console
    _console.install_time(sys.modules)
_keep = set(sys.modules)


def _exists(path):
    import os
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _run(path, final):
    _picosim.call("firmware", ("running",))
    _picosim.call("executing", (True,))
    try:
        execfile(path, {"__name__": "__main__", "__file__": path})  # noqa: F821 (a MicroPython built-in)
        if final:
            _picosim.call("firmware", ("ended",))
    except SystemExit:
        _picosim.call("firmware", ("ended",))
    except BaseException as e:   # KeyboardInterrupt included, as on a Pico
        import io
        buf = io.StringIO()
        sys.print_exception(e, buf)
        sys.stdout.write(buf.getvalue())
        _picosim.call("crashed", (repr(e), buf.getvalue()))
    finally:
        _picosim.call("executing", (False,))


def _boot(run_main):
    if _exists("/boot.py"):
        _run("/boot.py", False)
    if run_main and _exists("/main.py"):
        _run("/main.py", True)


def _soft_reboot(run_main):
    # Forget what the programs imported (config, the firmware's modules), as a
    # soft reset does; boot again.
    for name in list(sys.modules):
        if name not in _keep:
            del sys.modules[name]
    _boot(run_main)


_boot(True)
if not USB and LINK == "i2c":
    # The program ended; its I2C IRQ handlers live on, as on a board.
    import time
    while True:
        time.sleep(3600)
if USB:
    import _repl
    con = sys.modules["sys"]
    _repl.Repl(con.stdin, con.stdout, BANNER, _soft_reboot).run()
