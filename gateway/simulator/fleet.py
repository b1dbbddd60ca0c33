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
``transport``      a transport of the registry whose link can be simulated
                   (``Link.simulation``, gateway/links/; required)
``firmware``       ``picogw`` (default: ``pico/``), ``tutorial`` (the
                   tutorial's program for the link, verbatim, from ``pico/tutorial/``; usb:
                   stock MicroPython, a REPL for mpremote; wifi has none),
                   ``stock`` (usb only: MicroPython with an empty fs), or a
                   path; copied to the Pico's fs (``VirtualPico.fs``) at start
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

Endpoints (``VirtualPico.endpoint``), as each link's ``Simulation`` says: uart/usb:
the pty path for pyserial or mpremote; i2c: the target's socket
(``fleet.i2c_bus_dir`` is the bus, give it to ``SimulatedSMBus``); tcp:
``(host, port)``; wifi: the broker ``(host, port)``; a link that puts something
in front of its virtual Pico (``Simulation.expose``): what that serves.

``VirtualPico.fs`` is the board's filesystem (``/``): what it runs at boot
(``main.py``, ``config.py``) and what mpremote/``pico-gateway flash`` write.
``VirtualPico.reset()`` pulls its RUN pin: the firmware starts again from
the fs, keeping its pty paths and sockets.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from gateway.firmware import firmware_dir
from gateway.links import LINKS
from gateway.links.simulation import STOCK
from gateway.simulator import vm
from gateway.simulator.config_py import render_config_py

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
PICO_DIR = str(firmware_dir())
SIMULATED_NETWORK = {"ssid": "simulated-ap", "password": "simulated"}  # what a Pico W joins here


def transports():
    """The transports of the registry that have a virtual Pico (``Link.simulation``)."""
    return [name for name, link in LINKS.items() if link.simulation is not None]


def simulation(transport):
    """The link's Simulation; ValueError naming the transports that have one."""
    link = LINKS.get(transport)
    if link is None or link.simulation is None:
        raise ValueError(f"transport must be one of {'|'.join(transports())}")
    return link.simulation


def resolve_firmware(firmware, transport, pico_dir=PICO_DIR):
    """Path of the firmware for a device, or None for stock MicroPython."""
    firmware = firmware or "picogw"
    sim = simulation(transport)
    if firmware == "stock":
        if not sim.stock:
            raise ValueError(f"stock MicroPython (a bare REPL) is of no use on a {transport} Pico")
        return None
    if firmware == "picogw":
        if LINKS[transport].firmware is None:
            raise ValueError(f"our firmware has no link for {transport} Picos: give the firmware's path")
        return pico_dir
    if firmware == "tutorial":
        if sim.tutorial == STOCK:
            return None
        if sim.tutorial is None:
            raise ValueError(f"the tutorial has no {transport} program")
        return os.path.join(pico_dir, "tutorial", sim.tutorial)
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
        self.simulation = simulation(self.transport)
        self.exposed = None  # what the link put in front of the virtual Pico (Simulation.expose), once ready
        self._unexpose = None

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
        if self.exposed is not None:
            return self.exposed
        return self.simulation.endpoint(self.state(), self.broker)

    @property
    def led(self):
        return self.state().get("led")

    def alive(self):
        return self.proc.poll() is None

    def rss_kb(self):
        """The Pico process's resident memory (kB), or None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
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
                raise Cancelled(f"virtual Pico {self.id}: cancelled waiting for {what}")
            if not self.alive():
                raise RuntimeError(f"virtual Pico {self.id} exited ({self.proc.returncode}) waiting for {what}:\n"
                                   f"{self.log()[-3000:]}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"virtual Pico {self.id}: no {what} within {timeout:.1f}s; state {st!r}\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.02)

    def wait_ready(self, timeout=10.0, cancel=None):
        key, want = self.simulation.ready_key, self.simulation.ready_value
        st = self.wait_for(lambda st: st.get(key) is not None and (want is None or st.get(key) == want),
                           timeout, f"{key} endpoint", cancel)
        if self._unexpose is None:
            self.exposed, self._unexpose = self.simulation.expose(self.simulation.endpoint(st, self.broker))
            if self.exposed == self.simulation.endpoint(st, self.broker):
                self.exposed = None  # (nothing in front: the endpoint is read from the state, as it changes)
        return st

    def unexpose(self):
        """Stop what the link put in front of the virtual Pico (nothing, for most links)."""
        stop, self._unexpose = self._unexpose, None
        if stop is not None:
            stop()

    def wait_led(self, state, timeout=5.0):
        return self.wait_for(lambda st: st.get("led") == state, timeout, f"LED {state}")

    def reset(self):
        """Pull the RUN pin low: the Pico restarts (boot.py, main.py from its
        fs) in place, same pid, pty paths and sockets; LED off.  Returns at
        once; wait for what the firmware does after a boot (e.g. its hello)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"virtual Pico {self.id} is not running")
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
            p.unexpose()
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


def _prepare(desc, broker):
    """(the virtual Pico's config.py values, its simulation knobs): what every Pico has,
    what its link adds (``Simulation.prepare``), then the description's own."""
    link = LINKS[desc["transport"]]
    interval = desc.get("read_interval", desc.get("poll_interval", 5.0))
    values = {"DEVICE": desc["id"], "LINK": link.firmware, "READ_INTERVAL": float(interval)}
    if link.needs_wifi:
        values["WIFI"] = dict(SIMULATED_NETWORK)
    extra, knobs = simulation(desc["transport"]).prepare(desc, tuple(broker))
    for key, value in extra.items():
        merged = values.get(key)
        values[key] = {**merged, **value} if isinstance(merged, dict) and isinstance(value, dict) else value
    values.update(desc.get("config") or {})
    sim = dict(knobs)
    sim.update(desc.get("sim") or {})
    return values, sim


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
    seen_ids, claimed = set(), set()
    for desc in devices:
        try:
            sim = simulation(desc.get("transport"))
        except ValueError as exc:
            raise ValueError(f"device {desc.get('id')!r}: {exc}") from None
        if desc["id"] in seen_ids:
            raise ValueError(f"device {desc['id']!r} listed twice")
        seen_ids.add(desc["id"])
        claim = sim.claim(desc)
        if claim is not None:
            if claim in claimed:
                raise ValueError(f"device {desc['id']!r}: {claim[0]} {claim[1]} already used")
            claimed.add(claim)
        runtime = desc.get("runtime", vm.DEFAULT_RUNTIME)
        if runtime not in vm.RUNTIMES:
            raise ValueError(f"device {desc['id']!r}: runtime must be cpython|micropython")
        if runtime == "micropython" and LINKS[desc["transport"]].firmware not in vm.TRANSPORTS:
            raise ValueError(f"device {desc['id']!r}: the MicroPython runtime runs {'/'.join(vm.TRANSPORTS)} Picos "
                             f"only so far, not {desc['transport']}")
        if runtime == "micropython" and vm.missing():
            raise ValueError(f"device {desc['id']!r}: {vm.missing()}")
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
            values, sim = _prepare(desc, broker)
            cfg_path = os.path.join(d, "config.py")
            with open(cfg_path, "w") as f:
                f.write(render_config_py(values))
            sim_path = os.path.join(d, "sim.json")
            with open(sim_path, "w") as f:
                json.dump(sim, f)
            cmd = [python or sys.executable, "-m", "gateway.simulator.pico",
                   "--config-py", cfg_path, "--state-dir", d, "--i2c-bus", bus_dir,
                   "--sim-json", sim_path, "--device", desc["id"], "--fs", os.path.join(d, "fs")]
            cmd += ["--runtime", desc.get("runtime", vm.DEFAULT_RUNTIME)]
            link = LINKS[transport]
            cmd += ["--board", link.board]  # (with --usb, all the Pico needs of the registry)
            if fw is not None:
                cmd += ["--firmware", fw]
            if fw is None or (link.simulation is not None and link.simulation.console):
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
