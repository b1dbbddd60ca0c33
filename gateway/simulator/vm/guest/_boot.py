# The virtual Pico's boot on the MicroPython VM, as a board's: boot.py, then
# main.py, from the board's filesystem (preopened as "/").  The guest-side
# modules live in /.picosim: machine is preloaded over the VM's own (the unix
# port's), the others come after the board's /lib, as if frozen.
import gc
import sys

gc.disable()     # a collection corrupts this VM build: see gateway/simulator/vm/wasm.py, GC
sys.path.insert(0, "/.picosim")
import _picosim
import machine
sys.path.pop(0)
sys.path[:] = ["", "/lib", "/.picosim"] + [p for p in sys.path if p.startswith(".frozen")]


def _exists(path):
    import os
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _run(path, final):
    _picosim.call("firmware", ("running",))
    try:
        execfile(path, {"__name__": "__main__", "__file__": path})
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


if _exists("/boot.py"):
    _run("/boot.py", False)
if _exists("/main.py"):
    _run("/main.py", True)
