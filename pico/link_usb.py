# usb link: picogw frames over USB CDC, i.e. sys.stdin / sys.stdout. The
# same stream carries REPL noise (banner, prompts, tracebacks); the gateway
# keeps only checked frames. stdin is polled so the loop never blocks.
# Ctrl-C still interrupts (so mpremote can take over); frames never hold 0x03.

import select
import sys

import core
import serial_loop

CHUNK = 64


class UsbPort:
    def __init__(self):
        self.inp = getattr(sys.stdin, "buffer", sys.stdin)
        self.out = getattr(sys.stdout, "buffer", None)
        self.poller = select.poll()
        self.poller.register(sys.stdin, select.POLLIN)

    def read(self):
        got = b""
        while len(got) < CHUNK and self.poller.poll(0):
            c = self.inp.read(1)
            if not c:
                break
            if isinstance(c, str):
                c = c.encode()
            got += c
        return got or None

    def write(self, data):
        if self.out is not None:
            self.out.write(data)
        else:
            sys.stdout.write(data.decode())
        for stream in (self.out, sys.stdout):
            flush = getattr(stream, "flush", None)
            if flush:
                flush()


def run(config, node):
    serial_loop.run(UsbPort(), node, getattr(config, "READ_INTERVAL", 5.0),
                    getattr(config, "ACK_RING", core.DEFAULT_RING))
