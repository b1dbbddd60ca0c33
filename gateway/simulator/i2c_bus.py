"""A simulated I2C bus that crosses processes.

A simulated bus is a **directory**.  Every I2C target (a virtual Pico's
``machine.I2CTarget``) listens on a Unix stream socket in it named after its
7-bit address: ``<bus dir>/0x43.sock``.  The controller side
(:class:`SimulatedSMBus`, used by the gateway in place of ``smbus2.SMBus``)
connects to the socket of the address a message is for; no socket (or a
refused connection) means nobody acknowledges the address, and the call fails
with ``OSError(errno.EREMOTEIO)`` like Linux's i2c-dev on a Raspberry Pi.
``SimulatedSMBus`` also accepts the path of one target's socket instead of a
directory; then only that target is on its bus.

Wire format (all integers little-endian)
----------------------------------------
One request carries one I2C transaction: messages separated by repeated
starts, ended by a stop, as in Linux's ``I2C_RDWR`` ioctl::

    request  = u32 n            -- number of bytes that follow
               u8  version      -- 1
               u8  count        -- number of messages, 1..42
               count * message
    message  = u16 addr         -- 7-bit target address
               u8  flags        -- bit 0: 1 = read (controller reads), 0 = write
               u16 len          -- bytes to read, or bytes of data that follow
               len * u8 data    -- only for write messages

    response = u32 n            -- number of bytes that follow
               u8  status       -- 0 = ACK; else an errno (121 EREMOTEIO: no ACK)
               data             -- status 0 only: the bytes of every read
                                   message, concatenated in message order

The target process executes a transaction atomically with respect to other
transactions on the bus (one bus lock per process), byte by byte through the
target's state machine: address match, write requests, read requests, end of
read/write, exactly the events of ``machine.I2CTarget`` (memory mode, or
IRQ handlers of the firmware for a target without ``mem``).  A connection
stays open across transactions; it is not part of the simulated bus state.
"""

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from typing import Any

VERSION = 1
MAX_MSGS = 42
I2C_M_RD = 0x0001


def socket_name(addr):
    return f"0x{addr:02x}.sock"


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("i2c peer closed")
        buf += chunk
    return bytes(buf)


def encode_request(msgs):
    """msgs: list of (addr, read: bool, length_or_data)."""
    body = bytearray(struct.pack("<BB", VERSION, len(msgs)))
    for addr, read, payload in msgs:
        if read:
            body += struct.pack("<HBH", addr, 1, int(payload))
        else:
            data = bytes(payload)
            body += struct.pack("<HBH", addr, 0, len(data)) + data
    return struct.pack("<I", len(body)) + bytes(body)


def decode_request(body):
    version, count = struct.unpack_from("<BB", body, 0)
    if version != VERSION or not 1 <= count <= MAX_MSGS:
        raise ValueError("bad i2c request")
    pos = 2
    msgs = []
    for _ in range(count):
        addr, flags, length = struct.unpack_from("<HBH", body, pos)
        pos += 5
        if flags & 1:
            msgs.append((addr, True, length))
        else:
            msgs.append((addr, False, body[pos:pos + length]))
            pos += length
    return msgs


# --- target side (runs inside the virtual Pico process) ------------------------

class TargetServer:
    """Serves this process's I2CTargets, one listening socket per address."""

    def __init__(self, bus_dir):
        self.bus_dir = bus_dir
        os.makedirs(bus_dir, exist_ok=True)
        self.lock = threading.Lock()     # the bus: one transaction at a time
        self.targets = {}
        self.listeners = {}

    def path(self, addr):
        return os.path.join(self.bus_dir, socket_name(addr))

    def register(self, addr, target):
        from gateway.simulator import runtime
        with self.lock:
            if addr in self.targets:
                raise OSError(errno.EBUSY, f"I2C address 0x{addr:02x} in use")
            self.targets[addr] = target
            path = self.path(addr)
            if os.path.exists(path):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)      # stale socket of a dead process
                else:
                    del self.targets[addr]
                    raise OSError(errno.EADDRINUSE,
                                  f"another target answers at 0x{addr:02x} on {self.bus_dir}")
                finally:
                    probe.close()
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            srv.listen(8)
            self.listeners[addr] = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True,
                         name=f"i2c-0x{addr:02x}").start()
        if runtime.get_state("i2c_socket") is None:
            runtime.publish("i2c_socket", path)
        runtime.log(f"I2C target 0x{addr:02x} on {path}")

    def unregister(self, addr, target):
        with self.lock:
            if self.targets.get(addr) is not target:
                return
            del self.targets[addr]
            srv = self.listeners.pop(addr)
            try:
                os.unlink(self.path(addr))
            except FileNotFoundError:
                pass
            srv.close()

    def _accept(self, srv):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            while True:
                try:
                    n = struct.unpack("<I", _recv_exact(conn, 4))[0]
                    msgs = decode_request(_recv_exact(conn, n))
                except (ConnectionError, OSError, ValueError, struct.error):
                    return
                status, data = self.transaction(msgs)
                body = bytes([status]) + (data if status == 0 else b"")
                try:
                    conn.sendall(struct.pack("<I", len(body)) + body)
                except OSError:
                    return

    def transaction(self, msgs):
        # The targets are machine.I2CTarget: _addr_match, _read_byte, _write_byte and _end are its
        # bus side, private because MicroPython's I2CTarget has no such methods for firmware to see.
        from gateway.simulator import runtime
        if runtime.knob("i2c_fail"):   # a pulled wire: nobody acknowledges the address
            return errno.EREMOTEIO, b""
        delay = (runtime.knob("i2c_byte_delay_us") or 0) / 1e6
        out = bytearray()
        with self.lock:
            current: Any = None
            try:
                for addr, read, payload in msgs:
                    target = self.targets.get(addr)
                    if target is None:
                        return errno.EREMOTEIO, b""
                    if current is not None and current is not target:
                        current._end()  # noqa: SLF001 -- the target's bus side (above)
                    current = target
                    target._addr_match(read)  # noqa: SLF001 -- the target's bus side (above)
                    if read:
                        for i in range(payload):
                            if delay and i:
                                time.sleep(delay)
                            out.append(target._read_byte() & 0xFF)  # noqa: SLF001 -- the target's bus side
                    else:
                        for b in payload:
                            target._write_byte(b)  # noqa: SLF001 -- the target's bus side (above)
            finally:
                if current is not None:
                    current._end()  # noqa: SLF001 -- the target's bus side (above)
        return 0, bytes(out)


_server = None


def target_server():
    global _server
    from gateway.simulator import runtime
    if _server is None:
        bus_dir = runtime.i2c_bus_dir
        if bus_dir is None:
            import tempfile
            bus_dir = tempfile.mkdtemp(prefix="picosim-i2c-")
            runtime.i2c_bus_dir = bus_dir
        _server = TargetServer(bus_dir)
    return _server


# --- controller side (the gateway) ----------------------------------------------

class SimulatedSMBus:
    """Drop-in for the parts of ``smbus2.SMBus`` a gateway uses.

    ``path`` is a bus directory (targets at ``<dir>/0x43.sock``) or one
    target's socket.  Errors are ``OSError`` with errno EREMOTEIO (121), as
    the Pi's i2c driver reports a missing ACK.
    """

    def __init__(self, path, timeout=2.0):
        self.path = os.fspath(path)
        self.timeout = timeout
        self._conns = {}
        self._lock = threading.Lock()
        self.fd = None  # smbus2 compatibility; no real file descriptor

    # context manager / lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._lock:
            for s in self._conns.values():
                try:
                    s.close()
                except OSError:
                    pass
            self._conns.clear()

    def open(self, bus=None):
        pass

    # transport
    def _socket_path(self, addr):
        if os.path.isdir(self.path):
            return os.path.join(self.path, socket_name(addr))
        return self.path

    def _conn(self, path):
        s = self._conns.get(path)
        if s is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO)) from None   # as a missing ACK
            self._conns[path] = s
        return s

    def _run(self, msgs):
        """Run one transaction; return the concatenated read bytes."""
        groups: list[tuple[str, list[Any]]] = []   # consecutive messages for one socket go in one request
        for m in msgs:
            path = self._socket_path(m[0])
            if groups and groups[-1][0] == path:
                groups[-1][1].append(m)
            else:
                groups.append((path, [m]))
        out = bytearray()
        with self._lock:
            for path, group in groups:
                s = self._conn(path)
                try:
                    s.sendall(encode_request(group))
                    n = struct.unpack("<I", _recv_exact(s, 4))[0]
                    body = _recv_exact(s, n)
                except (OSError, ConnectionError, struct.error):
                    self._conns.pop(path, None)
                    s.close()
                    raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO)) from None   # as a missing ACK
                if body[0] != 0:
                    raise OSError(body[0], os.strerror(body[0]))
                out += body[1:]
        return bytes(out)

    # smbus2 API
    def read_byte(self, i2c_addr, force=None):
        return self._run([(i2c_addr, True, 1)])[0]

    def write_byte(self, i2c_addr, value, force=None):
        self._run([(i2c_addr, False, bytes([value & 0xFF]))])

    def write_quick(self, i2c_addr, force=None):
        self._run([(i2c_addr, False, b"")])

    def read_byte_data(self, i2c_addr, register, force=None):
        return self._run([(i2c_addr, False, bytes([register])), (i2c_addr, True, 1)])[0]

    def write_byte_data(self, i2c_addr, register, value, force=None):
        self._run([(i2c_addr, False, bytes([register, value & 0xFF]))])

    def read_word_data(self, i2c_addr, register, force=None):
        d = self._run([(i2c_addr, False, bytes([register])), (i2c_addr, True, 2)])
        return d[0] | (d[1] << 8)

    def write_word_data(self, i2c_addr, register, value, force=None):
        self._run([(i2c_addr, False, bytes([register, value & 0xFF, (value >> 8) & 0xFF]))])

    def read_i2c_block_data(self, i2c_addr, register, length, force=None):
        if not 0 <= length <= 32:
            raise ValueError("Desired block length over 32 bytes")
        return list(self._run([(i2c_addr, False, bytes([register])), (i2c_addr, True, length)]))

    def write_i2c_block_data(self, i2c_addr, register, data, force=None):
        if len(data) > 32:
            raise ValueError("Data length cannot exceed 32 bytes")
        self._run([(i2c_addr, False, bytes([register]) + bytes(data))])

    def i2c_rdwr(self, *i2c_msgs):
        msgs = []
        for m in i2c_msgs:
            if m.flags & I2C_M_RD:
                msgs.append((m.addr, True, m.len))
            else:
                msgs.append((m.addr, False, ctypes.string_at(m.buf, m.len)))
        data = self._run(msgs)
        pos = 0
        for m in i2c_msgs:
            if m.flags & I2C_M_RD:
                chunk = data[pos:pos + m.len]
                ctypes.memmove(m.buf, chunk, len(chunk))
                pos += m.len
