"""The `picogw` serial line protocol, gateway side (spec: docs/protocol.md §1).

Frames are single lines, ``$<body>*<crc32 hex>\\n``. This module has the codec and
a streaming receiver that cuts a byte stream into checked frames, resynchronising
after garbage and counting everything it drops::

    >>> encode("C", 7, [("led", "on")])
    b'$C,7,led=on*8babb652\\n'
    >>> rx = FrameReceiver()
    >>> rx.feed(b"noise\\n$R,1,temp=21.5*68953714\\n")
    [Frame(type='R', number=1, fields=(('temp', '21.5'),))]
    >>> rx.counts["noise"]
    1

The firmware has its own, smaller implementation (pico/frame.py); both are held to
tests/vectors/frames.json.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from gateway.topics import METRIC_PATTERN, is_metric

MAX_FRAME = 200
"""Longest frame in bytes, from ``$`` to ``\\n`` inclusive."""

_KEY_PATTERN = METRIC_PATTERN.encode("ascii")  # a field's key is a metric name: docs/protocol.md
_KEY = re.compile(_KEY_PATTERN + rb"\Z")


def is_key(name: str) -> bool:
    """A field (metric) name the protocol allows: ``temp`` yes, ``Temp``, ``a+b``, ``""`` no."""
    return is_metric(name)


_VALUE_BYTES = frozenset(range(0x20, 0x7F)) - frozenset(b"$*,")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# A well-formed frame as one line without its "\n" (the same rules as decode() and
# parse_body(), in one pass): the receiver's fast path. Value bytes: 0x20-0x7e but $ * ,
_WELL_FORMED = re.compile(
    rb"\$([A-Z]),([0-9]{1,10})((?:," + _KEY_PATTERN + rb"(?:=[\x20-\x23\x25-\x29\x2b\x2d-\x7e]{1,32})?)*)"
    rb"\*([0-9a-fA-F]{8})\r?")
_FIELD = re.compile(rb",([a-z0-9_]+)(?:=([^,]+))?")


class FrameError(ValueError):
    """A line that is not a valid frame; ``kind`` says why (see ERROR_KINDS)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


ERROR_KINDS = ("noise", "malformed", "corrupt", "overlong")


class Frame(NamedTuple):
    type: str
    number: int
    fields: tuple[tuple[str, str | None], ...]

    def get(self, key: str) -> str | None:
        for k, v in self.fields:
            if k == key:
                return v
        return None


def crc(body: bytes) -> str:
    return f"{zlib.crc32(body):08x}"


def encode(ftype: str, number: int, fields: Iterable[tuple[str, str | None]] = ()) -> bytes:
    """Encode one frame; raises ValueError for anything the spec does not allow."""
    if len(ftype) != 1 or not ftype.isupper():
        raise ValueError(f"frame type must be one uppercase letter, not {ftype!r}")
    if not 0 <= number <= 0xFFFFFFFF:
        raise ValueError(f"frame number out of range: {number}")
    parts = [ftype, str(number)]
    for key, value in fields:
        kb = key.encode("ascii")
        if not _KEY.match(kb):
            raise ValueError(f"bad field key {key!r}")
        if value is None:
            parts.append(key)
        else:
            vb = value.encode("ascii")
            if not 1 <= len(vb) <= 32 or not _VALUE_BYTES.issuperset(vb):
                raise ValueError(f"bad value for {key!r}: {value!r}")
            parts.append(f"{key}={value}")
    body = ",".join(parts).encode("ascii")
    line = b"$" + body + b"*" + crc(body).encode("ascii") + b"\n"
    if len(line) > MAX_FRAME:
        raise ValueError(f"frame would be {len(line)} bytes, more than {MAX_FRAME}")
    return line


def decode(line: bytes) -> Frame:
    """Decode one line (with or without its ``\\n``); raises FrameError.

    Anything before the last ``$`` is ignored, as a receiver resynchronising
    would; a line without ``$`` is noise.
    """
    start = line.rfind(b"$")
    if start < 0:
        raise FrameError("noise")
    if len(line) - start > MAX_FRAME:
        raise FrameError("overlong", f"{len(line) - start} bytes")
    frame = line[start + 1 :].rstrip(b"\n")
    if frame.endswith(b"\r"):
        frame = frame[:-1]
    star = frame.find(b"*")
    if star < 0 or len(frame) - star - 1 != 8 or not _HEX.issuperset(frame[star + 1 :]):
        raise FrameError("malformed", "no *<8 hex digits> at the end")
    body = frame[:star]
    if f"{zlib.crc32(body):08x}" != frame[star + 1 :].decode("ascii").lower():
        raise FrameError("corrupt", "CRC mismatch")
    return parse_body(body)


def parse_body(body: bytes) -> Frame:
    parts = body.split(b",")
    if len(parts) < 2:
        raise FrameError("malformed", "needs a type and a number")
    ftype, num = parts[0], parts[1]
    if len(ftype) != 1 or not 0x41 <= ftype[0] <= 0x5A:
        raise FrameError("malformed", "type must be one uppercase letter")
    if not num.isdigit() or len(num) > 10 or int(num) > 0xFFFFFFFF:
        raise FrameError("malformed", "bad number")
    fields: list[tuple[str, str | None]] = []
    for part in parts[2:]:
        key, eq, value = part.partition(b"=")
        if not _KEY.match(key):
            raise FrameError("malformed", f"bad key {key[:24]!r}")
        if eq:
            if not 1 <= len(value) <= 32 or not _VALUE_BYTES.issuperset(value):
                raise FrameError("malformed", f"bad value for {key.decode()}")
            fields.append((key.decode("ascii"), value.decode("ascii")))
        else:
            fields.append((key.decode("ascii"), None))
    return Frame(chr(ftype[0]), int(num), tuple(fields))


def _decode_well_formed(line: bytes) -> Frame | None:
    """The frame in ``line`` (without its ``\\n``) if it is well formed and its CRC and
    number check out, else None: then decode() says what is wrong with it. Half the
    cost of decode(), which matters at tens of thousands of frames a second."""
    m = _WELL_FORMED.fullmatch(line)
    if m is None or len(line) >= MAX_FRAME:
        return None
    number = int(m[2])
    if number > 0xFFFFFFFF or zlib.crc32(line[1:m.start(4) - 1]) != int(m[4], 16):
        return None
    return Frame(chr(line[1]), number, tuple(
        (key.decode(), value.decode() if value else None) for key, value in _FIELD.findall(m[3])))


class FrameReceiver:
    """Cuts a byte stream into frames, holding at most about MAX_FRAME bytes.

    ``counts`` holds how many good frames arrived (``frames``) and how many lines
    were dropped, per error kind, so a link can report them.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._counted = False  # this line's drop is already counted
        self.counts: Counter[str] = Counter()

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._buf
        buf += data
        end = buf.rfind(b"\n")
        if end >= 0:
            lines = bytes(buf[:end]).split(b"\n")  # every complete line, at once
            del buf[: end + 1]
            counted, self._counted = self._counted, False  # (only the first line can be a cut one)
            for line in lines:
                frame = _decode_well_formed(line)
                if frame is None:
                    try:
                        frame = decode(line + b"\n")
                    except FrameError as exc:
                        if not (counted and exc.kind == "noise"):
                            self.counts[exc.kind] += 1
                        counted = False
                        continue
                counted = False
                frames.append(frame)
            if frames:
                self.counts["frames"] += len(frames)
        if len(buf) > MAX_FRAME:
            self._trim()
        return frames

    def _trim(self) -> None:
        """Drop what can no longer be part of a valid frame (no newline yet)."""
        buf = self._buf
        dollar = buf.rfind(b"$")
        if dollar >= 0 and len(buf) - dollar <= MAX_FRAME:
            del buf[:dollar]  # noise before a frame that may still complete
            return
        if not self._counted:
            self.counts["noise" if dollar < 0 else "overlong"] += 1
            self._counted = True
        del buf[:]
