"""``pico-gateway simulate``: virtual Picos from the command line.

    simulate --config FILE [--workdir DIR] [--broker HOST:PORT]
        one virtual Pico per [[devices]] entry of a gateway config; writes
        <workdir>/fleet.json (endpoints) and <workdir>/gateway.sim.toml (the
        same config with every device pointed at its virtual Pico, as its link's
        ``Simulation.point`` says: uart/usb ``port`` = pty, i2c ``bus`` = the
        simulated bus directory, tcp ``host``/``port`` = the virtual Pico's
        server), then runs until Ctrl-C.
    simulate --firmware PATH|picogw|tutorial --transport uart [--id ID] ...
        one virtual Pico.
    --runtime micropython runs the firmware on the real MicroPython VM
        (gateway.simulator.vm; every link but wifi so far) instead of CPython.

``main_simulate(argv, load_devices=None)``: ``load_devices(path)`` may
return the device dicts (e.g. from the gateway's validated config); by
default the TOML is read with tomllib and its ``devices`` list is used as is.
"""

import argparse
import os
import signal
import sys
import tempfile
import threading

from gateway.simulator.fleet import start_fleet, transports


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"{}"'.format(v.replace("\\", "\\\\").replace('"', '\\"'))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(data):
    """Minimal TOML writer: scalars, tables of scalars, arrays of tables."""
    lines = []
    tables, arrays = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in tables:
        lines += ["", f"[{k}]"] + [f"{a} = {_toml_value(b)}" for a, b in v.items() if b is not None]
    for k, items in arrays:
        for item in items:
            lines += ["", f"[[{k}]]"] + [f"{a} = {_toml_value(b)}"
                                           for a, b in item.items() if b is not None]
    return "\n".join(lines) + "\n"


def simulated_config(data, fleet):
    """The gateway config ``data`` with each device aimed at its virtual Pico."""
    out = dict(data)
    mqtt = dict(out.get("mqtt") or {})
    mqtt["host"], mqtt["port"] = fleet.broker[0], int(fleet.broker[1])
    out["mqtt"] = mqtt
    devices = []
    for d in data.get("devices") or []:
        d = dict(d)
        p = fleet.picos.get(d.get("id"))
        if p is not None:
            d = p.simulation.point(d, p.endpoint)
        devices.append(d)
    out["devices"] = devices
    return out


def _plugins_from(data, folder):
    """``data`` with the plugins it names loaded (their links can then be simulated too), and
    its plugin files named by absolute paths: gateway.sim.toml is written in another folder."""
    from pathlib import Path

    from gateway.links import PluginError, load_plugin, plugin_file

    names = data.get("plugins")
    if not isinstance(names, list):
        return data
    resolved = []
    for name in names:
        if isinstance(name, str):
            try:
                load_plugin(name, Path(folder))
            except PluginError as exc:
                raise SystemExit(f"simulate: plugins: {exc}") from None
            path = plugin_file(name, Path(folder))
            resolved.append(str(path.resolve()) if path is not None else name)
    return {**data, "plugins": resolved}


def _parse_broker(s):
    host, _, port = s.rpartition(":")
    if not host:
        host, port = s, "1883"
    return host, int(port)


def main_simulate(argv, load_devices=None):
    p = argparse.ArgumentParser(prog="pico-gateway simulate",
                                description="Run virtual Picos (MicroPython firmware on this host).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="gateway TOML: a virtual Pico for every device")
    src.add_argument("--firmware", help="picogw, tutorial, or a firmware dir / .py file")
    p.add_argument("--transport", choices=transports(), default="uart")
    p.add_argument("--id", default="pico", help="device id (with --firmware)")
    p.add_argument("--read-interval", type=float, default=5.0)
    p.add_argument("--broker", help="HOST:PORT of the MQTT broker for Wi-Fi Picos "
                   "(default: the config's [mqtt], else 127.0.0.1:1883)")
    p.add_argument("--workdir", help="where state files, logs and ptys' info go")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for start-up")
    p.add_argument("--runtime", choices=("micropython", "cpython"),
                   help="run the firmware on the MicroPython VM (micropython, the default) or on CPython "
                   "with MicroPython's modules imitated (cpython: cheaper per Pico, not faithful)")
    args = p.parse_args(argv)

    data = {}
    if args.config:
        import tomllib
        with open(args.config, "rb") as f:
            data = tomllib.load(f)  # kept as written, for gateway.sim.toml
        data = _plugins_from(data, os.path.dirname(os.path.abspath(args.config)))
        if load_devices is not None:
            devices = [dict(d) for d in load_devices(args.config)]
        else:
            devices = [dict(d) for d in data.get("devices") or []]
        if not devices:
            print(f"simulate: {args.config} has no devices", file=sys.stderr)
            return 2
    else:
        devices = [{"id": args.id, "transport": args.transport, "firmware": args.firmware,
                    "read_interval": args.read_interval}]
    if args.runtime:
        for d in devices:
            d["runtime"] = args.runtime
    if args.broker:
        broker = _parse_broker(args.broker)
    else:
        m = data.get("mqtt") or {}
        broker = (m.get("host", "127.0.0.1"), int(m.get("port", 1883)))
        if broker[0] == "localhost":
            broker = ("127.0.0.1", broker[1])
    workdir = args.workdir or tempfile.mkdtemp(prefix="pico-sim-")

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        fleet = start_fleet(devices, workdir, broker=broker, timeout=args.timeout)
    except (ValueError, RuntimeError, TimeoutError, OSError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 1
    try:
        summary = fleet.write_summary()
        print(f"virtual Picos running (workdir {workdir}):")
        for pico in fleet:
            ep = pico.endpoint
            ep = "{}:{}".format(*ep) if isinstance(ep, tuple) else ep
            print(f"  {pico.id:<16} {pico.transport:<5} {pico.desc.get('firmware', 'picogw'):<9} {ep}")
        if fleet.i2c_bus_dir and os.listdir(fleet.i2c_bus_dir):  # (a target's socket is there)
            print(f"  i2c bus: {fleet.i2c_bus_dir}")
        print(f"endpoints: {summary}")
        if data:
            path = os.path.join(workdir, "gateway.sim.toml")
            with open(path, "w") as out:
                out.write(dump_toml(simulated_config(data, fleet)))
            print(f"gateway config for these Picos: {path}")
            print(f"  run it with: pico-gateway run --config {path}")
        print("Ctrl-C stops them.", flush=True)
        while not stop.wait(0.5):
            dead = [p for p in fleet if not p.alive()]
            if dead:
                for d in dead:
                    print(f"virtual Pico {d.id} exited ({d.proc.returncode}); log {d.log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        fleet.stop()
        for s, h in old.items():
            signal.signal(s, h)


def main():
    return main_simulate(sys.argv[1:])
