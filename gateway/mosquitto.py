"""A private mosquitto on a free loopback port, for the demo, the tests and the benchmarks.

    with PrivateBroker(workdir) as broker:
        print(broker.host, broker.port)

Debian's ``mosquitto`` (``apt install mosquitto``; ``./dev`` installs it). It is
started with its own config file in ``workdir`` and never touches the system's.

Locked down (tests of docs/security.md): ``password_file`` (made with
``mosquitto_passwd``) turns anonymous access off, ``acl_file`` adds an ACL, and
``certfile``/``keyfile`` (with ``cafile`` for client certificates and
``require_certificate``) make the listener TLS.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.processes import stop_process


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if path is None:
        raise FileNotFoundError("mosquitto is not installed: sudo apt install mosquitto mosquitto-clients")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PrivateBroker:
    def __init__(self, workdir: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 extra_conf: str = "", password_file: str | Path | None = None, acl_file: str | Path | None = None,
                 certfile: str | Path | None = None, keyfile: str | Path | None = None,
                 cafile: str | Path | None = None, require_certificate: bool = False) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.extra_conf = extra_conf
        self.password_file = password_file
        self.acl_file = acl_file
        self.tls = {"certfile": certfile, "keyfile": keyfile, "cafile": cafile}
        self.require_certificate = require_certificate
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> PrivateBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}",
                 f"allow_anonymous {'false' if self.password_file else 'true'}", "persistence false",
                 # Debian's default of 1,000 queued QoS 1 messages per client drops messages for a
                 # subscriber that falls behind a burst (a test's, on a loaded machine): no limit here.
                 "max_queued_messages 0",
                 "log_dest stderr"]
        if os.geteuid() == 0:
            # Started as root, mosquitto would become user "mosquitto" and could not read
            # its password, ACL and key files in our (private) work directory.
            lines.append("user root")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        lines += [f"{key} {value}" for key, value in self.tls.items() if value]
        if self.require_certificate:
            lines.append("require_certificate true")
        conf.write_text("\n".join(lines) + "\n" + self.extra_conf)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")
            time.sleep(0.02)
        return self

    def _accepting(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5)
            self.proc = None

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
