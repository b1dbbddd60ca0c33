"""The disk misbehaving under a running gateway, with real parts: database files made
immutable (SQLite's memory-mapped WAL index then raises SIGBUS), a small filesystem
that fills up, the database file deleted, the wall clock stepped during an outage.
Each test names the row of docs/reliability.md it proves.

The immutable and full-disk tests need root's CAP_LINUX_IMMUTABLE (``chattr +i``) and
CAP_SYS_ADMIN (``mount -t tmpfs``); where the machine refuses, they are skipped and say why."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayProcess, write_config
from mqtt_helpers import Recorder, wait_for
from peers import PicogwPeer

from gateway.config import MqttConfig
from gateway.mosquitto import PrivateBroker
from gateway.mqtt import MqttConnection
from gateway.outbox import Outbox, OutboxSettings
from gateway.store import Store
from gateway.topics import Topics


def db_values(db: Path, device: str) -> list[tuple[float, int]]:
    """(value, sent) of a device's temp readings, in id order."""
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value, sent FROM readings WHERE device = ? AND metric = 'temp' ORDER BY id",
                            (device,)).fetchall()


def published(recorder: Recorder, device: str) -> list[int]:
    return [int(float(v)) for v in recorder.on(f"pico/{device}/sensor/temp")]


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of ``disk`` but ``leave`` bytes."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "ab") as f:
        f.write(b"\0" * size)
    return filler


def test_immutable_database_files_are_survived_and_recovered(tmp_path: Path, broker, recorder: Recorder) -> None:
    """Database files made immutable under the running gateway (SQLite's WAL index is
    memory-mapped: a write into it then raises SIGBUS, which used to kill the gateway
    with exit 135 and nothing in the log): the gateway lives on, logs what happened,
    holds the readings, and stores and publishes every one when writes work again."""
    db = tmp_path / "readings.db"
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    peer = PicogwPeer("vault")
    gw = GatewayProcess(write_config(tmp_path / "gw.toml", broker, [{"id": "vault", "transport": "uart",
                                                                      "port": peer.path}]), recorder)
    immutable = False
    try:
        recorder.wait("pico/vault/status", "online")
        peer.reading(temp=0)
        recorder.wait("pico/vault/sensor/temp", "0")
        try:
            chattr("+i", *files)
            immutable = True
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            pytest.skip(f"chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE): {exc}")
        for i in range(1, 21):
            peer.reading(temp=i)
        wait_for(lambda: "killed by SIGBUS" in gw.output(), 10, "the writer's death in the log")
        wait_for(lambda: "cannot write to" in gw.output(), 10, "the refusal in the log")
        time.sleep(1)  # a gateway that dies of it needs no longer than this to be seen dead
        assert gw.proc.poll() is None, gw.output()[-2000:]
        assert published(recorder, "vault") == [0]  # nothing published before it is stored
        chattr("-i", *files)
        immutable = False
        wait_for(lambda: published(recorder, "vault") == list(range(21)), 20, "the held readings published")
        assert [v for v, _ in db_values(db, "vault")] == list(range(21))
        assert "the database takes writes again; 20 held reading(s) stored" in gw.output()
    finally:
        if immutable:
            chattr("-i", *files)
        code = gw.stop()
        peer.close()
    assert code == 0


def test_nearly_full_disk_keeps_storing_and_counts_what_shutdown_loses(tmp_path: Path, broker, recorder: Recorder,
                                                                         small_disk: Path) -> None:
    """With 1 MB free the gateway keeps storing (the WAL is bounded, and checkpointed and
    truncated after a full-disk error; it used to stall for good after 160 rows); with
    the disk full to the last byte it holds the readings, and when stopped so, logs
    exactly how many held readings are lost."""
    db = small_disk / "readings.db"
    peer = PicogwPeer("attic")
    config = write_config(tmp_path / "gw.toml", broker, [{"id": "attic", "transport": "uart", "port": peer.path}],
                          db=db)
    gw = GatewayProcess(config, recorder)
    try:
        recorder.wait("pico/attic/status", "online")
        peer.reading(temp=0)
        recorder.wait("pico/attic/sensor/temp", "0")
        filler = fill(small_disk, leave=1 << 20)
        n = 3000  # a commit every few readings: several MB of WAL traffic through 1 MB of room
        for i in range(1, n):
            peer.reading(temp=i)
            if i % 10 == 0:
                time.sleep(0.005)
        wait_for(lambda: len(db_values(db, "attic")) == n, 60, f"all {n} readings stored")
        wait_for(lambda: len(recorder.on("pico/attic/sensor/temp")) >= n, 30, "all readings published")
        assert sorted(set(published(recorder, "attic"))) == list(range(n))
        assert os.path.getsize(f"{db}-wal") <= 1.2 * (1 << 20)

        filler.unlink()
        fill(small_disk, leave=0)  # now full to the last byte
        sent = n
        while "cannot write to" not in gw.output():  # the free database pages fill first
            assert sent < n + 5000, "no full-disk error"
            peer.reading(temp=sent)
            sent += 1
            time.sleep(0.002)
        fill(small_disk, leave=0)  # and the space the truncated WAL gave back
        for _ in range(50):
            peer.reading(temp=sent)
            sent += 1
        assert gw.proc.poll() is None
        time.sleep(0.5)  # (the readings are on their way through the pty; they are counted either way)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(15) == 0
        stored = len(db_values(db, "attic"))
        lost = re.findall(r"(\d+) held reading\(s\) lost", gw.output())
        assert lost == [str(sent - stored)] and sent > stored, gw.output()[-2000:]
    finally:
        gw.stop()
        peer.close()


def test_deleted_database_is_noticed_and_a_new_one_carries_on(tmp_path: Path, broker, recorder: Recorder) -> None:
    """readings.db deleted under the running gateway (it used to go on writing into the
    deleted file, say nothing, and start from nothing at the next start): an error
    saying so, a new file at the path with the unpublished readings carried over, and
    every reading published."""
    db = tmp_path / "readings.db"
    peer = PicogwPeer("shed")
    gw = GatewayProcess(write_config(tmp_path / "gw.toml", broker, [{"id": "shed", "transport": "uart",
                                                                      "port": peer.path}]), recorder)
    try:
        recorder.wait("pico/shed/status", "online")
        for i in range(10):
            peer.reading(temp=i)
        wait_for(lambda: published(recorder, "shed") == list(range(10)), 10, "the first readings")
        wait_for(lambda: [sent for _, sent in db_values(db, "shed")] == [1] * 10, 10, "marked sent")
        broker.stop()  # so that readings wait unpublished in the database
        for i in range(10, 20):
            peer.reading(temp=i)
        wait_for(lambda: len(db_values(db, "shed")) == 20, 10, "the outage's readings stored")
        db.unlink()
        for i in range(20, 25):
            peer.reading(temp=i)
        wait_for(lambda: "was deleted while the gateway was running" in gw.output(), 10, "the deletion in the log")
        assert ("the 20 reading(s) it held are gone with it (history included); carried its 10 unpublished "
                "reading(s) into the file now at that path" in gw.output()), gw.output()[-2000:]
        wait_for(lambda: [v for v, _ in db_values(db, "shed")] == list(range(10, 25)), 10,
                 "the new file: the carried readings, then the new ones")
        broker.start()
        wait_for(lambda: all(sent == 1 for _, sent in db_values(db, "shed")), 20, "all published after the outage")
    finally:
        code = gw.stop()
        peer.close()
    assert code == 0
    assert [v for v, _ in db_values(db, "shed")] == list(range(10, 25))  # still there after the stop


def test_clock_stepped_forward_during_an_outage_does_not_age_the_backlog(
        tmp_path: Path, broker: PrivateBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A Pi without a real-time clock starts 8 days behind; NTP steps the clock forward
    during a broker outage. The readings stored meanwhile (~seconds old) are published
    when the broker returns, not given up as past the 168 h backlog bound (the wall
    clock is faked here, for this process only: the machine's cannot be stepped)."""
    real_time = time.time
    step = {"behind": 8 * 86400.0}
    monkeypatch.setattr(time, "time", lambda: real_time() - step["behind"])
    monkeypatch.setattr("gateway.outbox.EXPIRY_CHECK", 0.2)  # the bound is checked every 0.2 s, not 60 s
    store = Store(tmp_path / "r.db")
    mqtt = MqttConnection(MqttConfig(host=broker.host, port=broker.port), "clock-test", None)
    outbox = Outbox(store, mqtt, Topics(), OutboxSettings())
    mqtt.start()
    outbox.start()
    try:
        assert mqtt.wait_connected(10)
        broker.stop()
        wait_for(lambda: not mqtt.connected.is_set(), 10, "the outage noticed")
        for i in range(101):
            outbox.put([("pi", "temp", float(i), int(time.time() * 1000), i)])
        wait_for(lambda: outbox.stats["stored"] == 101, 10, "the outage's readings stored")
        step["behind"] = 0.0  # NTP: the clock jumps 8 days forward
        time.sleep(1)  # several bound checks (every 0.2 s) on the stepped clock
        broker.start()
        wait_for(lambda: all(sent == 1 for _, sent in db_values(tmp_path / "r.db", "pi")), 20,
                 "all 101 published after the outage")
        assert outbox.stats["backlog_expired"] == 0
        assert "backlog bound" not in caplog.text
    finally:
        outbox.stop()
        mqtt.stop()
        store.close()


def test_writer_process_ends_with_the_gateway(tmp_path: Path) -> None:
    """The database writer process exits when the process owning its Store dies (kill -9
    included): no stray process keeps the database open."""
    code = ("import sys, time; from gateway.store import Store; s = Store(sys.argv[1]); "
            "print(s._proc.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r.db")], stdout=subprocess.PIPE,
                             text=True)
    try:
        writer = int(owner.stdout.readline())  # type: ignore[union-attr]
        owner.kill()
        owner.wait()
        wait_for(lambda: not Path(f"/proc/{writer}").exists() or "Z" in Path(f"/proc/{writer}/stat").read_text()
                 .rsplit(")", 1)[1].split()[0], 10, "the writer to exit")
    finally:
        owner.kill()
        owner.wait()
    with sqlite3.connect(tmp_path / "r.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
