"""`pico-gateway simulate` and `pico-gateway demo` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import serial
from conftest import REPO, GatewayProcess
from mqtt_helpers import Recorder, wait_for

from gateway.processes import stop_process

HERE = Path(__file__).parent


def children_of(pid: int) -> list[int]:
    """Every live process whose parent chain reaches ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is not: it has ended and waits for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def output_lines(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    """``proc``'s stdout, line by line as it comes, read by a thread (a test can then wait
    on it with a deadline instead of blocking in readline); the thread ends at its EOF."""
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def test_simulate_a_config_then_run_the_gateway_on_it(tmp_path: Path, broker, recorder: Recorder) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'gateway_id = "simgw"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                      f'[store]\npath = "{tmp_path}/r.db"\n'
                      '[[devices]]\nid = "greenhouse"\ntransport = "uart"\n'
                      '[[devices]]\nid = "shed"\ntransport = "tcp"\nhost = "192.168.1.50"\nprotocol = "tutorial"\n')
    work = tmp_path / "sim"
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--config", str(config),
                            "--workdir", str(work)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        wait_for(lambda: (work / "gateway.sim.toml").exists(), 20, "the simulated config")
        gw = GatewayProcess(work / "gateway.sim.toml", recorder, "simgw")
        try:
            recorder.wait("pico/greenhouse/sensor/temp", timeout=20)
            recorder.wait("pico/shed/status", "online")
        finally:
            gw.stop()
    finally:
        sim.send_signal(signal.SIGINT)
        out, _ = sim.communicate(timeout=15)
    assert sim.returncode == 0, out
    assert re.search(r"greenhouse\s+uart\s+picogw\s+/dev/pts/\d+", out), out


def test_simulate_runs_a_users_own_program(tmp_path: Path) -> None:
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate",
                            "--firmware", str(HERE / "sim_programs" / "uart_echo.py"),
                            "--transport", "uart", "--workdir", str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines, _ = output_lines(sim)
    try:
        line = wait_for(lambda: next((text for text in list(lines) if "/dev/pts/" in text), None), 20, "the pty path")
        path = re.search(r"/dev/pts/\d+", line).group(0)
        with serial.Serial(path, 115200, timeout=5) as port:
            port.write(b"hello\r")
            assert port.read_until(b"\n") == b"ECHO HELLO\r\n"
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(15)
    assert sim.returncode == 0


def test_demo_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--duration", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines, reader = output_lines(demo)
    try:
        # Its processes (broker, gateway, virtual Picos), once the first table shows them running.
        wait_for(lambda: any(re.match(r"greenhouse\s", line) for line in list(lines)), 60, "the first table")
        started = children_of(demo.pid)
        assert started, "the demo runs its parts as child processes"
        demo.wait(90)
    finally:
        stop_process(demo)  # (a failure above must not leave the demo running; else it has exited)
    reader.join(10)
    out = "".join(lines)
    assert demo.returncode == 0, out
    assert "mosquitto_pub -h 127.0.0.1" in out
    # Without a terminal the table is printed every 5 s and at the end: every device must
    # show up online in one of them (a poll can fail on a machine loaded by 8 Picos; 10 s: a table at 5 s
    # and one at the end, time for a Pico that starts late on a loaded machine).
    for device in ("greenhouse", "porch", "cellar", "attic", "desk", "bench", "balcony", "shed"):
        assert re.search(rf"^{device}\s+\S+\s+\S+\s+online", out, re.M), (device, out[-2500:])
    assert "nothing left running" in out
    wait_for(lambda: not any(alive(p) for p in started), 5, "every process the demo started to end")
