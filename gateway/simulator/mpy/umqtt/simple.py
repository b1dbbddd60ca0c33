"""Host implementation of ``umqtt.simple`` (micropython-lib), MQTT 3.1.1.

Written from the documented API, on a plain blocking TCP socket:
``MQTTClient(client_id, server, port=0, user=None, password=None,
keepalive=0, ssl=None, ssl_params={})`` with ``connect(clean_session=True,
timeout=None)``, ``disconnect()``, ``ping()``, ``publish(topic, msg,
retain=False, qos=0)``, ``subscribe(topic, qos=0)``, ``set_callback(f)``,
``set_last_will(topic, msg, retain=False, qos=0)``, ``wait_msg()`` and
``check_msg()``.  As in umqtt, a vanished broker shows up as ``OSError``
(``OSError(-1)`` when the connection was closed), a refused connection as
``MQTTException(return_code)``; QoS 2 is not supported.
"""

import socket
import struct
from typing import Any


def _report(state):
    try:
        from gateway.simulator import runtime
        runtime.publish("mqtt", state)
    except Exception:
        pass


class MQTTException(Exception):
    pass


def _b(s):
    return s.encode() if isinstance(s, str) else bytes(s)


def _varlen(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    s = _b(s)
    return struct.pack("!H", len(s)) + s


class MQTTClient:
    def __init__(self, client_id, server, port=0, user=None, password=None,
                 keepalive=0, ssl=None, ssl_params=None):
        if port == 0:
            port = 8883 if ssl else 1883
        self.client_id = client_id
        self.sock: Any = None   # the broker connection, once connect() made it
        self.server = server
        self.port = port
        self.ssl = ssl
        self.ssl_params = ssl_params or {}
        self.pid = 0
        self.cb = None
        self.user = user
        self.pswd = password
        self.keepalive = keepalive
        self.lw_topic = None
        self.lw_msg = None
        self.lw_qos = 0
        self.lw_retain = False

    # -- low level --
    def _read(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise OSError(-1)
            buf += chunk
        return bytes(buf)

    def _write(self, data):
        self.sock.sendall(data)

    def _recv_len(self):
        n = 0
        shift = 0
        while True:
            b = self._read(1)[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        assert 0 <= qos <= 2
        assert topic
        self.lw_topic = topic
        self.lw_msg = msg
        self.lw_qos = qos
        self.lw_retain = retain

    def connect(self, clean_session=True, timeout=None):
        addr = socket.getaddrinfo(self.server, self.port)[0][-1]
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        if self.ssl:
            import ssl as _ssl
            ctx = self.ssl if hasattr(self.ssl, "wrap_socket") else _ssl.create_default_context()
            self.sock = ctx.wrap_socket(self.sock, server_hostname=self.server)
        flags = 0x02 if clean_session else 0
        payload = _str(self.client_id)
        if self.lw_topic:
            flags |= 0x04 | (self.lw_qos & 3) << 3 | (0x20 if self.lw_retain else 0)
            payload += _str(self.lw_topic) + _str(self.lw_msg)
        if self.user is not None:
            flags |= 0x80
            payload += _str(self.user)
            if self.pswd is not None:
                flags |= 0x40
                payload += _str(self.pswd)
        var = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive)
        body = var + payload
        self._write(b"\x10" + _varlen(len(body)) + body)
        resp = self._read(4)
        self.sock.settimeout(None)
        if resp[0] != 0x20 or resp[1] != 0x02:
            raise MQTTException(0)
        if resp[3] != 0:
            raise MQTTException(resp[3])
        _report("connected")
        return resp[2] & 1

    def disconnect(self):
        try:
            self._write(b"\xe0\x00")
        finally:
            self.sock.close()
            _report("disconnected")

    def ping(self):
        self._write(b"\xc0\x00")

    def publish(self, topic, msg, retain=False, qos=0):
        assert qos in (0, 1), "QoS 2 not supported"
        topic = _b(topic)
        msg = _b(msg)
        var = _str(topic)
        pid = 0
        if qos:
            self.pid = self.pid % 65535 + 1
            pid = self.pid
            var += struct.pack("!H", pid)
        header = 0x30 | qos << 1 | (1 if retain else 0)
        self._write(bytes([header]) + _varlen(len(var) + len(msg)) + var + msg)
        if qos == 1:
            while True:
                op = self.wait_msg()
                if op == 0x40:
                    sz = self._read(1)
                    assert sz == b"\x02"
                    rcv_pid = struct.unpack("!H", self._read(2))[0]
                    if pid == rcv_pid:
                        return

    def subscribe(self, topic, qos=0):
        assert self.cb is not None, "Subscribe callback is not set"
        self.pid = self.pid % 65535 + 1
        pid = self.pid
        body = struct.pack("!H", pid) + _str(topic) + bytes([qos])
        self._write(b"\x82" + _varlen(len(body)) + body)
        while True:
            op = self.wait_msg()
            if op == 0x90:
                resp = self._read(4)
                if resp[1:3] == struct.pack("!H", pid):
                    if resp[3] == 0x80:
                        raise MQTTException(resp[3])
                    return

    def wait_msg(self):
        """Wait for one incoming packet and handle it.  A PUBLISH goes to the
        callback (returns None); other packet types are returned as their
        first byte, with the rest left for the caller, as umqtt does."""
        try:
            res = self.sock.recv(1)
        except (BlockingIOError, InterruptedError):
            res = None
        except TimeoutError:
            res = None
        finally:
            try:
                self.sock.setblocking(True)
            except OSError:
                pass
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)
        if res == b"\xd0":  # PINGRESP
            self._read(1)
            return None
        op = res[0]
        if op & 0xF0 != 0x30:
            return op
        sz = self._recv_len()
        tlen = struct.unpack("!H", self._read(2))[0]
        topic = self._read(tlen)
        sz -= tlen + 2
        pid = 0
        if op & 6:
            pid = struct.unpack("!H", self._read(2))[0]
            sz -= 2
        msg = self._read(sz)
        if self.cb is not None:
            self.cb(topic, msg)
        if op & 6 == 2:
            self._write(b"\x40\x02" + struct.pack("!H", pid))
        elif op & 6 == 4:
            raise MQTTException("QoS 2 not supported")
        return None

    def check_msg(self):
        """Handle one pending incoming packet if there is one; never blocks
        waiting for the first byte."""
        self.sock.setblocking(False)
        return self.wait_msg()
