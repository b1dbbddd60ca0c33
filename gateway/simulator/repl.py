"""MicroPython's REPL on the USB console: friendly and raw modes.

Enough of ``shared/runtime/pyexec.c``'s behaviour for ``mpremote`` (and the
tutorial's ``mpremote exec "..."``) to drive a virtual Pico:

* friendly REPL: banner, ``>>> `` prompt, line echo, one-line statements and
  expressions; Ctrl-A enters raw REPL, Ctrl-B prints the banner, Ctrl-C
  abandons the line, Ctrl-D soft-reboots (and runs main.py again).
* raw REPL: ``raw REPL; CTRL-B to exit\\r\\n>``; input up to Ctrl-D, then
  ``OK``, the output, ``\\x04``, the error output, ``\\x04``, ``>``; Ctrl-D on
  an empty input soft-reboots (``OK\\r\\nMPY: soft reboot\\r\\n``, main.py is
  not run, as on MicroPython); Ctrl-B leaves; raw-paste (``\\x05A\\x01``) is
  answered ``R\\x00`` (not supported), so mpremote falls back.
"""

import sys
import traceback

from gateway.simulator import console

BANNER = ("MicroPython v1.26.1 on 2025-09-11; {board} with RP2040\r\n"
          "Type \"help()\" for more information.\r\n")


class Repl:
    def __init__(self, con, board="Raspberry Pi Pico", soft_reboot=None):
        self.con = con
        self.board = board
        self.soft_reboot = soft_reboot   # callable(run_main: bool)
        self.globals = {"__name__": "__main__"}

    def out(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.con.write_raw(data)

    def getc(self):
        while True:
            b = self.con.read_raw(1)
            if console.debug:
                from gateway.simulator import runtime
                runtime.log(f"repl got {b!r}")
            if b:
                return b[0]

    def run(self, raw=False):
        if raw:
            mode = self.raw_repl(banner=True)
        else:
            mode = "friendly"
        while True:
            if mode == "friendly":
                mode = self.friendly_repl()
            else:
                mode = self.raw_repl()

    def _reboot(self, run_main):
        self.globals = {"__name__": "__main__"}
        if self.soft_reboot is not None:
            self.soft_reboot(run_main)

    # -- friendly --
    def friendly_repl(self):
        self.out(BANNER.format(board=self.board))
        while True:
            self.out(">>> ")
            line = bytearray()
            while True:
                c = self.getc()
                if c == 0x01:       # Ctrl-A
                    self.out("\r\n")
                    return "raw"
                if c == 0x02:       # Ctrl-B
                    self.out("\r\n")
                    self.out(BANNER.format(board=self.board))
                    line.clear()    # the line is abandoned
                    break
                if c == 0x03:       # Ctrl-C
                    self.out("\r\n")
                    line.clear()
                    break
                if c == 0x04:       # Ctrl-D
                    if not line:
                        self.out("\r\nMPY: soft reboot\r\n")
                        self._reboot(run_main=True)
                        return "friendly"
                    continue
                if c in (0x08, 0x7F):
                    if line:
                        line.pop()
                        self.out("\x08 \x08")
                    continue
                if c == 0x0D:
                    self.out("\r\n")
                    break
                if c == 0x0A:
                    continue
                line.append(c)
                self.out(bytes([c]))
            if line:
                self.execute(line.decode("utf-8", "replace"), "single", sys.stdout)

    # -- raw --
    def raw_repl(self, banner=True):
        if banner:
            self.out("raw REPL; CTRL-B to exit\r\n")
        while True:
            self.out(">")
            buf = bytearray()
            abandoned = False
            while True:
                c = self.getc()
                if c == 0x01:           # Ctrl-A: stay in raw REPL, clear the line
                    abandoned = True
                    self.out("\r\nraw REPL; CTRL-B to exit\r\n")
                    break
                if c == 0x02:           # Ctrl-B: friendly REPL
                    self.out("\r\n")
                    return "friendly"
                if c == 0x03:           # Ctrl-C: clear the line
                    buf = bytearray()
                    continue
                if c == 0x05 and not buf:   # raw-paste request
                    rest = bytes([self.getc(), self.getc()])
                    if rest == b"A\x01":
                        self.out(b"R\x00")
                        continue
                    buf += b"\x05" + rest
                    continue
                if c == 0x04:
                    break
                buf.append(c)
            if abandoned:
                continue
            self.out("OK")
            if not buf:
                self.out("\r\nMPY: soft reboot\r\n")
                self._reboot(run_main=False)
                self.out("raw REPL; CTRL-B to exit\r\n")
                continue
            err = self.execute(buf.decode("utf-8", "replace"), "exec", None)
            self.out(b"\x04")
            if err:
                self.out(err.replace("\n", "\r\n"))
            self.out(b"\x04")

    def execute(self, source, mode, errfile):
        """Run source; returns the MicroPython-style traceback text or ''."""
        console.executing = True
        try:
            try:
                code = compile(source, "<stdin>", mode)
                exec(code, self.globals)
            finally:
                console.executing = False
        except KeyboardInterrupt:
            text = "Traceback (most recent call last):\n  File \"<stdin>\", line 1, in <module>\nKeyboardInterrupt: \n"
        except SystemExit:
            text = ""
        except BaseException as e:
            text = format_exception(e)
        else:
            text = ""
        if text and errfile is not None:
            errfile.write(text)
            return ""
        return text


def format_exception(e):
    lines = ["Traceback (most recent call last):\n"]
    tb = traceback.extract_tb(e.__traceback__)
    for fr in tb:
        if fr.filename.endswith(("repl.py",)):
            continue
        # A frame without line information (lineno None) reads as line 0, not a crash of the REPL.
        lines.append(f'  File "{fr.filename}", line {fr.lineno or 0}, in {fr.name}\n')
    if isinstance(e, SyntaxError):
        lines = ["Traceback (most recent call last):\n",
                 f'  File "<stdin>", line {e.lineno or 1}\n']
        lines.append("SyntaxError: invalid syntax\n")
        return "".join(lines)
    if isinstance(e, OSError) and e.errno:
        # MicroPython has one OSError class and names the errno
        import errno
        return "".join(lines) + f"OSError: [Errno {e.errno}] {errno.errorcode.get(e.errno, '')}\n"
    msg = str(e)
    if isinstance(e, NameError):
        msg = msg.replace("is not defined", "isn't defined")
    lines.append(f"{type(e).__name__}: {msg}\n" if msg else f"{type(e).__name__}: \n")
    return "".join(lines)
