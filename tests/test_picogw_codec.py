"""The gateway's picogw codec against the shared vectors, and the streaming receiver."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from gateway.protocols.picogw import MAX_FRAME, FrameError, FrameReceiver, decode, encode

VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())


@pytest.mark.parametrize("vec", VECTORS["encode"], ids=lambda v: v["line"].strip()[:40])
def test_encode_vectors(vec: dict) -> None:
    fields = [(k, v) for k, v in vec["fields"]]
    assert encode(vec["type"], vec["number"], fields) == vec["line"].encode()


@pytest.mark.parametrize("vec", VECTORS["decode"], ids=lambda v: repr(v["line"])[:40])
def test_decode_vectors(vec: dict) -> None:
    line = vec["line"].encode("latin-1")
    if "error" in vec:
        with pytest.raises(FrameError) as err:
            decode(line)
        assert err.value.kind == vec["error"]
    else:
        frame = decode(line)
        assert [frame.type, frame.number, [list(f) for f in frame.fields]] == [
            vec["frame"]["type"], vec["frame"]["number"], vec["frame"]["fields"]]


def test_receiver_gets_every_frame_whatever_the_chunking() -> None:
    good = [v["line"].encode() for v in VECTORS["encode"]]
    stream = b"".join(good)
    for cut in range(1, len(stream)):
        rx = FrameReceiver()
        frames = rx.feed(stream[:cut]) + rx.feed(stream[cut:])
        assert len(frames) == len(good)


def test_garbage_costs_only_the_frame_it_touches() -> None:
    good = encode("R", 5, [("temp", "20.5")])
    corrupt = good.replace(b"20.5", b"20.6")
    rx = FrameReceiver()
    frames = rx.feed(b"\x00\xff garbage\n" + corrupt + b"x" * 1000 + b"\n$$$" + good + good)
    assert [f.number for f in frames] == [5, 5]
    assert (rx.counts["noise"], rx.counts["corrupt"], rx.counts["frames"]) == (2, 1, 2)
    rx = FrameReceiver()
    assert rx.feed(corrupt + good) == [decode(good)]
    assert rx.counts["corrupt"] == 1


def test_receiver_memory_is_bounded() -> None:
    rx = FrameReceiver()
    for _ in range(100):
        rx.feed(b"$" + b"y" * 999)
    assert len(rx._buf) <= MAX_FRAME  # noqa: SLF001 -- the bound is on the buffer, which has no public view
    assert rx.counts["overlong"] == 1  # one line, counted once however long it grows
    assert rx.feed(b"\n" + encode("R", 1, [("a", "1")]))[0].number == 1


def test_encode_refuses_what_the_spec_forbids() -> None:
    for fields in ([("Temp", "1")], [("temp", "1,2")], [("temp", "")], [("t" * 30, "1")]):
        with pytest.raises(ValueError):
            encode("R", 1, fields)
    with pytest.raises(ValueError):
        encode("R", 1, [(f"m{i}", "9" * 30) for i in range(10)])


@pytest.mark.parametrize("vec", VECTORS["decode"], ids=lambda v: repr(v["line"])[:40])
def test_receiver_agrees_with_decode_on_every_vector(vec: dict) -> None:
    # The receiver takes a one-pass fast path for well-formed lines: it must accept
    # exactly what decode() accepts, and count a rejection under the same kind.
    line = vec["line"].encode("latin-1")
    rx = FrameReceiver()
    frames = rx.feed(line if line.endswith(b"\n") else line + b"\n")
    if "error" in vec:
        assert frames == [] and rx.counts[vec["error"]] == 1
    else:
        assert frames == [decode(line)]


def _frame_of_length(total: int) -> bytes:
    """A frame with a right CRC, exactly ``total`` bytes from ``$`` to ``\\n``."""
    parts, room = ["R", "1"], total - len(b"$R,1*00000000\n")
    while room > 0:
        key = f"f{len(parts)}"
        if room <= 24 + 1:  # the rest fits one bare key (",key")
            parts.append("k" * (room - 1))
            break
        value = min(32, room - len(key) - 2)
        parts.append(f"{key}={'v' * value}")
        room -= len(key) + 2 + value
    body = ",".join(parts).encode()
    line = b"$" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"
    assert len(line) == total
    return line


def test_the_longest_frame_passes_and_one_byte_more_is_overlong() -> None:
    longest, too_long = _frame_of_length(MAX_FRAME), _frame_of_length(MAX_FRAME + 1)
    assert decode(longest).number == 1
    with pytest.raises(FrameError) as err:
        decode(too_long)
    assert err.value.kind == "overlong"
    rx = FrameReceiver()  # and the receiver's fast path draws the line in the same place
    assert len(rx.feed(longest + too_long)) == 1
    assert rx.counts["overlong"] == 1
