# socket for a virtual Pico W on the MicroPython VM, as MicroPython's (lwIP):
# the sockets are the host's (loopback only; a bind's port is remapped, see
# gateway/simulator/runtime.py), with MicroPython's stream methods
# (read, readline, write, makefile returns the socket itself).
import binascii

from _picosim import HostObject, call, raw

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
IPPROTO_TCP = 6
IPPROTO_UDP = 17
# The host's (Linux) values: the host socket takes them as they are.
SOL_SOCKET = 1
SO_REUSEADDR = 2
SO_KEEPALIVE = 9
SO_BROADCAST = 6
IPPROTO_IP = 0
TCP_NODELAY = 1


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    if host == "localhost":
        host = "127.0.0.1"
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        host = call("getaddrinfo", (host,))
    return [(AF_INET, SOCK_STREAM, IPPROTO_TCP, "", (host, port))]


class socket(HostObject):
    def __init__(self, af=AF_INET, type=SOCK_STREAM, proto=0, _handle=None):
        if _handle is not None:
            self._h = _handle
        else:
            self._new("socket", (af, type, proto))
        self._hs = str(self._h)

    def bind(self, addr):
        self._m("bind", (list(addr),))

    def listen(self, backlog=2):
        self._m("listen", (backlog,))

    def accept(self):
        # A raw call: a non-blocking server polls it (EAGAIN is "").
        r = raw("raw_accept", self._hs)
        if not r:
            raise OSError(11)       # EAGAIN
        h, host, port = r.split()
        return socket(_handle=int(h)), (host, int(port))

    def connect(self, addr):
        self._m("connect", (list(addr),))

    def setblocking(self, flag):
        # A raw call: umqtt's check_msg() flips it twice per poll.
        raw("raw_sblock", "%s %d" % (self._hs, 1 if flag else 0))

    def settimeout(self, value):
        self._m("settimeout", (value,))

    def setsockopt(self, level, opt, value):
        self._m("setsockopt", (level, opt, value))

    def recv(self, n):
        r = raw("raw_recv", "%s %d" % (self._hs, n))
        return binascii.unhexlify(r)

    def read(self, n=-1):
        # As MicroPython's stream read: up to n bytes (all until EOF for -1),
        # b"" at EOF, None when a non-blocking socket has nothing yet.
        r = raw("raw_sread", "%s %d" % (self._hs, n))
        return None if r == "-" else binascii.unhexlify(r)

    def readinto(self, buf, nbytes=None):
        data = self.recv(len(buf) if nbytes is None else nbytes)
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        return self._m("readline")

    def send(self, data):
        return self._m("send", (data,))

    def sendall(self, data):
        self._m("sendall", (data,))

    def write(self, data, *n):
        # MicroPython's stream write(buf[, max_len]) and write(buf, off, max_len).
        if len(n) == 1:
            data = memoryview(data)[:n[0]]
        elif len(n) == 2:
            data = memoryview(data)[n[0]:n[0] + n[1]]
        return self._m("write", (data,))

    def makefile(self, mode="rb", buffering=0):
        return self

    def close(self):
        self._m("close")

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
