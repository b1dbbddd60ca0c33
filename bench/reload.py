"""``systemctl reload``'s cost: from SIGHUP to the ``READY=1`` that ends the reload, and
whether the devices a reload does not touch lose a reading.

    .venv/bin/python bench/reload.py              # 10 rounds, 4 untouched Picos at 50 readings/s
    .venv/bin/python bench/reload.py --rounds 30 --keep 16

The real gateway process against a private mosquitto, Picos speaking picogw on
pseudo-terminals (threads of this process), and a datagram socket in systemd's
place (``NOTIFY_SOCKET``). Each round reloads four times: no change, a device
added, the same device removed, and one device moved to another port (its link
restarted). At the end the untouched devices' sequence numbers in SQLite must be
0 .. n-1, each once. Prints the median and the maximum per kind of reload.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

from gateway.mosquitto import PrivateBroker
from gateway.processes import stop_process
from gateway.protocols.picogw import FrameReceiver, encode

REPO = Path(__file__).resolve().parent.parent
GATEWAY_ID = "reloadbench"


class Peer:
    """A Pico on a pseudo-terminal: answers hello and ping, sends readings from :meth:`pump` on."""

    def __init__(self, device: str, rate: float) -> None:
        self.device, self.rate = device, rate
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.seq = 0
        self.rx = FrameReceiver()
        self._stop = threading.Event()
        self._pumping = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._pump, daemon=True).start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                if not select.select([self.master], [], [], 0.05)[0]:
                    continue
                data = os.read(self.master, 4096)
            except OSError:
                return
            for frame in self.rx.feed(data):
                if frame.type != "C":
                    continue
                key = frame.fields[0][0] if frame.fields else ""
                if key in ("hello", "ping"):
                    os.write(self.master, encode("A", frame.number, []))
                if key == "hello":
                    os.write(self.master, encode("H", self.seq, [("proto", "1"), ("fw", "bench"),
                                                                 ("dev", self.device), ("led", "off")]))
                elif key not in ("hello", "ping"):
                    os.write(self.master, encode("N", frame.number, [("err", "unknown")]))

    def _pump(self) -> None:
        self._pumping.wait()
        period = 1 / self.rate
        while not self._stop.wait(period):
            if self._pumping.is_set():
                os.write(self.master, encode("R", self.seq, [("temp", str(20 + self.seq % 100 / 10))]))
                self.seq += 1

    def pump(self) -> None:
        self._pumping.set()

    def halt(self) -> int:
        self._pumping.clear()
        time.sleep(2 / self.rate)  # (a write in progress ends)
        return self.seq

    def close(self) -> None:
        self._stop.set()
        self._pumping.set()
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass


class Systemd:
    """The NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._recv, daemon=True).start()

    def _recv(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode()))
                self.cond.notify_all()

    def wait_ready(self, after: int, timeout: float = 30) -> tuple[float, str]:
        """The first READY=1 among the messages from index ``after`` on."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, message in self.messages[after:]:
                    if message.startswith("READY=1"):
                        return at, message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no READY=1; got {self.messages[after:]}")
                self.cond.wait(left)


def config_text(broker: PrivateBroker, db: Path, devices: dict[str, str]) -> str:
    lines = [f'gateway_id = "{GATEWAY_ID}"', "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}",
             "[store]", f'path = "{db}"']
    for device, port in devices.items():
        lines += ["[[devices]]", f'id = "{device}"', 'transport = "uart"', f'port = "{port}"']
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--keep", type=int, default=4, help="untouched Picos, reading all along")
    p.add_argument("--rate", type=float, default=50.0, help="readings per second per Pico")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    broker = PrivateBroker(work / "broker")
    broker.start()
    keep = [Peer(f"keep{i:02d}", args.rate) for i in range(args.keep)]
    extra, moved_a, moved_b = Peer("extra", args.rate), Peer("moved", args.rate), Peer("moved", args.rate)
    peers = [*keep, extra, moved_a, moved_b]
    db, config = work / "readings.db", work / "gateway.toml"
    base = {p.device: p.path for p in keep}
    config.write_text(config_text(broker, db, {**base, "moved": moved_a.path}))
    systemd = Systemd(str(work / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(work / "notify")}
    log = open(work / "gateway.log", "ab")
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)], cwd=REPO, env=env,
                          stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    times: dict[str, list[float]] = {"no change": [], "add": [], "remove": [], "change": []}
    try:
        systemd.wait_ready(0)
        for peer in peers:
            peer.pump()
        time.sleep(1)  # (readings flowing before the first reload)
        moved_on = moved_a
        for _ in range(args.rounds):
            for kind in times:
                devices = {**base, "moved": moved_on.path}
                if kind == "add":
                    devices["extra"] = extra.path
                elif kind == "change":
                    moved_on = moved_b if moved_on is moved_a else moved_a
                    devices["moved"] = moved_on.path
                config.write_text(config_text(broker, db, devices))
                mark = len(systemd.messages)
                sent_at = time.monotonic()
                gw.send_signal(signal.SIGHUP)
                at, message = systemd.wait_ready(mark)
                if "reload refused" in message:
                    raise RuntimeError(message)
                times[kind].append(at - sent_at)
                time.sleep(0.2)  # (readings flow between reloads)
        sent = {p.device: p.halt() for p in keep}
        deadline = time.monotonic() + 30
        while True:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                stored = {d: [r[0] for r in conn.execute("SELECT seq FROM readings WHERE device=? ORDER BY seq",
                                                          (d,))] for d in sent}
            if all(len(stored[d]) >= n for d, n in sent.items()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        gaps = {d: n - len(set(stored[d]) & set(range(n))) for d, n in sent.items()}
        duplicates = {d: len(stored[d]) - len(set(stored[d])) for d in sent}
    finally:
        code = stop_process(gw)
        log.close()
        for peer in peers:
            peer.close()
        broker.stop()
    print(f"{args.rounds} rounds, {args.keep} untouched Picos at {args.rate:g} readings/s, gateway exit {code}")
    print(f"{'reload':<10} {'median ms':>10} {'max ms':>8}")
    for kind, values in times.items():
        print(f"{kind:<10} {statistics.median(values) * 1000:>10.1f} {max(values) * 1000:>8.1f}")
    print(f"untouched devices: {sum(sent.values())} readings sent, missing {sum(gaps.values())}, "
          f"duplicated {sum(duplicates.values())}")
    ok = not any(gaps.values()) and not any(duplicates.values())
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"(the gateway's log: {work / 'gateway.log'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
