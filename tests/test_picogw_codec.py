"""The gateway's picogw codec against the shared vectors, and the streaming receiver."""

from __future__ import annotations

import json
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
    assert len(rx._buf) <= MAX_FRAME
    assert rx.counts["overlong"] == 1  # one line, counted once however long it grows
    assert rx.feed(b"\n" + encode("R", 1, [("a", "1")]))[0].number == 1


def test_encode_refuses_what_the_spec_forbids() -> None:
    for fields in ([("Temp", "1")], [("temp", "1,2")], [("temp", "")], [("t" * 30, "1")]):
        with pytest.raises(ValueError):
            encode("R", 1, fields)
    with pytest.raises(ValueError):
        encode("R", 1, [(f"m{i}", "9" * 30) for i in range(10)])
