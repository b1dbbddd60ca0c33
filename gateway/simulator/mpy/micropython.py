"""Host implementation of MicroPython's ``micropython`` module."""

import threading
import traceback

_sched_lock = threading.Lock()


def const(expr):
    return expr


def native(f):
    return f


viper = native


def alloc_emergency_exception_buf(size):
    pass


def schedule(func, arg):
    """Run ``func(arg)`` soon, serialised with other scheduled callbacks.

    MicroPython runs it in the main thread between bytecodes; here it runs in a
    helper thread, one callback at a time."""
    def run():
        with _sched_lock:
            try:
                func(arg)
            except Exception:
                traceback.print_exc()
    threading.Thread(target=run, daemon=True, name="micropython.schedule").start()


def kbd_intr(chr):
    """Set the character that raises KeyboardInterrupt on the USB console (-1: none)."""
    from gateway.simulator import console
    console.kbd_intr_char = chr


def opt_level(level=None):
    return 0 if level is None else None


def mem_info(verbose=None):
    import gc
    print("stack: 532 out of 7936")
    used, free = gc.mem_alloc(), gc.mem_free()  # type: ignore[attr-defined]  # (patches.py adds them to CPython's gc)
    print(f"GC: total: {used + free:d}, used: {used:d}, free: {free:d}")


def qstr_info(verbose=None):
    print("qstr pool: n_pool=1, n_qstr=0, n_str_data_bytes=0, n_total_bytes=0")


def stack_use():
    return 532


def heap_lock():
    return 0


def heap_unlock():
    return 0
