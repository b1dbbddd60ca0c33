"""The front doors under arbitrary input (hypothesis): the serial frame path and the
command handler. Nothing raises out of them, every rejection is counted, and a good
frame after garbage still gets through."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peers import unopened_uart_link

from gateway.commands import PayloadError, parse_led_payload
from gateway.domain import LedCommand
from gateway.protocols.picogw import MAX_FRAME, FrameError, FrameReceiver, decode, encode
from gateway.protocols.picogw_serial import PicogwSerialSession
from gateway.topics import METRIC_PATTERN, Topics

GOOD = encode("R", 7, [("temp", "21.5")])


frame_like = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: b"$" + b + b"\n", st.binary(max_size=250)),
    st.sampled_from([b"\n", b"$", b"*", b"\r\n", b"$R,1,temp=nan*00000000\n", b"\xff\xfe\n", b"$" * 300]),
    st.builds(lambda v: encode("R", 1, [("temp", v)]),
              st.sampled_from(["nan", "inf", "-inf", "1e400", "1e308", "0x10", "1_0"])),
    st.builds(lambda k: encode("R", 2, [(k, "1")]), st.from_regex(METRIC_PATTERN, fullmatch=True)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(chunks=st.lists(frame_like, max_size=8), cut=st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_never_raise_and_a_good_frame_still_arrives(chunks: list[bytes], cut: int) -> None:
    link = unopened_uart_link()
    session = link.session
    assert isinstance(session, PicogwSerialSession)
    stream = b"".join(chunks) + b"\n" + GOOD
    cut = min(cut, len(stream))
    session.received(stream[:cut])  # split anywhere
    session.received(stream[cut:])
    assert link.events.got[-1][1:3] == ("temp", 21.5)
    assert len(session.rx._buf) <= MAX_FRAME  # noqa: SLF001 -- the bound is on the buffer, which has no public view


@given(st.binary(min_size=1, max_size=MAX_FRAME * 3))
def test_every_bad_line_is_counted(line: bytes) -> None:
    rx = FrameReceiver()
    data = line.replace(b"\n", b"") + b"\n"
    frames = rx.feed(data)
    assert len(frames) + sum(rx.counts[k] for k in ("noise", "malformed", "corrupt", "overlong")) == 1


@given(st.binary(max_size=200))
@example(b"\x1c0")  # str.strip() takes control characters for white space: this was "0", off
def test_any_payload_is_a_command_or_a_clear_error(payload: bytes) -> None:
    try:
        command = parse_led_payload(payload)
    except PayloadError as exc:
        assert str(exc)
    else:
        assert command in LedCommand
        assert payload.strip().lower() in {b"on", b"off", b"toggle", b"1", b"0", b"true", b"false"}


@given(st.text(max_size=120))
def test_any_topic_parses_or_is_ignored(topic: str) -> None:
    parsed = Topics("pico").parse_command(topic)
    if parsed is not None:
        device, what = parsed
        assert topic == f"pico/{device}/cmd/{what}" and "/" not in device


@settings(max_examples=200, deadline=None)
@given(topic=st.one_of(st.text(max_size=80), st.builds(lambda d: f"pico/{d}/cmd/led", st.text(max_size=70)),
                       st.sampled_from(["pico/fz/cmd/led", "pico/nosuch/cmd/led", "pico//cmd/led",
                                        "pico/fz/cmd/led/x"])),
       payload=st.binary(max_size=100), retained=st.booleans())
def test_the_command_handler_answers_everything_and_never_raises(bridge, topic: str, payload: bytes,
                                                                 retained: bool) -> None:
    bridge, on_command = bridge
    before = sum(bridge.stats[k] for k in ("commands_ok", "commands_failed", "commands_not_owned"))
    on_command(topic, payload, retained)
    bridge.wait_idle()
    after = sum(bridge.stats[k] for k in ("commands_ok", "commands_failed", "commands_not_owned"))
    is_command = Topics("pico").parse_command(topic) is not None
    assert after - before == (1 if is_command else 0)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    """A real bridge with a real (never connected) MQTT client and a uart link whose
    port is not open: every valid command ends as 'port not open'. With it, the handler
    the bridge subscribed for the link's cmd/led: what an MQTT message there reaches."""
    from gateway.bridge import Bridge
    from gateway.config import MqttConfig
    from gateway.mqtt import MqttConnection
    from gateway.store import Store

    tmp = tmp_path_factory.mktemp("fuzz")
    mqtt = MqttConnection(MqttConfig(host="127.0.0.1", port=1), "fuzz", ("pico/bridge/fz/status", "offline"))
    handlers = {}
    subscribe = mqtt.subscribe

    def caught(topic_filter, handler, *args, **kw):  # the handler the bridge gives the broker for cmd/led
        handlers[topic_filter] = handler
        return subscribe(topic_filter, handler, *args, **kw)

    mqtt.subscribe = caught
    b = Bridge("fz", Topics("pico"), Store(tmp / "r.db"), mqtt)
    b.add(unopened_uart_link())
    yield b, handlers["pico/fz/cmd/led"]


_value_chars = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "$*,")
field = st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,25}", fullmatch=True),
                  st.one_of(st.none(),
                            st.text(_value_chars, min_size=30, max_size=34),  # the length limit's edge
                            st.text(_value_chars, max_size=8),
                            st.text(st.characters(min_codepoint=0x1f, max_codepoint=0x7f), max_size=34)))


@settings(max_examples=500, deadline=None)
@given(ftype=st.sampled_from("RSHACa"), number=st.integers(0, 2**33), fields=st.lists(field, max_size=8),
       crc_ok=st.booleans(), cr=st.booleans(), junk=st.sampled_from([b"", b"x", b"$", b"*", b",", b"=", b" "]))
def test_the_receivers_fast_path_accepts_exactly_what_decode_accepts(
        ftype: str, number: int, fields: list, crc_ok: bool, cr: bool, junk: bytes) -> None:
    body = ",".join([ftype, str(number)] + [k if v is None else f"{k}={v}" for k, v in fields]).encode("latin-1")
    crc = zlib.crc32(body) if crc_ok else zlib.crc32(body) ^ 1
    line = b"$" + body + junk + b"*" + f"{crc:08x}".encode() + (b"\r" if cr else b"") + b"\n"
    rx = FrameReceiver()
    got = rx.feed(line)
    try:
        expected = [decode(line)]
    except FrameError as exc:
        assert got == [] and rx.counts[exc.kind] == 1
    else:
        assert got == expected
