"""The USB CDC console of a virtual Pico: a pseudo-terminal.

The gateway (pyserial, mpremote) opens the pty's slave path, published as
``usb`` in the state file.  Inside the Pico process, ``sys.stdin`` and
``sys.stdout`` are text streams on the pty master as on MicroPython:
``print``/``sys.stdout.write`` translate ``\\n`` to ``\\r\\n`` (MicroPython's
"cooked" output), ``sys.stdout.buffer``/``sys.stdin.buffer`` are raw bytes,
and Ctrl-C (or the character set by ``micropython.kbd_intr``) raises
KeyboardInterrupt in the running program unless disabled with
``micropython.kbd_intr(-1)``.  ``sys.stdin`` has a ``fileno()``, so
``select.poll()`` on it works as on MicroPython.
"""

import os
import signal
import threading
import time

from gateway.simulator import runtime

debug = bool(os.environ.get("PICOSIM_DEBUG_CONSOLE"))   # log every byte the console and REPL take
kbd_intr_char = 3
executing = False      # a program (main.py or REPL input) is running
# The main thread runs the firmware: Ctrl-C is delivered to it. (A started thread always has an ident.)
_main_ident: int = threading.main_thread().ident or 0


_interrupts_taken = 0   # SIGINTs the main thread has turned into KeyboardInterrupt


def _on_sigint(signum, frame):
    global _interrupts_taken
    _interrupts_taken += 1
    raise KeyboardInterrupt


def _interrupt_main():
    signal.pthread_kill(_main_ident, signal.SIGINT)


def _where_main_is():
    import sys
    import traceback
    frame = sys._current_frames().get(_main_ident)  # noqa: SLF001 -- CPython's documented API for another thread's stack
    return "".join(traceback.format_stack(frame)[-4:]).rstrip() if frame else "(no frame)"


class Console:
    def __init__(self):
        import machine  # type: ignore[import-not-found]  # the shim on sys.path (patches.install() ran before)
        inherited = os.environ.get("PICOSIM_FD_USB")
        if inherited:
            m, s, path = inherited.split(",", 2)
            self.master, self.slave, self.path = int(m), int(s), path
        else:
            # The shim's pty maker, shared with machine.UART; private because firmware must not see it.
            self.master, self.slave, self.path = machine._make_pty()  # noqa: SLF001 -- see above
        os.set_inheritable(self.master, True)
        os.set_inheritable(self.slave, True)
        os.environ["PICOSIM_FD_USB"] = f"{self.master},{self.slave},{self.path}"
        self._rpipe, self._wpipe = os.pipe()
        # A board always takes Ctrl-C, but a process started in the background of a
        # shell (`cmd &`, some CI runners) inherits SIGINT ignored, and Python leaves it
        # so: install the handler ourselves. It counts the interrupts taken, to tell a
        # program that caught Ctrl-C from a main thread that never got to it.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _on_sigint)
        self.stdin = UsbStdin(self)
        self.stdout = UsbStdout(self)
        threading.Thread(target=self._reader, daemon=True, name="usb-console").start()
        runtime.publish("usb", self.path)
        runtime.log(f"USB console is {self.path}")

    def _reader(self):
        import select
        while True:
            try:
                select.select([self.master], [], [])
                data = os.read(self.master, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not data:
                continue
            if debug:
                runtime.log(f"usb rx {data!r} (executing={executing})")
            if executing and kbd_intr_char is not None and kbd_intr_char >= 0:
                ch = bytes([kbd_intr_char])
                if ch in data:
                    before, _, after = data.partition(ch)
                    if before:
                        os.write(self._wpipe, before)
                    taken = _interrupts_taken
                    _interrupt_main()
                    # Hold further input until the program has stopped (or
                    # caught the interrupt and carried on): the rest is for
                    # whoever reads next, usually the REPL (mpremote).
                    deadline = time.monotonic() + 1.0
                    while executing and time.monotonic() < deadline:
                        time.sleep(0.005)
                    if executing:
                        why = ("it caught KeyboardInterrupt" if _interrupts_taken > taken else
                               "the interrupt was not taken; the main thread is at\n" + _where_main_is())
                        runtime.log(f"usb: Ctrl-C, the program still runs after 1 s: {why}")
                    if after:
                        os.write(self._wpipe, after)
                    continue
            os.write(self._wpipe, data)

    def write_raw(self, data):
        view = memoryview(bytes(data))
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                # Host not reading: MicroPython drops output after a timeout.
                import select
                if not select.select([], [self.master], [], 0.5)[1]:
                    return
            except OSError:
                return

    def read_raw(self, n=1):
        """Blocking read of 1..n bytes of input."""
        return os.read(self._rpipe, n)

    def input_fd(self):
        return self._rpipe


class _StdinBuffer:
    def __init__(self, con):
        self._con = con

    def fileno(self):
        return self._con.input_fd()

    def read(self, n=-1):
        if n is None or n < 0:
            n = 1 << 16
            return self._con.read_raw(n)
        out = bytearray()
        while len(out) < n:
            chunk = self._con.read_raw(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readinto(self, buf, nbytes=None):
        n = len(buf) if nbytes is None else nbytes
        data = self.read(n)
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        out = bytearray()
        while True:
            c = self._con.read_raw(1)
            if not c:
                break
            out += c
            if c == b"\n":
                break
        return bytes(out)


class UsbStdin:
    encoding = "utf-8"

    def __init__(self, con):
        self.buffer = _StdinBuffer(con)

    def fileno(self):
        return self.buffer.fileno()

    def read(self, n=-1):
        return self.buffer.read(n).decode("latin-1")

    def readline(self, size=-1):
        return self.buffer.readline().decode("latin-1")

    def readinto(self, buf, nbytes=None):
        return self.buffer.readinto(buf, nbytes)

    def isatty(self):
        return True

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class _StdoutBuffer:
    def __init__(self, con):
        self._con = con

    def write(self, data):
        self._con.write_raw(data)
        return len(data)

    def flush(self):
        pass


class UsbStdout:
    encoding = "utf-8"

    def __init__(self, con):
        self._con = con
        self.buffer = _StdoutBuffer(con)

    def write(self, s):
        if isinstance(s, (bytes, bytearray)):
            data = bytes(s)
        else:
            data = s.encode("utf-8")
        self._con.write_raw(data.replace(b"\n", b"\r\n"))
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True

    def fileno(self):
        return self._con.master
