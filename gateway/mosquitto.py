"""A private mosquitto on a free loopback port, for the demo, the tests and the benchmarks.

    >>> with PrivateBroker(workdir) as broker:
    ...     print(broker.host, broker.port)

Debian's ``mosquitto`` (``apt install mosquitto``; ``./dev`` installs it). It is
started with its own config file in ``workdir`` and never touches the system's.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


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
                 extra_conf: str = "") -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> PrivateBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        f"log_dest stderr\n{self.extra_conf}")
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
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
