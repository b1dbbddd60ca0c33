# picogw serial frame codec (docs/protocol.md section 1). Pure logic: runs on
# MicroPython and CPython alike, and is held to tests/vectors/frames.json.
#
#   $<body>*<crc32 as 8 hex digits>\n      body = <type>,<number>[,<field>]...
#
# encode(ftype, number, fields) -> bytes       fields: [(key, value or None)]
# decode(line) -> (ftype, number, fields)      raises ValueError(kind), kind in
#                                              "noise" "malformed" "corrupt" "overlong"
# LineReader().feed(data) -> [line, ...]       cuts a byte stream into lines,
#                                              holding at most MAX_FRAME bytes

MAX_FRAME = 200      # bytes from "$" to "\n" inclusive
MAX_NUMBER = 0xFFFFFFFF
MAX_KEY = 24
MAX_VALUE = 32

try:
    from binascii import crc32 as _crc32
except ImportError:  # some MicroPython builds lack binascii.crc32
    _crc32 = None


def crc32_py(data):
    # Bitwise CRC-32 (IEEE, reflected 0xEDB88320): same result as zlib.crc32.
    # Kept in two 16-bit halves so every step stays a small int (no heap
    # allocation per bit on a 32-bit MicroPython).
    hi = 0xFFFF
    lo = 0xFFFF
    for b in data:
        lo ^= b
        for _ in range(8):
            carry = lo & 1
            lo = (lo >> 1) | ((hi & 1) << 15)
            hi >>= 1
            if carry:
                hi ^= 0xEDB8
                lo ^= 0x8320
    return ((hi ^ 0xFFFF) << 16) | (lo ^ 0xFFFF)


def crc32(data):
    if _crc32 is None:
        return crc32_py(data)
    return _crc32(data) & 0xFFFFFFFF


def _key_ok(k):
    # k: bytes; [a-z][a-z0-9_]{0,23}
    n = len(k)
    if n < 1 or n > MAX_KEY or not (97 <= k[0] <= 122):
        return False
    for c in k:
        if not (97 <= c <= 122 or 48 <= c <= 57 or c == 95):
            return False
    return True


def _value_ok(v):
    # v: bytes; 1..32 bytes of 0x20..0x7E except "$" "*" ","
    n = len(v)
    if n < 1 or n > MAX_VALUE:
        return False
    for c in v:
        if c < 0x20 or c > 0x7E or c == 0x24 or c == 0x2A or c == 0x2C:
            return False
    return True


def _hex8(n):
    s = "%x" % n
    return "0" * (8 - len(s)) + s


def encode(ftype, number, fields=()):
    # Returns the whole line as bytes; ValueError for anything the spec forbids.
    if len(ftype) != 1 or not ("A" <= ftype <= "Z"):
        raise ValueError("bad type")
    if number < 0 or number > MAX_NUMBER:
        raise ValueError("bad number")
    parts = [ftype, str(number)]
    for key, value in fields:
        if not _key_ok(key.encode()):
            raise ValueError("bad key")
        if value is None:
            parts.append(key)
        else:
            if not _value_ok(value.encode()):
                raise ValueError("bad value")
            parts.append(key + "=" + value)
    return encode_body(",".join(parts))


def encode_body(body):
    # A body (str) already made of checked parts -> the whole line as bytes.
    body = body.encode()
    line = b"$" + body + b"*" + _hex8(crc32(body)).encode() + b"\n"
    if len(line) > MAX_FRAME:
        raise ValueError("overlong")
    return line


def _parse_hex8(h):
    n = 0
    for c in h:
        if 48 <= c <= 57:
            d = c - 48
        elif 97 <= c <= 102:
            d = c - 87
        elif 65 <= c <= 70:
            d = c - 55
        else:
            return -1
        n = (n << 4) | d
    return n


def decode(line):
    # line: bytes, with or without its "\n". Anything before the last "$" is
    # dropped (resynchronisation); a line without "$" is noise.
    start = line.rfind(b"$")
    if start < 0:
        raise ValueError("noise")
    if len(line) - start > MAX_FRAME:
        raise ValueError("overlong")
    end = len(line)
    if end > start + 1 and line[end - 1] == 10:
        end -= 1
    if end > start + 1 and line[end - 1] == 13:
        end -= 1
    star = line.find(b"*", start)
    if star < 0 or star > end or end - star - 1 != 8:
        raise ValueError("malformed")
    want = _parse_hex8(line[star + 1:end])
    if want < 0:
        raise ValueError("malformed")
    body = line[start + 1:star]
    if crc32(body) != want:
        raise ValueError("corrupt")
    return parse_body(body)


def parse_body(body):
    parts = body.split(b",")
    if len(parts) < 2:
        raise ValueError("malformed")
    t = parts[0]
    if len(t) != 1 or not (65 <= t[0] <= 90):
        raise ValueError("malformed")
    num = parts[1]
    if len(num) < 1 or len(num) > 10:
        raise ValueError("malformed")
    for c in num:
        if not (48 <= c <= 57):
            raise ValueError("malformed")
    number = int(num)
    if number > MAX_NUMBER:
        raise ValueError("malformed")
    fields = []
    for p in parts[2:]:
        eq = p.find(b"=")
        if eq < 0:
            if not _key_ok(p):
                raise ValueError("malformed")
            fields.append((p.decode(), None))
        else:
            k = p[:eq]
            v = p[eq + 1:]
            if not _key_ok(k) or not _value_ok(v):
                raise ValueError("malformed")
            fields.append((k.decode(), v.decode()))
    return (chr(t[0]), number, fields)


def fmt_number(v):
    # A reading value as frame/MQTT text: ints as they are, floats with at
    # most 3 decimals and no trailing zeros ("21.5", "3", "-0.125").
    # None for nan/inf (not allowed on the wire).
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v or v in (float("inf"), float("-inf")):
        return None
    if -1e9 < v < 1e9:
        s = "%.3f" % v
        s = s.rstrip("0").rstrip(".")
        if s == "-0":
            s = "0"
        return s
    return "%.6e" % v


class LineReader:
    # Cuts a byte stream into lines per docs/protocol.md 1.2 without ever
    # holding much more than MAX_FRAME bytes. feed() returns the complete
    # lines that contain a "$" (candidates for decode()); lines without "$"
    # are counted in .noise, frames that grew past MAX_FRAME in .overlong.

    def __init__(self, max_frame=MAX_FRAME):
        self.max = max_frame
        self.buf = b""
        self.counted = False   # the current line's drop is already counted
        self.noise = 0
        self.overlong = 0

    def feed(self, data):
        lines = []
        buf = self.buf + bytes(data)
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = buf[:nl + 1]
            buf = buf[nl + 1:]
            if line.find(b"$") >= 0:
                lines.append(line)
            elif not self.counted:
                self.noise += 1
            self.counted = False
        if len(buf) > self.max:
            d = buf.rfind(b"$")
            if d >= 0 and len(buf) - d <= self.max:
                buf = buf[d:]
            else:
                if not self.counted:
                    if d < 0:
                        self.noise += 1
                    else:
                        self.overlong += 1
                self.counted = True
                buf = b""
        self.buf = buf
        return lines
