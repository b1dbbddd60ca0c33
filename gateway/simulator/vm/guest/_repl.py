# MicroPython's REPL on the virtual Pico's USB console, as the rp2 port's
# (shared/runtime/pyexec.c): friendly (banner, >>> prompt, one-line input,
# Ctrl-A raw, Ctrl-B banner, Ctrl-C abandons the line, Ctrl-D soft reboot)
# and raw (raw REPL; CTRL-B to exit, input up to Ctrl-D, OK, output, \x04,
# error, \x04, >; Ctrl-D on empty input soft-reboots; raw-paste is answered
# R\x00, not supported, so mpremote falls back).  The unix port's own REPL
# has no raw mode, so this one runs instead.
import io
import sys

import _picosim

real_sys = sys


class Repl:
    def __init__(self, con_in, con_out, banner, soft_reboot):
        self.inp = con_in.buffer
        self.con_out = con_out
        self.banner = banner
        self.soft_reboot = soft_reboot
        self.globals = {"__name__": "__main__"}

    def out(self, data):
        self.con_out.buffer.write(data.encode() if isinstance(data, str) else data)

    def getc(self):
        return self.inp.getc()

    def run(self, mode="friendly"):
        while True:
            mode = self.friendly() if mode == "friendly" else self.raw()

    def reboot(self, run_main):
        self.globals = {"__name__": "__main__"}
        self.soft_reboot(run_main)

    def friendly(self):
        self.out(self.banner)
        while True:
            self.out(">>> ")
            line = bytearray()
            while True:
                c = self.getc()
                if c == 0x01:
                    self.out("\r\n")
                    return "raw"
                if c == 0x02:
                    self.out("\r\n" + self.banner)
                    line = None
                    break
                if c == 0x03:
                    self.out("\r\n")
                    line = None
                    break
                if c == 0x04:
                    if not line:
                        self.out("\r\nMPY: soft reboot\r\n")
                        self.reboot(True)
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
                err = self.execute(line.decode(), "single")
                if err:
                    self.out(err.replace("\n", "\r\n"))

    def raw(self):
        self.out("raw REPL; CTRL-B to exit\r\n")
        while True:
            self.out(">")
            buf = bytearray()
            while True:
                c = self.getc()
                if c == 0x01:
                    buf = None
                    self.out("\r\nraw REPL; CTRL-B to exit\r\n")
                    break
                if c == 0x02:
                    self.out("\r\n")
                    return "friendly"
                if c == 0x03:
                    buf = bytearray()
                    continue
                if c == 0x05 and not buf:
                    rest = bytes([self.getc(), self.getc()])
                    if rest == b"A\x01":
                        self.out(b"R\x00")
                        continue
                    buf += b"\x05" + rest
                    continue
                if c == 0x04:
                    break
                buf.append(c)
            if buf is None:
                continue
            self.out("OK")
            if not buf:
                self.out("\r\nMPY: soft reboot\r\n")
                self.reboot(False)
                self.out("raw REPL; CTRL-B to exit\r\n")
                continue
            err = self.execute(buf.decode(), "exec")
            self.out(b"\x04")
            if err:
                self.out(err.replace("\n", "\r\n"))
            self.out(b"\x04")

    def execute(self, source, mode):
        # -> the traceback text, or ""
        _picosim.call("executing", (True,))
        try:
            exec(compile(source, "<stdin>", mode), self.globals)
            return ""
        except SystemExit:
            return ""
        except BaseException as e:   # KeyboardInterrupt included
            buf = io.StringIO()
            real_sys.print_exception(e, buf)
            return buf.getvalue()
        finally:
            _picosim.call("executing", (False,))
