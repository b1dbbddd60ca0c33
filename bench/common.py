"""What every measurement shares: the gateway under test, a counting MQTT
subscriber, loss checks, and /proc readings of a process's CPU time and memory.
(The virtual Picos and their feeder are in picos.py.)

The gateway runs as the real ``python -m gateway run --config FILE`` process,
from a source tree given by ``GatewaySource`` (the working tree, or a snapshot
of one git revision, so that edits made while the benchmark runs do not leak
into it).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mosquitto import PrivateBroker
from gateway.processes import stop_process

if TYPE_CHECKING:
    from picos import PeerInfo

REPO = Path(__file__).resolve().parent.parent
METRIC = "seq"  # every reading frame carries one metric whose value is its own sequence number
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the gateway under test -------------------------------------------------------------
class GatewaySource:
    """Where ``python -m gateway`` is imported from: the working tree or a git revision."""

    def __init__(self, rev: str | None, workdir: Path) -> None:
        if rev is None:
            self.root = REPO
            self.commit = _git("rev-parse", "HEAD") + ("+dirty" if _git("status", "--porcelain", "gateway") else "")
        else:
            self.commit = _git("rev-parse", rev)
            self.root = workdir / f"gateway-{self.commit[:12]}"
            self.root.mkdir(parents=True, exist_ok=True)
            # gateway/, and pico/ beside it (the firmware, which gateway/firmware.py looks for there)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", self.commit, "gateway", "pico"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.root)], input=archive, check=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def python(self, code: str) -> str:
        """Run a snippet with this source's ``gateway`` package; its stdout."""
        return subprocess.run([sys.executable, "-c", code], cwd=self.root, env=self.env(),
                              check=True, capture_output=True, text=True).stdout

    def create_store(self, path: Path) -> None:
        """An empty database with exactly this revision's schema."""
        self.python(f"from gateway.store import Store; Store({str(path)!r}).close()")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (the gateway's database writer), from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except FileNotFoundError:  # it (or a thread) just ended
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process (all its threads) and of its child
    processes, live ones and those already waited for, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime (fields 14-17): cu/cs are the children it has waited for
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK
    children = 0.0
    for child in _children(pid):
        try:
            children += cpu_seconds(child)
        except FileNotFoundError:
            pass
    return own + children


def others_cpu(broker: PrivateBroker, *pids: int) -> list[float]:
    """CPU seconds so far of mosquitto, of this process (the bench's subscriber) and of
    ``pids`` (the virtual Picos): what shares the two cores with the process measured."""
    assert broker.proc is not None
    return [cpu_seconds(broker.proc.pid), time.process_time(), *(cpu_seconds(pid) for pid in pids)]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS) in MB, from /proc/<pid>/status, of a process and
    its live child processes added up (peaks added up: an upper bound of the joint peak)."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    texts = [Path(f"/proc/{pid}/status").read_text()]
    for child in _children(pid):
        try:
            texts.append(Path(f"/proc/{child}/status").read_text())
        except FileNotFoundError:
            pass
    for text in texts:
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in out:
                out[key] += int(rest.split()[0]) / 1024
    return out


def rss_threads(pid: int) -> tuple[float, int]:
    """VmRSS in MB and the number of threads of one process, now (/proc/<pid>/status)."""
    rss, threads = 0.0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "VmRSS":
            rss = int(rest.split()[0]) / 1024
        elif key == "Threads":
            threads = int(rest)
    return rss, threads


def descendants(pid: int) -> list[int]:
    """The processes a process started, and theirs, from the parent pids in /proc/*/stat
    (this kernel has no /proc/<pid>/task/<tid>/children)."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children[ppid].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def write_config(path: Path, gateway_id: str, broker: tuple[str, int], db: Path, peers: Iterable[PeerInfo],
                 qos: int | None = None) -> Path:
    """A config with one uart picogw device per peer; ``qos``: mqtt.readings_qos (None: the default)."""
    lines = [f'gateway_id = "{gateway_id}"', "[mqtt]", f'host = "{broker[0]}"', f"port = {broker[1]}"]
    if qos is not None:
        lines.append(f"readings_qos = {qos}")
    lines += ["[store]", f'path = "{db}"']
    for peer in peers:
        lines += ["[[devices]]", f'id = "{peer.device}"', 'transport = "uart"', f'port = "{peer.path}"',
                  'protocol = "picogw"']
    path.write_text("\n".join(lines) + "\n")
    return path


class GatewayProcess:
    def __init__(self, source: GatewaySource, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config)],
                                     cwd=source.root, env=source.env(), stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n"
                               f"{self.log_path.read_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def stop(self) -> int:
        code = stop_process(self.proc, grace=20)
        self._log.close()
        return code


# -- the subscriber --------------------------------------------------------------------
class Subscriber:
    """Counts sensor messages per topic (keeping their payloads, the sequence numbers)
    and records when status/state/result messages arrive."""

    def __init__(self, host: str, port: int, counter=None) -> None:
        """``counter``: a shared multiprocessing value kept equal to ``received`` (for a
        feeder or publisher in another process)."""
        self.received = 0
        self._counter = counter
        self.payloads: defaultdict[str, list[bytes]] = defaultdict(list)
        self.events: list[tuple[float, str, bytes]] = []  # (monotonic time, topic, payload) of non-sensor topics
        self._subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id=f"bench-sub-{os.getpid()}-{time.monotonic_ns()}")
        filters = [("pico/+/sensor/#", 0)] + [(f"pico/{t}", 1) for t in (
            "+/status", "+/state/#", "+/result/#", "bridge/#")]  # no overlaps: one copy of each message
        self.client.on_connect = lambda c, *a: c.subscribe(filters)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the subscriber could not subscribe")

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if "/sensor/" in topic:
            self.payloads[topic].append(msg.payload)
            self.received += 1
            if self._counter is not None:
                self._counter.value = self.received
        else:
            self.events.append((time.monotonic(), topic, msg.payload))

    def first(self, topic: str, payload: bytes, after: float) -> float | None:
        """When ``payload`` first arrived on ``topic`` after ``after`` (monotonic), or None."""
        for t, top, pay in list(self.events):
            if t >= after and top == topic and pay == payload:
                return t
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, check: Callable[[], None] | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if check:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def wait_online(sub: Subscriber, gateway_id: str, devices: list[str], after: float, timeout: float,
                check: Callable[[], None] | None = None) -> float:
    """Monotonic time at which the bridge and every device had said ``online`` (after ``after``)."""
    topics = [f"pico/bridge/{gateway_id}/status"] + [f"pico/{d}/status" for d in devices]

    def all_online() -> float | None:
        times = [sub.first(t, b"online", after) for t in topics]
        return None if None in times else max(times)  # type: ignore[type-var]

    return wait_for(all_online, timeout, "the bridge and every device online", check)


# -- checking what arrived -----------------------------------------------------------------
def loss_report(written: dict[str, int], sub: Subscriber, db: Path | None, since_ms: int = 0) -> dict[str, int]:
    """Messages written (per device, sequence numbers 0 .. n-1: frames from the virtual
    Picos, or the paho ceiling's PUBLISHes) vs messages received vs rows stored, by
    sequence number per device.

    Only rows with ``ts >= since_ms`` count (a pre-filled database holds older ones)."""
    import sqlite3

    sent = sum(written.values())
    missing_mqtt = duplicates_mqtt = 0
    for device, count in written.items():
        got = [int(p) for p in sub.payloads.get(f"pico/{device}/sensor/{METRIC}", [])]
        unique = set(got)
        duplicates_mqtt += len(got) - len(unique)
        missing_mqtt += sum(1 for n in range(count) if n not in unique)
    report = {"written": sent, "messages_received": sub.received,
              "missing_on_mqtt": missing_mqtt, "duplicates_on_mqtt": duplicates_mqtt}
    if db is not None:
        names = list(written)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            marks = ",".join("?" * len(names))
            rows, distinct = conn.execute(
                f"SELECT count(*), count(DISTINCT device || ':' || seq) FROM readings "
                f"WHERE device IN ({marks}) AND metric = ? AND ts >= ?", [*names, METRIC, since_ms]).fetchone()
        report.update(rows_stored=rows, missing_in_db=sent - distinct, duplicates_in_db=rows - distinct)
    return report


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Env:
    """What every measurement gets from run.py."""

    source: GatewaySource
    workdir: Path
    duration: float
    warmup: float
    window: int
    qos: int | None = None  # mqtt.readings_qos for every gateway started; None: the revision's default
    broker_conf: str = ""  # extra mosquitto.conf lines, for experiments (e.g. "set_tcp_nodelay true")

    def broker(self, workdir: Path) -> PrivateBroker:
        return PrivateBroker(workdir / "broker", extra_conf=self.broker_conf)

    def tempdir(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
