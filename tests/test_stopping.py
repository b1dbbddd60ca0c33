"""Stopping within 5 s, whatever hangs (docs/reliability.md, guarantee 4): a broker that
no longer answers, a usb board gone silent inside mpremote's raw REPL, a command waiting
on a mute Pico; and the demo interrupted while it starts. Each test stops the real
process and holds it to a deadline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, GatewayProcess, write_config
from mqtt_helpers import Broker, Recorder, wait_for
from peers import PicogwPeer, PtyPeer, RawReplPeer
from test_reliability import db_rows
from test_simulate_cli import output_lines

from gateway.processes import stop_process

STOP_DEADLINE = 5.0  # seconds from SIGTERM to exit: guarantee 4


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # (it ended meanwhile)
        return b""


def sigterm_and_wait(gw: GatewayProcess) -> tuple[int | None, float]:
    """SIGTERM the gateway; its exit code (None: still running at the deadline) and how long
    it took. A gateway still running is killed, so a failing test leaves nothing behind."""
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = gw.proc.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    stop_process(gw.proc, grace=0)
    gw.log.close()
    return code, took


def test_sigterm_with_the_broker_hung_stops_within_5_s(tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """A broker that no longer answers (SIGSTOP) at SIGTERM: the gateway still exits 0
    within 5 s, with every reading stored; once the broker runs again the bridge shows
    offline, and the next start publishes every reading the broker never acknowledged."""
    peers = [PicogwPeer(f"dev{i}") for i in range(8)]
    devices = [{"id": p.device, "transport": "uart", "port": p.path} for p in peers]
    config = write_config(tmp_path / "gw.toml", broker, devices)
    db = tmp_path / "readings.db"
    gw = GatewayProcess(config, recorder)
    gw2 = None
    try:
        for p in peers:
            recorder.wait(f"pico/{p.device}/status", "online", timeout=15)
        bridge_mark = recorder.mark("pico/bridge/testgw/status")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(20):
                for p in peers:
                    p.reading(temp=i)
            wait_for(lambda: all(len(db_rows(db, p.device)) == 20 for p in peers), 10, "every reading stored")
            code, took = sigterm_and_wait(gw)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        assert code == 0, (code, gw.output()[-3000:])
        assert took < STOP_DEADLINE
        recorder.wait_new("pico/bridge/testgw/status", "offline", bridge_mark)  # (ours, or the will)
        gw2 = GatewayProcess(config, recorder)
        for p in peers:
            wait_for(lambda p=p: {int(v) for v in recorder.on(f"pico/{p.device}/sensor/temp")} == set(range(20)),
                     15, f"every reading of {p.device} published")
    finally:
        stop_process(gw.proc, grace=0)
        if gw2 is not None:
            gw2.stop()
        for p in peers:
            p.close()


@pytest.mark.parametrize("board", ["silent", "silent-after-raw-repl"])
def test_sigterm_with_a_usb_repl_board_gone_silent_stops_within_5_s(tmp_path: Path, broker: Broker,
                                                                   recorder: Recorder, board: str) -> None:
    """A usb link in ``protocol = "tutorial"`` whose board went silent, blocked inside
    mpremote's raw REPL (entering it; or starting a snippet) at SIGTERM: the gateway still
    exits 0 within 5 s and says it is offline; the link's thread ends, not left behind."""
    peer = PtyPeer() if board == "silent" else RawReplPeer(silent_after_entry=True)
    waits_at = b"\r\x01" if board == "silent" else b"\x05A\x01"  # ctrl-A (enter), raw-paste request
    devices = [{"id": "bench", "transport": "usb", "protocol": "tutorial", "port": peer.path,
                "poll_interval": 0.5}]
    gw = GatewayProcess(write_config(tmp_path / "gw.toml", broker, devices), recorder)
    try:
        wait_for(lambda: waits_at in peer.received, 15, f"the gateway's {waits_at!r} to the board")
        marks = (recorder.mark("pico/bench/status"), recorder.mark("pico/bridge/testgw/status"))
        code, took = sigterm_and_wait(gw)
        assert code == 0, (code, gw.output()[-3000:])
        assert took < STOP_DEADLINE
        recorder.wait_new("pico/bench/status", "offline", marks[0])
        recorder.wait_new("pico/bridge/testgw/status", "offline", marks[1])
        assert "did not stop" not in gw.output()
    finally:
        stop_process(gw.proc, grace=0)
        peer.close()


def test_usb_repl_board_that_hangs_goes_offline_then_sigterm_stops_within_5_s(tmp_path: Path, broker: Broker,
                                                                             recorder: Recorder) -> None:
    """A stock-MicroPython board that answered polls hangs: the device goes offline (a
    read that never ends would have kept it "online" with no readings, for good), and
    SIGTERM still stops the gateway within 5 s."""
    peer = RawReplPeer()
    devices = [{"id": "bench", "transport": "usb", "protocol": "tutorial", "port": peer.path,
                "poll_interval": 0.2}]
    gw = GatewayProcess(write_config(tmp_path / "gw.toml", broker, devices), recorder)
    try:
        recorder.wait("pico/bench/status", "online", timeout=15)
        recorder.wait("pico/bench/sensor/uptime", count=2)
        mark = recorder.mark("pico/bench/status")
        peer.silent.set()
        recorder.wait_new("pico/bench/status", "offline", mark, timeout=20)
        code, took = sigterm_and_wait(gw)
        assert code == 0, (code, gw.output()[-3000:])
        assert took < STOP_DEADLINE
    finally:
        stop_process(gw.proc, grace=0)
        peer.close()


def test_sigterm_with_a_command_waiting_on_a_mute_pico_stops_within_5_s(tmp_path: Path, broker: Broker,
                                                                       recorder: Recorder) -> None:
    """A command sent to a Pico that stopped answering, with a long ``command_timeout``,
    still waiting at SIGTERM: the stop does not wait for it."""
    peer = PicogwPeer("porch")
    devices = [{"id": "porch", "transport": "uart", "port": peer.path, "command_timeout": 30.0}]
    gw = GatewayProcess(write_config(tmp_path / "gw.toml", broker, devices), recorder)
    try:
        recorder.wait("pico/porch/status", "online")
        peer.mute = True
        recorder.publish("pico/porch/cmd/led", "on")
        wait_for(lambda: any(f.type == "C" and f.get("led") == "on" for f in peer.commands), 10,
                 "the command at the Pico")
        mark = recorder.mark("pico/bridge/testgw/status")
        code, took = sigterm_and_wait(gw)
        assert code == 0, (code, gw.output()[-3000:])
        assert took < STOP_DEADLINE
        recorder.wait_new("pico/bridge/testgw/status", "offline", mark)
    finally:
        stop_process(gw.proc, grace=0)
        peer.close()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry))
    return found


def test_demo_ctrl_c_while_starting_stops_at_once_and_says_so(tmp_path: Path) -> None:
    """Ctrl-C as soon as the demo has started its broker (its virtual Picos are still
    booting): it stops within 5 s, says what it stopped, exits 0, and leaves no process
    running. Ctrl-C at a terminal signals the whole foreground process group: so here."""
    workdir = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    lines, reader = output_lines(demo)
    try:
        wait_for(lambda: any(line.startswith("demo: mosquitto on") for line in list(lines)), 20,
                 "the demo's first line")
        started = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)
        try:
            demo.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - started
    finally:
        stop_process(demo, grace=0)
        if demo.returncode == -signal.SIGKILL:  # (killed above: what it started is still running)
            for pid in processes_mentioning(str(workdir)):
                os.kill(pid, signal.SIGKILL)
    reader.join(10)
    out = "".join(lines)
    assert demo.returncode == 0, out
    assert took < STOP_DEADLINE, out
    assert "interrupted" in out and "nothing left running" in out, out
    assert "Traceback" not in out, out
    wait_for(lambda: not processes_mentioning(str(workdir)), 5, "every process the demo started to end")


def test_sigterm_with_the_disk_not_answering_stops_within_5_s_and_says_what_is_lost(
        tmp_path: Path, broker: Broker, recorder: Recorder) -> None:
    """A commit that never returns (an SD card that stopped answering; here the database
    writer process is frozen with SIGSTOP) at SIGTERM: the gateway still exits 0 within
    5 s, and the log says exactly how many readings it could not store."""
    peer = PicogwPeer("cellar")
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "cellar", "transport": "uart", "port": peer.path}],
                          diagnostics_interval=1)
    db = tmp_path / "readings.db"
    gw = GatewayProcess(config, recorder)
    writers: list[int] = []
    try:
        recorder.wait("pico/cellar/status", "online", timeout=15)
        def frames() -> int:
            return json.loads(recorder.last("pico/cellar/diagnostics") or "{}").get("frames", 0)

        peer.reading(temp=0)
        wait_for(lambda: len(db_rows(db, "cellar")) == 1, 10, "the first reading stored")
        before = wait_for(frames, 10, "the first diagnostics")
        children = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
        writers = [int(pid) for pid in children if b"store_writer" in _cmdline(int(pid))]  # (not a retention pass)
        assert len(writers) == 1, writers  # the database writer
        os.kill(writers[0], signal.SIGSTOP)
        for i in range(1, 31):
            peer.reading(temp=i)
        wait_for(lambda: frames() == before + 30, 15, "the 30 readings received by the gateway")
        code, took = sigterm_and_wait(gw)
        assert code == 0, (code, gw.output()[-3000:])
        assert took < STOP_DEADLINE
        lost = [int(n) for n in re.findall(r"(\d+) held reading\(s\) lost", gw.output())]
        assert lost == [30], gw.output()[-3000:]  # every reading after the freeze, counted once
    finally:
        for pid in writers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_process(gw.proc, grace=0)
        peer.close()
