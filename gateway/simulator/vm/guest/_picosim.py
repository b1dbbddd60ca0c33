# Runs inside the MicroPython VM: calls into the virtual Pico's host (the
# Python process that owns the ptys, the LED, pico.json).  A call is
# host.call(name, json [args, kwargs]) -> json {"v": value} or {"e": [type, msg]};
# bytes travel as {"$b": hex}, host objects as {"$h": handle}.
import binascii
import json

import host


def _enc(a):
    if isinstance(a, (bytes, bytearray, memoryview)):
        return {"$b": binascii.hexlify(a).decode()}
    if isinstance(a, (list, tuple)):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        return {k: _enc(a[k]) for k in a if a[k] is not None}
    h = getattr(a, "_h", None)
    if h is not None:
        return {"$h": h}
    return a


def _dec(v):
    if isinstance(v, dict) and "$b" in v:
        return binascii.unhexlify(v["$b"])
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def call(name, args=(), kw=None):
    r = json.loads(host.call(name, json.dumps([_enc(args), _enc(kw or {})])))
    e = r.get("e")
    if e is not None:
        if e[0] == "Interrupted":
            raise KeyboardInterrupt
        cls = getattr(__import__("builtins"), e[0], None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = RuntimeError
        if cls is OSError and e[1].startswith("[Errno "):
            raise OSError(int(e[1][7:e[1].index("]")]))
        raise cls(e[1])
    return _dec(r.get("v"))


def raw(name, payload):
    # A host call without JSON (the UART poll): an answer "!Type: msg" is an error.
    r = host.call(name, payload)
    if r and r[0] == "!":
        if r.startswith("!KeyboardInterrupt"):
            raise KeyboardInterrupt
        if r.startswith("!OSError "):
            raise OSError(int(r[9:]))
        raise OSError(r[1:])
    return r


class HostObject:
    # A peripheral that lives on the host: the guest holds its handle.
    def _new(self, cls, args, kw=None):
        self._h = call("new", (cls, list(args), kw or {}))

    def _m(self, name, args=(), kw=None):
        return call("method", (self._h, name, list(args), kw or {}))
