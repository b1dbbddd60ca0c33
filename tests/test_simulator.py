"""The virtual Pico: MicroPython programs (tests/sim_programs) on this host."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import serial
from smbus2 import i2c_msg

from gateway.simulator import patches
from gateway.simulator.config_py import render_config_py
from gateway.simulator.fleet import REPO_ROOT, start_fleet
from gateway.simulator.i2c_bus import SimulatedSMBus

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "sim_programs")
MOSQUITTO = "/usr/sbin/mosquitto"


def prog(name):
    return os.path.join(PROGRAMS, name)


def wait_until(cond, timeout=3.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def fleet_of(tmp_path):
    started = []

    def start(devices, **kw):
        f = start_fleet(devices, str(tmp_path / f"fleet{len(started)}"), **kw)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto not installed")
    d = tmp_path_factory.mktemp("mosquitto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_until(up, 5, "mosquitto")
    yield ("127.0.0.1", port)
    proc.terminate()
    proc.wait(5)


# --- pure functions -------------------------------------------------------------

def test_ticks_wrap_semantics():
    period = 1 << 30
    assert patches.ticks_add(period - 10, 20) == 10
    assert patches.ticks_diff(10, period - 10) == 20
    assert patches.ticks_diff(period - 10, 10) == -20
    assert patches.ticks_diff(5, 5) == 0
    with pytest.raises(OverflowError):
        patches.ticks_add(0, period)


def test_render_config_py_roundtrip():
    text = render_config_py({"DEVICE": "greenhouse", "LINK": "i2c", "READ_INTERVAL": 2,
                             "I2C": {"addr": 0x44}, "TCP": {"port": 9000}})
    ns = {}
    exec(text, ns)
    assert ns["DEVICE"] == "greenhouse" and ns["LINK"] == "i2c"
    assert ns["READ_INTERVAL"] == 2.0
    assert ns["I2C"] == {"id": 0, "addr": 0x44, "sda": 4, "scl": 5}
    assert "0x44" in text
    assert ns["TCP"] == {"host": "0.0.0.0", "port": 9000}
    assert ns["WIFI"]["user"] is None and ns["ADC_PINS"] == {} and ns["DIGITAL_PINS"] == {}
    with pytest.raises(ValueError):
        render_config_py({"LINK": "bluetooth"})


# --- UART -----------------------------------------------------------------------

def test_uart_echo_over_pty(fleet_of):
    fleet = fleet_of([{"id": "u1", "transport": "uart", "firmware": prog("uart_echo.py")}])
    pico = fleet["u1"]
    assert pico.endpoint.startswith("/dev/pts/")
    assert pico.led == "off"
    with serial.Serial(pico.endpoint, 115200, timeout=2) as s:
        s.write(b"hello\r\n")
        assert s.readline() == b"ECHO HELLO\r\n"
        s.write(b"led_on\r")
        assert s.readline() == b"ECHO LED_ON\r\n"
    pico.wait_led("on", 2)
    assert "LED on" in pico.log()
    st = json.load(open(pico.state_path))
    assert st["pid"] == pico.pid and st["usb"] is None and st["tcp"] is None


def test_adc_temperature_conversion(fleet_of):
    fleet = fleet_of([{"id": "t1", "transport": "uart", "firmware": prog("adc_temp.py"),
                       "sim": {"temp_c": 21.5, "temp_noise": 0, "adc": {"26": 12345}}}])
    pico = fleet["t1"]
    with serial.Serial(pico.endpoint, 115200, timeout=2) as s:
        s.write(b"t\n")
        raw, temp = s.readline().split()
        # 12-bit ADC scaled to 16 bits: one count is ~0.47 degC
        assert abs(float(temp) - 21.5) < 0.5
        assert int(raw) & 0xF == int(raw) >> 12       # (raw12 << 4) | (raw12 >> 8)
        s.write(b"a\n")
        assert s.readline() == b"12345\n"
        pico.set_sim(temp_c=35.0)

        def hot():
            s.write(b"t\n")
            return abs(float(s.readline().split()[1]) - 35.0) < 0.5
        wait_until(hot, 3, "new temperature")


# --- I2C ------------------------------------------------------------------------

def test_i2c_memory_mode(fleet_of):
    fleet = fleet_of([{"id": "m1", "transport": "i2c", "firmware": prog("i2c_mem.py")}])
    pico = fleet["m1"]
    assert pico.endpoint == os.path.join(fleet.i2c_bus_dir, "0x43.sock")
    with SimulatedSMBus(fleet.i2c_bus_dir) as bus:
        assert bus.read_i2c_block_data(0x43, 0, 2) == list(b"PG")
        assert bus.read_byte_data(0x43, 1) == ord("G")
        assert bus.read_byte(0x43) == 0       # auto-increment: register 2
        bus.write_byte_data(0x43, 5, 1)       # LED_CMD = on
        pico.wait_led("on", 2)
        wait_until(lambda: bus.read_byte_data(0x43, 5) == 0xFF, 2, "command done")
        assert bus.read_byte_data(0x43, 6) == 1
        bus.write_i2c_block_data(0x43, 20, [1, 2, 3])
        w, r = i2c_msg.write(0x43, [19]), i2c_msg.read(0x43, 5)
        bus.i2c_rdwr(w, r)
        assert list(r) == [0, 1, 2, 3, 0]
        # END_WRITE IRQs: not for the transactions that only set the address
        wait_until(lambda: bus.read_byte_data(0x43, 7) == 2, 2, "END_WRITE count")
        with pytest.raises(OSError) as e:
            bus.read_byte(0x50)
        assert e.value.errno == errno.EREMOTEIO
    # the socket path of one target works as a bus of its own
    with SimulatedSMBus(pico.endpoint) as bus:
        assert bus.read_i2c_block_data(0x43, 0, 2) == list(b"PG")
        with pytest.raises(OSError):
            bus.write_byte(0x44, 1)


def test_i2c_irq_mode(fleet_of):
    fleet = fleet_of([{"id": "q1", "transport": "i2c", "firmware": prog("i2c_irq.py")}])
    pico = fleet["q1"]
    with SimulatedSMBus(fleet.i2c_bus_dir) as bus:
        bus.write_byte(0x43, 1)
        pico.wait_led("on", 10)
        assert bus.read_byte(0x43) == 1
        r = i2c_msg.read(0x43, 3)
        bus.i2c_rdwr(r)
        assert list(r) == [1, 0xA5, 0x5A]
        bus.write_byte(0x43, 0)
        pico.wait_led("off", 10)
        assert bus.read_byte(0x43) == 0
    assert "Uncaught exception" not in pico.log()


# --- MQTT -------------------------------------------------------------------------

def test_umqtt_publish_subscribe_and_last_will(fleet_of, broker):
    import paho.mqtt.client as mqtt
    got = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-observer")
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.retain))
    sub.connect(*broker)
    sub.subscribe("pico/w1/#")
    sub.loop_start()
    try:
        fleet = fleet_of([{"id": "w1", "transport": "wifi", "firmware": prog("mqtt_node.py")}],
                         broker=broker)
        pico = fleet["w1"]
        wait_until(lambda: ("pico/w1/status", b"online", False) in got
                   or ("pico/w1/status", b"online", True) in got, 3, "online")
        sub.publish("pico/w1/cmd", b"on")
        wait_until(lambda: any(t == "pico/w1/echo" and p == b"got on" for t, p, _ in got), 3, "echo")
        pico.wait_led("on", 2)
        pico.kill()         # power cut: the broker publishes the last will
        wait_until(lambda: any(t == "pico/w1/status" and p == b"offline" for t, p, _ in got),
                   4, "last will")
    finally:
        sub.loop_stop()
        sub.disconnect()


# --- USB ------------------------------------------------------------------------

def test_usb_program_on_stdin_stdout(fleet_of):
    fleet = fleet_of([{"id": "s1", "transport": "usb", "firmware": prog("usb_echo.py")}])
    with serial.Serial(fleet["s1"].endpoint, 115200, timeout=2) as s:
        s.write(b"abc\n")
        deadline = time.monotonic() + 10
        line = s.readline()
        while not line.startswith(b"echo:") and time.monotonic() < deadline:  # the banner, maybe cut by a timeout
            line = s.readline()
        assert line == b"echo:abc\r\n"      # print() output is cooked, as on MicroPython


def test_usb_stock_micropython_with_mpremote(fleet_of):
    fleet = fleet_of([{"id": "r1", "transport": "usb", "firmware": "tutorial"}])
    pico = fleet["r1"]
    run = [sys.executable, "-m", "mpremote", "connect", pico.endpoint, "exec"]
    subprocess.run(run + ["from machine import Pin; Pin('LED').on()"], check=True,
                   timeout=10, capture_output=True)
    assert pico.led == "on"
    out = subprocess.run(run + ["from machine import Pin; print(Pin('LED').value())"],
                         check=True, timeout=10, capture_output=True).stdout
    assert out.strip() == b"1"
    bad = subprocess.run(run + ["undefined_name"], timeout=10, capture_output=True)
    assert bad.returncode != 0 and b"NameError" in bad.stdout + bad.stderr


# --- fleet --------------------------------------------------------------------------

def test_fleet_starts_and_stops_leaving_nothing(tmp_path):
    devices = [
        {"id": "a", "transport": "uart", "firmware": prog("uart_echo.py")},
        {"id": "b", "transport": "i2c", "firmware": prog("i2c_irq.py")},
        {"id": "c", "transport": "usb", "firmware": "tutorial"},
    ]
    with start_fleet(devices, str(tmp_path)) as fleet:
        pids = [p.pid for p in fleet]
        assert all(p.alive() for p in fleet)
        assert fleet["a"].endpoint.startswith("/dev/pts/")
        assert fleet["b"].endpoint.endswith("0x43.sock")
        assert fleet["c"].endpoint.startswith("/dev/pts/")
        summary = json.load(open(fleet.write_summary()))
        assert set(summary["devices"]) == {"a", "b", "c"}
    assert all(pid_gone(pid) for pid in pids)
    with pytest.raises(ValueError):
        start_fleet([{"id": "x", "transport": "i2c"}, {"id": "y", "transport": "i2c"}],
                    str(tmp_path / "dup"))


# --- TCP, reset -----------------------------------------------------------------

def test_tcp_server_is_remapped_to_loopback(fleet_of):
    fleet = fleet_of([{"id": "n1", "transport": "tcp", "firmware": prog("tcp_server.py")}])
    pico = fleet["n1"]
    host, port = pico.endpoint
    assert host == "127.0.0.1" and port != 8080

    def cmd(word):
        with socket.create_connection((host, port), timeout=2) as c:
            c.sendall(word + b"\n")
            return c.makefile("rb").readline()

    assert cmd(b"on") == b"on\n"
    assert pico.led == "on"
    assert cmd(b"?") == b"on\n"
    assert cmd(b"off") == b"off\n"


def _skip_first_boot_line(s):
    # The power-on line may come after the port was opened (pyserial's open flushes input).
    line = s.readline()
    return s.readline() if line == b"boot cause=1\n" else line


def test_machine_reset_keeps_endpoints(fleet_of):
    fleet = fleet_of([{"id": "x1", "transport": "uart", "firmware": prog("reset_me.py")}])
    pico = fleet["x1"]
    path = pico.endpoint
    with serial.Serial(path, 115200, timeout=2) as s:
        s.write(b"led\n")
        assert _skip_first_boot_line(s) == b"led on\n"
        pico.wait_led("on", 2)
        s.write(b"reset\n")
        assert s.readline() == b"boot cause=3\n"      # rp2 resets via the watchdog
        pico.wait_led("off", 2)                         # a reset turns the LED off
        s.write(b"wdt\n")
        assert s.readline() == b"boot cause=3\n"
    assert pico.endpoint == path and pico.state()["pid"] == pico.pid and pico.alive()


def test_mpremote_interrupts_a_running_usb_program(fleet_of):
    fleet = fleet_of([{"id": "s2", "transport": "usb", "firmware": prog("usb_echo.py")}])
    pico = fleet["s2"]
    out = subprocess.run([sys.executable, "-m", "mpremote", "connect", pico.endpoint, "exec",
                          "import machine; print(len(machine.unique_id()))"],
                         check=True, timeout=30, capture_output=True).stdout  # (30: a loaded machine)
    assert out.strip() == b"8"
    pico.wait_for(lambda st: st.get("firmware", "").startswith("crashed: KeyboardInterrupt"), 5,
                  "the program stopped by mpremote's Ctrl-C")


def test_reset_pin_restarts_in_place(fleet_of):
    fleet = fleet_of([{"id": "x2", "transport": "uart", "firmware": prog("reset_me.py")}])
    pico = fleet["x2"]
    path = pico.endpoint
    with serial.Serial(path, 115200, timeout=2) as s:
        s.write(b"led\n")
        assert _skip_first_boot_line(s) == b"led on\n"
        pico.wait_led("on", 2)
        pico.reset()                                    # the RUN pin
        assert s.readline() == b"boot cause=1\n"        # PWRON_RESET, as rp2 reports RUN
        pico.wait_led("off", 2)
        pico.reset()
        pico.reset()                                    # a press during the boot does not kill the Pico
        assert s.readline() == b"boot cause=1\n"
    assert pico.endpoint == path and pico.state()["pid"] == pico.pid and pico.alive()


def test_board_filesystem_soft_reset_and_flashed_config(fleet_of, tmp_path):
    """mpremote writes land in the Pico's own fs (its "/"), never in our cwd; a soft reset
    runs the main.py found there, which imports the config.py found there."""
    fleet = fleet_of([{"id": "b1", "transport": "usb", "firmware": "stock",
                       "config": {"DEVICE": "from-fleet"}}])
    pico = fleet["b1"]
    fs = pico.fs
    assert os.listdir(fs) == [] and pico.state()["firmware"] == "none"
    main_py = tmp_path / "main.py"
    main_py.write_text("import config\nprint('main runs as', config.DEVICE)\n")
    cfg_py = tmp_path / "config.py"
    cfg_py.write_text('DEVICE = "flashed"\n')
    mp = [sys.executable, "-m", "mpremote", "connect", pico.endpoint]
    subprocess.run(mp + ["fs", "cp", str(main_py), ":/main.py", "+", "fs", "cp", str(cfg_py), ":config.py",
                         "+", "fs", "mkdir", ":/lib", "+",
                         "exec", "open('/lib/x.txt', 'w').write('hi'); open('rel.txt', 'w').write('r')"],
                   check=True, timeout=20, capture_output=True)
    assert sorted(os.listdir(fs)) == ["config.py", "lib", "main.py", "rel.txt"]
    assert open(os.path.join(fs, "lib", "x.txt")).read() == "hi"
    assert not os.path.exists(os.path.join(REPO_ROOT, "rel.txt"))   # the runner's cwd before
    out = subprocess.run(mp + ["fs", "ls", ":/", "+", "exec",
                               "import os; print(os.getcwd(), os.stat('/main.py')[6], sorted(os.listdir('/lib')))",
                               "+", "fs", "cat", ":/nope.py"],
                         timeout=20, capture_output=True)
    text = out.stdout.decode()
    assert "main.py" in text and "lib/" in text, text
    assert f"/ {len(main_py.read_bytes())} ['x.txt']" in text, text
    assert out.returncode != 0 and b"No such file" in out.stderr + out.stdout   # ENOENT, as mpremote maps it
    with serial.Serial(pico.endpoint, 115200, timeout=0.2) as s:
        s.write(b"\x03\x02")          # interrupt, friendly REPL
        s.reset_input_buffer()
        s.write(b"\x04")              # Ctrl-D: soft reset, main.py runs
        got = b""
        deadline = time.monotonic() + 5
        while b"main runs as flashed" not in got and time.monotonic() < deadline:
            got += s.read(256)
        assert b"main runs as flashed" in got, got
    pico.wait_for(lambda st: st.get("firmware") == "ended", 5, "main.py ended")


def test_sockets_connect_to_loopback_only():
    s = patches.MpSocket()
    try:
        with pytest.raises(OSError) as e:
            s.connect(("192.0.2.1", 1883))   # e.g. a flashed config's real broker: never tried
        assert e.value.errno == errno.EHOSTUNREACH
    finally:
        s.close()
