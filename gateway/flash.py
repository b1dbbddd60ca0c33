"""``pico-gateway flash``: put our firmware and a generated config.py on a Pico.

    pico-gateway flash --config gateway.toml --device greenhouse --port /dev/serial/by-id/usb-MicroPython_...
    pico-gateway flash --config gateway.toml --device balcony --port /dev/ttyACM0 --wifi-secrets ~/wifi.toml

Steps, each reported on one line:

1. copy every ``pico/*.py`` (not ``pico/tutorial/``, not ``config_example.py``)
   and a ``config.py`` generated for the device (gateway.simulator.config_py),
   each checked afterwards by its SHA-256 computed on the board;
2. Wi-Fi Picos: ``mpremote mip install umqtt.simple`` (this machine needs
   internet access: mpremote downloads the package and copies it over USB);
   skipped, with a message, under ``--no-mip``;
3. soft reset, so the board runs the new main.py; for uart and usb devices, wait
   for its ``$H`` hello frame (usb: on the same port; uart: on the device's UART
   port, e.g. /dev/serial0) and check the device id in it.

It talks to the board through mpremote's SerialTransport used as a library,
not through the ``mpremote`` console script: one raw-REPL session carries every
file (the script would reconnect, and soft-reset, per command), the generated
config.py with its Wi-Fi password goes from memory to the board without a
temporary file on the Pi, and errors arrive as exceptions this command can
explain. Only ``mip install`` runs the console script, because mip's logic
(index lookup, download, dependencies) lives there.

The USB port: ``--port``, else the device's ``port`` when its transport is
``usb``. Wi-Fi SSID/password (and the broker the Pico should use) come from a
TOML file given with ``--wifi-secrets``, never from the repository::

    ssid = "my-network"
    password = "..."
    broker = "192.168.1.2"      # default: mqtt.host of the config, unless that is localhost
    port = 1883                 # default: mqtt.port
    user = "pico"               # optional broker credentials
    mqtt_password = "..."
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, load_config_or_report
from gateway.firmware import firmware_dir
from gateway.links import LINKS
from gateway.links.base import DeviceConfig

PICO_DIR = firmware_dir()
SKIP = {"config_example.py", "config.py"}
CHUNK = 256  # bytes per raw-REPL write, as mpremote's own fs commands use
HELLO_TIMEOUT = 15.0
READ_TIMEOUT = 10.0  # seconds any one read from the board may wait: a board gone silent fails the flash, not hangs it
# Seconds the board has to stop its program and enter the raw REPL. A program that turned
# Ctrl-C off (micropython.kbd_intr(-1)) and keeps printing would otherwise hold the flash for
# ever: every read returns something, so no read timeout ends it.
RAW_REPL_TIMEOUT = 15.0

Out = Callable[[str], None]


class FlashError(Exception):
    """Flashing cannot go on; the message says why and what to do."""


def firmware_files(pico_dir: Path = PICO_DIR) -> list[Path]:
    files = sorted(p for p in pico_dir.glob("*.py") if p.name not in SKIP)
    if not (pico_dir / "main.py").is_file() or not files:
        raise FlashError(f"no firmware at {pico_dir} (main.py and its modules): run flash from a clone of pico-gateway")
    return files


def load_secrets(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FlashError(f"cannot read the Wi-Fi secrets file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FlashError(f"{path}: not valid TOML: {exc}") from None
    allowed = {"ssid", "password", "broker", "port", "user", "mqtt_password"}
    unknown = set(data) - allowed
    if unknown:
        raise FlashError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(allowed))}")
    if not isinstance(data.get("ssid"), str) or not data["ssid"]:
        raise FlashError(f"{path}: 'ssid' (the Wi-Fi network's name) is missing")
    if not isinstance(data.get("password", ""), str):
        raise FlashError(f"{path}: 'password' must be a string")
    return data


def config_values(config: GatewayConfig, device: DeviceConfig, secrets: dict[str, Any] | None) -> dict[str, Any]:
    """The values of the board's config.py (gateway.simulator.config_py's format)."""
    link = LINKS[device.transport]
    if link.firmware is None:
        raise FlashError(f"device {device.id!r} is on {device.transport}: our firmware has no link for it")
    values: dict[str, Any] = {"DEVICE": device.id, "LINK": link.firmware}  # (a transport may run another's)
    interval = getattr(device, "poll_interval", None) or getattr(device, "read_interval", None)
    if interval:
        values["READ_INTERVAL"] = float(interval)
    values.update(link.config_py(device))
    if link.needs_wifi:
        if secrets is None:
            raise FlashError(f"device {device.id!r} is a Pico W ({device.transport}): give its Wi-Fi network with "
                             "--wifi-secrets FILE (TOML: ssid, password; for wifi also broker)")
        wifi: dict[str, Any] = {"ssid": secrets["ssid"], "password": secrets.get("password", "")}
        if link.publishes_itself:  # to the broker
            broker = secrets.get("broker") or config.mqtt.host
            if broker in ("localhost", "127.0.0.1", "::1") or broker.startswith("127."):
                raise FlashError(f"the Pico cannot reach the broker at {broker!r} (that is the Pi itself): set "
                                 "broker = \"<the Pi's address>\" in the Wi-Fi secrets file")
            wifi.update({"broker": broker, "port": int(secrets.get("port") or config.mqtt.port),
                         "base": config.mqtt.base_topic, "user": secrets.get("user"),
                         "mqtt_password": secrets.get("mqtt_password")})
        values["WIFI"] = wifi
    return values


def _sha256_on_board(transport: Any, name: str) -> str:
    code = (f"import hashlib, binascii\nh = hashlib.sha256()\nf = open({name!r}, 'rb')\n"
            "while True:\n b = f.read(512)\n if not b:\n  break\n h.update(b)\nf.close()\n"
            "print(binascii.hexlify(h.digest()).decode())")
    return transport.exec(code).decode().strip()


def copy_files(port: str, files: dict[str, bytes], out: Out) -> None:
    """Write ``files`` (name -> content) to the board's root through the raw REPL and check each."""
    from mpremote.transport import TransportError  # type: ignore[import-untyped]  # mpremote ships no types
    from mpremote.transport_serial import SerialTransport  # type: ignore[import-untyped]  # (as above)

    try:
        transport = SerialTransport(port, baudrate=115200)
    except (TransportError, OSError) as exc:
        raise no_such_port(port) or FlashError(
            f"cannot open {port}: {exc} (is the gateway or another mpremote using it? "
            "stop it first: sudo systemctl stop pico-gateway)") from None
    import threading

    from gateway.links.usb import BoundedPort, Stopping

    # mpremote reads its port without a timeout: a board that stops answering would hang
    # the flash for ever (a TransportError instead, below).
    too_long = threading.Event()
    transport.serial = BoundedPort(transport.serial, READ_TIMEOUT, too_long)
    try:
        # a soft reset stops whatever program runs, with a clean heap for the copy
        deadline = threading.Timer(RAW_REPL_TIMEOUT, too_long.set)
        deadline.daemon = True
        deadline.start()
        try:
            transport.enter_raw_repl(soft_reset=True)
        except Stopping:
            raise FlashError(f"the board on {port} keeps running its program: it did not stop for Ctrl-C within "
                             f"{RAW_REPL_TIMEOUT:.0f} s (a program may turn Ctrl-C off with micropython.kbd_intr(-1)). "
                             "Unplug it, hold BOOTSEL while plugging it in, copy MicroPython's UF2 to the "
                             "drive that appears, then flash again") from None
        finally:
            deadline.cancel()
            too_long.clear()
        for name, data in files.items():
            transport.fs_writefile(name, data, chunk_size=CHUNK)
            if _sha256_on_board(transport, name) != hashlib.sha256(data).hexdigest():
                raise FlashError(f"{name} on the board differs from what was sent: try again, or another cable")
            out(f"  wrote {name} ({len(data)} bytes, checked)")
        transport.exit_raw_repl()
    except TransportError as exc:
        raise FlashError(f"the board on {port} did not take the files: {exc}") from None
    finally:
        transport.close()


def serial_ports() -> list[str]:
    """The serial ports of this machine, each with what it is, then their stable names
    (/dev/serial/by-id/, what a config should use) with the port each points to."""
    from serial.tools.list_ports import comports

    found = [p.device + (f" ({p.description})" if p.description and p.description != "n/a" else "")
             for p in sorted(comports(), key=lambda p: p.device)]
    by_id = Path("/dev/serial/by-id")
    if by_id.is_dir():
        found += [f"{link} (-> {link.resolve()})" for link in sorted(by_id.iterdir())]
    return found


def no_such_port(port: str) -> FlashError | None:
    """The error for a port that does not exist, naming those that do; None when it exists."""
    if os.path.exists(port):
        return None
    ports = serial_ports()
    there = ("serial ports here: " + ", ".join(ports)) if ports else "this machine has no serial port at all"
    return FlashError(f"{port} does not exist; {there}. Is the Pico plugged in, with a data cable (not a "
                      "charging-only one)? A Pico in BOOTSEL mode is a USB drive, not a port: copy MicroPython's "
                      "UF2 onto it first")


def mip_install(port: str, out: Out, package: str = "umqtt.simple") -> None:
    cmd = [sys.executable, "-m", "mpremote", "connect", port, "mip", "install", package]
    out(f"  {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise FlashError(f"mip install {package} failed (it needs internet access on this machine):\n"
                         + (result.stderr or result.stdout).strip()[-1500:])


def _open_serial(port: str, baudrate: int) -> Any:
    import serial

    try:
        return serial.Serial(port, baudrate=baudrate, timeout=0.1, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        raise no_such_port(port) or FlashError(
            f"cannot open {port} to listen for the hello: {exc} (the gateway may hold it; "
            "stop it while flashing)") from None


def reset_and_wait_hello(usb_port: str, device: DeviceConfig, check_hello: bool,
                         timeout: float = HELLO_TIMEOUT) -> str | None:
    """Soft-reset through the USB REPL (main.py runs); return the hello line when asked to wait for it."""
    from gateway.protocols.picogw import FrameError, decode

    usb = _open_serial(usb_port, 115200)
    listen = usb
    try:
        if check_hello and LINKS[device.transport].hello_on == "own port":
            listen = _open_serial(device.port, int(getattr(device, "baudrate", 115200)))  # type: ignore[attr-defined]
            listen.reset_input_buffer()
        # interrupt, leave the raw REPL, then Ctrl-D at the friendly REPL: a soft reset that runs main.py
        usb.write(b"\r\x03\x03")
        time.sleep(0.1)
        usb.write(b"\x02")
        time.sleep(0.1)
        usb.reset_input_buffer()
        usb.write(b"\x04")
        if not check_hello:
            return None
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            buf += listen.read(256)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    frame = decode(line)
                except FrameError:
                    continue
                if frame.type != "H":
                    continue
                dev = frame.get("dev") or ""
                if not device.id.startswith(dev) or not dev:
                    raise FlashError(f"the board says it is {dev!r}, not {device.id!r}: config.py was not taken?")
                return line[line.rfind(b"$"):].decode("ascii", "replace").strip()
        raise FlashError(f"no hello from {device.id} on {listen.port} within {timeout:g} s after the reset; "
                         f"see what it prints: mpremote connect {usb_port} repl")
    finally:
        if listen is not usb:
            listen.close()
        usb.close()


def flash(config: GatewayConfig, device_id: str, port: str | None = None, wifi_secrets: str | None = None,
          no_mip: bool = False, check_hello: bool = True, pico_dir: Path = PICO_DIR,
          hello_timeout: float = HELLO_TIMEOUT, out: Out = print) -> int:
    device = config.device(device_id)
    if device is None:
        ids = ", ".join(d.id for d in config.devices) or "none"
        raise FlashError(f"unknown device {device_id!r} (devices in the config: {ids})")
    if device.protocol != "picogw":
        raise FlashError(f"device {device_id!r} has protocol = \"tutorial\": it runs the tutorial's program, "
                         "not our firmware; set protocol = \"picogw\" first")
    link = LINKS[device.transport]
    usb_port = port or (getattr(device, "port", None) if link.flashed_over_own_port else None)
    if not usb_port:
        raise FlashError(f"device {device_id!r} is on {device.transport}: give the Pico's USB port with --port "
                         "(ls /dev/serial/by-id/)")
    secrets = load_secrets(wifi_secrets) if wifi_secrets else None
    values = config_values(config, device, secrets)

    from gateway.simulator.config_py import render_config_py

    files = {p.name: p.read_bytes() for p in firmware_files(pico_dir)}
    files["config.py"] = render_config_py(values).encode()
    out(f"1/3 copying {len(files)} files to {device_id} on {usb_port}")
    copy_files(usb_port, files, out)

    if link.publishes_itself:  # through umqtt
        if no_mip:
            out("2/3 skipped: mip install umqtt.simple (--no-mip); the board needs umqtt/simple.py "
                "(mpremote connect PORT mip install umqtt.simple)")
        else:
            out("2/3 installing umqtt.simple with mip")
            mip_install(usb_port, out)
    else:
        out("2/3 nothing to install for a " + device.transport + " Pico")

    wait = check_hello and link.hello_on is not None
    out("3/3 soft reset" + (", waiting for the hello" if wait else ""))
    hello = reset_and_wait_hello(usb_port, device, wait, hello_timeout)
    if hello:
        out(f"  {device_id} says hello: {hello}")
    else:
        out(f"  files are on the board; {device_id} restarted ({device.transport}: watch its status topic)")
    return 0


# -- command line (wired into gateway.cli) ------------------------------------

def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("flash", help="copy our firmware and a generated config.py to a Pico over USB")
    p.add_argument("--config", required=True, help="the TOML config file")
    p.add_argument("--device", required=True, help="the device id to flash")
    p.add_argument("--port", help="the Pico's USB port (default: the device's port when it is a usb device)")
    p.add_argument("--wifi-secrets", help="TOML file with ssid, password (and broker) for wifi/tcp Picos")
    p.add_argument("--no-mip", action="store_true", help="do not run 'mip install umqtt.simple' (needs internet)")
    p.add_argument("--no-hello", action="store_true", help="do not wait for the board's hello after the reset")
    p.set_defaults(func=cmd_flash)


def cmd_flash(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None:
        return 2
    if args.wifi_secrets:
        mode = os.stat(args.wifi_secrets).st_mode if os.path.exists(args.wifi_secrets) else 0
        if mode & 0o004:
            print(f"warning: {args.wifi_secrets} is readable by every user: chmod 600 it", file=sys.stderr)
    try:
        return flash(config, args.device, args.port, args.wifi_secrets, args.no_mip, not args.no_hello)
    except FlashError as exc:
        print(f"pico-gateway flash: {exc}", file=sys.stderr)
        return 1
