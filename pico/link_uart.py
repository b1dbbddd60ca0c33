# uart link: picogw frames over machine.UART (Pi GPIO14/15 <-> Pico UART0).

import core
import machine
import serial_loop

DEFAULTS = {"id": 0, "baudrate": 115200, "tx": 0, "rx": 1}
CHUNK = 64


class UartPort:
    def __init__(self, cfg):
        c = dict(DEFAULTS)
        c.update(cfg or {})
        self.uart = machine.UART(c["id"], baudrate=c["baudrate"],
                                 tx=machine.Pin(c["tx"]), rx=machine.Pin(c["rx"]))

    def read(self):
        n = self.uart.any()
        if not n:
            return None
        return self.uart.read(min(n, CHUNK))

    def write(self, data):
        self.uart.write(data)


def run(config, node):
    port = UartPort(getattr(config, "UART", None))
    serial_loop.run(port, node, getattr(config, "READ_INTERVAL", 5.0),
                    getattr(config, "ACK_RING", core.DEFAULT_RING))
