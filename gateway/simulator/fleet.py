"""Start and stop a fleet of virtual Picos, one process per device.

    from gateway.simulator.fleet import start_fleet
    with start_fleet(devices, workdir, broker=("127.0.0.1", 1883)) as fleet:
        fleet["greenhouse"].endpoint     # "/dev/pts/7"
        fleet["greenhouse"].led          # "off"

A device description is a plain dict:

=================  ===========================================================
key                meaning
=================  ===========================================================
``id``             device id (required)
``transport``      ``uart`` | ``usb`` | ``i2c`` | ``wifi`` | ``tcp`` (required)
``firmware``       ``picogw`` (default: ``pico/``), ``tutorial``
                   (the tutorial's program for the link, verbatim, from
                   ``pico/tutorial/``; usb: stock
                   MicroPython, a REPL for mpremote; wifi has none), ``stock``
                   (usb only: MicroPython with an empty fs), or a path;
                   copied to the Pico's fs (``VirtualPico.fs``) at start
``protocol``       accepted as a synonym of ``firmware`` (gateway config key)
``read_interval``  seconds between readings (also ``poll_interval``); 5.0
``address``        I2C address (default 0x43)
``baudrate``       UART speed (default 115200)
``base``           MQTT base topic of a Wi-Fi Pico (default ``pico``)
``sim``            knobs for the sidecar JSON (see gateway.simulator.runtime),
                   e.g. ``{"temp_c": 30.0}``; change later with set_sim()
``config``         extra entries merged into the generated config.py
``runtime``        ``micropython`` (default: the real MicroPython VM, see
                   gateway.simulator.vm) or ``cpython`` (MicroPython's modules
                   imitated on CPython: cheaper, not faithful)
=================  ===========================================================

Endpoints (``VirtualPico.endpoint``): uart/usb: the pty path for pyserial or
mpremote; i2c: the target's socket (``fleet.i2c_bus_dir`` is the bus, give it
to ``SimulatedSMBus``); tcp: ``(host, port)``; wifi: the broker ``(host, port)``.

``VirtualPico.fs`` is the board's filesystem (``/``): what it runs at boot
(``main.py``, ``config.py``) and what mpremote/``pico-gateway flash`` write.
``VirtualPico.reset()`` pulls its RUN pin: the firmware starts again from
the fs, keeping its pty paths and sockets.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from gateway.firmware import firmware_dir
from gateway.simulator import vm
from gateway.simulator.config_py import render_config_py

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
PICO_DIR = str(firmware_dir())
TRANSPORTS = ("uart", "usb", "i2c", "wifi", "tcp")
#: The tutorial's program for each link (usb: stock MicroPython, driven with mpremote).
TUTORIAL_PROGRAMS = {"uart": "uart_main.py", "i2c": "i2c_main.py", "tcp": "wifi_tcp_main.py"}
READY_KEY = {"uart": "uart", "usb": "usb", "i2c": "i2c_socket", "tcp": "tcp", "wifi": "mqtt"}


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_firmware(firmware, transport, pico_dir=PICO_DIR):
    """Path of the firmware for a device, or None for stock MicroPython."""
    firmware = firmware or "picogw"
    if firmware == "stock":
        if transport != "usb":
            raise ValueError("stock MicroPython (a bare REPL) needs a usb Pico")
        return None
    if firmware == "picogw":
        return pico_dir
    if firmware == "tutorial":
        if transport == "usb":
            return None
        if transport == "wifi":
            raise ValueError("the tutorial has no wifi program")
        return os.path.join(pico_dir, "tutorial", TUTORIAL_PROGRAMS[transport])
    return os.path.abspath(firmware)


class VirtualPico:
    def __init__(self, desc, dirpath, proc, log_path, sim_path, broker):
        self.desc = desc
        self.id = desc["id"]
        self.transport = desc["transport"]
        self.dir = dirpath
        self.proc = proc
        self.log_path = log_path
        self.sim_path = sim_path
        self.state_path = os.path.join(dirpath, "pico.json")
        self.fs = os.path.join(dirpath, "fs")
        self.broker = broker

    @property
    def pid(self):
        return self.proc.pid

    def state(self):
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    @property
    def endpoint(self):
        st = self.state()
        if self.transport == "wifi":
            return tuple(self.broker)
        v = st.get(READY_KEY[self.transport])
        return tuple(v) if isinstance(v, list) else v

    @property
    def led(self):
        return self.state().get("led")

    def alive(self):
        return self.proc.poll() is None

    def rss_kb(self):
        """The Pico process's resident memory (kB), or None once it is gone."""
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def set_sim(self, **knobs):
        """Change simulation knobs of the running Pico (e.g. temp_c=30)."""
        try:
            with open(self.sim_path) as f:
                cur = json.load(f)
        except (OSError, ValueError):
            cur = {}
        cur.update(knobs)
        tmp = self.sim_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cur, f)
        os.replace(tmp, self.sim_path)

    def wait_for(self, predicate, timeout=5.0, what="condition", cancel=None):
        """Wait until ``predicate(state)``; TimeoutError, or Cancelled once the
        ``cancel`` event (if any) is set."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if predicate(st):
                return st
            if cancel is not None and cancel.is_set():
                raise Cancelled("virtual Pico %s: cancelled waiting for %s" % (self.id, what))
            if not self.alive():
                raise RuntimeError("virtual Pico %s exited (%s) waiting for %s:\n%s"
                                   % (self.id, self.proc.returncode, what, self.log()[-3000:]))
            if time.monotonic() >= deadline:
                raise TimeoutError("virtual Pico %s: no %s within %.1fs; state %r\n%s"
                                   % (self.id, what, timeout, st, self.log()[-3000:]))
            time.sleep(0.02)

    def wait_ready(self, timeout=10.0, cancel=None):
        key = READY_KEY[self.transport]
        want = "connected" if key == "mqtt" else None
        return self.wait_for(lambda st: st.get(key) is not None and (want is None or st.get(key) == want),
                             timeout, "%s endpoint" % key, cancel)

    def wait_led(self, state, timeout=5.0):
        return self.wait_for(lambda st: st.get("led") == state, timeout, "LED %s" % state)

    def reset(self):
        """Pull the RUN pin low: the Pico restarts (boot.py, main.py from its
        fs) in place, same pid, pty paths and sockets; LED off.  Returns at
        once; wait for what the firmware does after a boot (e.g. its hello)."""
        if self.proc.poll() is not None:
            raise RuntimeError("virtual Pico %s is not running" % self.id)
        os.kill(self.proc.pid, signal.SIGUSR1)

    def terminate(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self):
        """SIGKILL (a yanked power cable: no goodbye on any link)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


class Fleet:
    def __init__(self, workdir, broker, i2c_bus_dir):
        self.workdir = workdir
        self.broker = broker
        self.i2c_bus_dir = i2c_bus_dir
        self.picos = {}

    def __getitem__(self, device_id):
        return self.picos[device_id]

    def __iter__(self):
        return iter(self.picos.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def endpoints(self):
        return {p.id: {"transport": p.transport, "endpoint": p.endpoint, "pid": p.pid,
                       "state": p.state_path, "log": p.log_path,
                       "runtime": p.desc.get("runtime", vm.DEFAULT_RUNTIME), "rss_kb": p.rss_kb()}
                for p in self}

    def write_summary(self, path=None):
        path = path or os.path.join(self.workdir, "fleet.json")
        data = {"i2c_bus_dir": self.i2c_bus_dir, "broker": list(self.broker),
                "devices": self.endpoints()}
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        return path

    def stop(self, timeout=3.0):
        for p in self.picos.values():
            p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.picos.values():
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
            # anything the Pico started in its process group goes too
            try:
                os.killpg(p.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.proc.wait()


def _config_values(desc, broker, tcp_port):
    transport = desc["transport"]
    interval = desc.get("read_interval", desc.get("poll_interval", 5.0))
    values = {
        "DEVICE": desc["id"],
        "LINK": transport,
        "READ_INTERVAL": float(interval),
        "UART": {"id": 0, "baudrate": int(desc.get("baudrate", 115200)), "tx": 0, "rx": 1},
        "I2C": {"id": 0, "addr": int(desc.get("address", 0x43)), "sda": 4, "scl": 5},
        "WIFI": {"ssid": "simulated-ap", "password": "simulated", "broker": broker[0],
                 "port": int(broker[1]), "base": desc.get("base", "pico"),
                 "user": desc.get("mqtt_user"), "mqtt_password": desc.get("mqtt_password"),
                 "client_id": desc.get("client_id")},
        "TCP": {"host": "127.0.0.1", "port": tcp_port or 8080},
    }
    values.update(desc.get("config") or {})
    return values


class Cancelled(Exception):
    """A wait ended early: its ``cancel`` event was set (a Ctrl-C, say)."""


def start_fleet(devices, workdir, broker=("127.0.0.1", 1883), timeout=10.0,
                python=None, pico_dir=PICO_DIR, cancel=None):
    """Start one virtual Pico per device dict; return once all are ready.
    Once the ``cancel`` event (if any) is set, the Picos started so far are
    stopped and Cancelled is raised, at once instead of after ``timeout``."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    bus_dir = os.path.join(workdir, "i2c-bus")
    os.makedirs(bus_dir, exist_ok=True)
    fleet = Fleet(workdir, tuple(broker), bus_dir)
    seen_ids, seen_addr = set(), set()
    for desc in devices:
        if desc.get("transport") not in TRANSPORTS:
            raise ValueError("device %r: transport must be one of %s"
                             % (desc.get("id"), "|".join(TRANSPORTS)))
        if desc["id"] in seen_ids:
            raise ValueError("device %r listed twice" % desc["id"])
        seen_ids.add(desc["id"])
        if desc["transport"] == "i2c":
            addr = int(desc.get("address", 0x43))
            if desc.get("firmware", desc.get("protocol")) == "tutorial" and addr != 0x43:
                raise ValueError("device %r: the tutorial's i2c_main.py answers at 0x43, not 0x%02x "
                                 "(give this device address 0x43, or run an edited copy with --firmware)"
                                 % (desc["id"], addr))
            if addr in seen_addr:
                raise ValueError("device %r: I2C address 0x%02x already used" % (desc["id"], addr))
            seen_addr.add(addr)
        runtime = desc.get("runtime", vm.DEFAULT_RUNTIME)
        if runtime not in vm.RUNTIMES:
            raise ValueError("device %r: runtime must be cpython|micropython" % desc["id"])
        if runtime == "micropython" and desc["transport"] not in vm.TRANSPORTS:
            raise ValueError("device %r: the MicroPython runtime runs %s Picos, not %s"
                             % (desc["id"], "/".join(vm.TRANSPORTS), desc["transport"]))
        if runtime == "micropython" and vm.missing():
            raise ValueError("device %r: %s" % (desc["id"], vm.missing()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    try:
        for desc in devices:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled starting virtual Picos")
            desc = dict(desc)
            desc.setdefault("firmware", desc.get("protocol", "picogw"))
            transport = desc["transport"]
            fw = resolve_firmware(desc["firmware"], transport, pico_dir)
            d = os.path.join(workdir, desc["id"])
            os.makedirs(d, exist_ok=True)
            for stale in ("pico.json",):
                try:
                    os.unlink(os.path.join(d, stale))
                except FileNotFoundError:
                    pass
            shutil.rmtree(os.path.join(d, "fs"), ignore_errors=True)   # a fresh board
            tcp_port = free_port() if transport == "tcp" else None
            cfg_path = os.path.join(d, "config.py")
            with open(cfg_path, "w") as f:
                f.write(render_config_py(_config_values(desc, broker, tcp_port)))
            sim = dict(desc.get("sim") or {})
            if tcp_port:
                sim.setdefault("tcp_port_map", "8080=%d" % tcp_port)
            sim_path = os.path.join(d, "sim.json")
            with open(sim_path, "w") as f:
                json.dump(sim, f)
            cmd = [python or sys.executable, "-m", "gateway.simulator.pico",
                   "--config-py", cfg_path, "--state-dir", d, "--i2c-bus", bus_dir,
                   "--sim-json", sim_path, "--device", desc["id"], "--fs", os.path.join(d, "fs")]
            cmd += ["--runtime", desc.get("runtime", vm.DEFAULT_RUNTIME)]
            if fw is not None:
                cmd += ["--firmware", fw]
            else:
                cmd += ["--usb"]
            log_path = os.path.join(d, "pico.log")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                        start_new_session=True)
            fleet.picos[desc["id"]] = VirtualPico(desc, d, proc, log_path, sim_path, tuple(broker))
        for p in fleet:
            p.wait_ready(timeout, cancel)
    except BaseException:
        fleet.stop()
        raise
    return fleet
