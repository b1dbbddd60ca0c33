"""The bench's virtual Picos: pseudo-terminals speaking picogw, and the feeder that
floods them, all in a process of their own.

Why a process: at 20,000 readings/s, encoding frames, writing them and answering
commands take a sizeable part of a core; in the bench's own process they shared
one GIL with the subscriber that counts what the gateway publishes, and that
process, not the gateway, became the limit of the measurement.

    picos = Picos(16)                      # d00 .. d15
    write_config(path, ..., picos.peers)   # .device and .path of each
    picos.feed(window=1000)                # flood, flow-controlled by picos.received
    picos.sent; picos.stop_feed(); picos.counts()["d00"].seq
    picos.close()
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import tty
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from common import METRIC

from gateway.protocols.picogw import FrameReceiver, encode

# The virtual Picos stand for chips that cost the Pi nothing, yet they share its two cores
# here; what they cost is taken from the subscriber that bounds both the ingest figure and
# the paho ceiling (which has no Picos). So they are made cheap: a flood writes FLOOD_CHUNK
# frames at a time (in 8-frame writes this process switched ~5,000 times a second and the
# subscriber was preempted 800-1,900 times a second, in 32-frame ones 440-630, and 90-240 once
# the gateway's serial thread also let bytes gather: see docs/performance.md), and frames are
# formatted directly, not through encode()'s checks
# (0.5 against 1.8 µs a frame).
FLOOD_CHUNK = 32
RATE_CHUNK = 8  # at a rate (UART speed): a burst every 8 frames' time, close to a wire's steady stream
_METRIC = METRIC.encode()


def reading_frames(first: int, count: int) -> bytes:
    """Reading frames numbered ``first`` on, each carrying its number as METRIC: byte for
    byte what ``encode("R", n, [(METRIC, str(n))])`` makes (held to it below)."""
    out = []
    for n in range(first, first + count):
        body = b"R,%d,%s=%d" % (n, _METRIC, n)
        out.append(b"$%s*%08x\n" % (body, zlib.crc32(body)))
    return b"".join(out)


assert reading_frames(4294967290, 2) == encode("R", 4294967290, [(METRIC, "4294967290")]) + encode(
    "R", 4294967291, [(METRIC, "4294967291")])


@dataclass(frozen=True)
class PeerInfo:
    device: str
    path: str  # the pseudo-terminal the gateway opens


@dataclass(frozen=True)
class PeerCounts:
    seq: int  # the number the next reading frame would carry (= frames written)
    commands: int  # led commands answered


class Picos:
    """``count`` bench Picos (``<prefix>00`` ...) and their feeder in a child process.

    ``received`` is a shared counter the parent keeps equal to the subscriber's
    count of sensor messages (``Subscriber(..., counter=picos.received)``): the
    feeder's flow control reads it."""

    def __init__(self, count: int, prefix: str = "d", acks: bool = False) -> None:
        """``acks``: the Picos say in their hello that they keep frames until acknowledged
        (docs/protocol.md 1.8), answer the gateway's resend request and count its K frames
        (they keep nothing: the bench measures the gateway's side of it)."""
        ctx = mp.get_context("spawn")  # the parent has threads (paho): no fork
        self.received = ctx.RawValue("q", 0)
        self._sent = ctx.RawValue("q", 0)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, name="bench-picos",
                                    args=(count, prefix, child, self.received, self._sent, acks), daemon=True)
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("the bench's virtual Picos did not start")
        self.peers: list[PeerInfo] = [PeerInfo(d, p) for d, p in self._conn.recv()]

    @property
    def pid(self) -> int:
        return self._process.pid  # type: ignore[return-value]

    @property
    def devices(self) -> list[str]:
        return [p.device for p in self.peers]

    @property
    def sent(self) -> int:
        """Reading frames the feeder has written so far."""
        return self._sent.value

    def feed(self, window: int, rate: float | None = None, chunk: int | None = None) -> Picos:
        """Start flooding (``rate``: at most that many frames per second per Pico), FLOOD_CHUNK
        frames per write, or RATE_CHUNK at a rate (``chunk``: that many instead)."""
        self._call("feed", window, chunk or (FLOOD_CHUNK if rate is None else RATE_CHUNK), rate)
        return self

    def stop_feed(self) -> None:
        self._call("stop_feed")

    def synced(self) -> bool:
        """Whether every Pico has answered the gateway's resend request (with ``acks``: the
        gateway takes its frames from then on)."""
        return bool(self._call("synced"))

    def acks_received(self) -> int:
        """K frames the Picos have received, all together."""
        return int(self._call("acks"))  # type: ignore[call-overload]

    def counts(self) -> dict[str, PeerCounts]:
        return {d: PeerCounts(*c) for d, c in self._call("counts").items()}

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._call("close")
            except (OSError, EOFError, RuntimeError):
                pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()

    def _call(self, *request: object) -> object:
        self._conn.send(request)
        if not self._conn.poll(30):
            raise RuntimeError(f"the bench's virtual Picos did not answer {request[0]!r}")
        return self._conn.recv()


def _serve(count: int, prefix: str, conn, received, sent, acks: bool = False) -> None:
    """Child process: make the peers, then do what the parent asks until ``close``."""
    # A Pico answers a command within microseconds; here its reader thread shares a GIL
    # with the feeder, which holds it for CPython's default 5 ms at a time. Hand it over
    # sooner, so that the commands measurement times the gateway, not this process.
    sys.setswitchinterval(0.0002)
    peers = [Peer(f"{prefix}{i:02d}", acks) for i in range(count)]
    conn.send([(p.device, p.path) for p in peers])
    feeder: Feeder | None = None
    while True:
        op, *args = conn.recv()
        if op == "feed":
            feeder = Feeder(peers, lambda: received.value, *args[:2], sent, rate=args[2]).start()
            conn.send(None)
        elif op == "stop_feed":
            if feeder is not None:
                feeder.stop()
            conn.send(None)
        elif op == "synced":
            conn.send(all(p.synced for p in peers))
        elif op == "acks":
            conn.send(sum(p.acks_received for p in peers))
        elif op == "counts":
            conn.send({p.device: (p.seq, p.commands) for p in peers})
        elif op == "close":
            if feeder is not None:
                feeder.stop()
            for peer in peers:
                peer.close()
            conn.send(None)
            return


class Peer:
    """The Pico end of a pseudo-terminal speaking picogw.

    Answers ``C`` frames (led, hello, ping) from its reader thread like the
    firmware does, and sends reading frames when the feeder asks. Writes are
    whole frames under a lock, so an ack never splits a burst of readings.
    """

    def __init__(self, device: str, acks: bool = False) -> None:
        self.device = device
        self.acks = acks
        self.synced = not acks  # with acks: the gateway's resend request answered
        self.acks_received = 0
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.seq = 0  # the number the next reading frame carries
        self.led = False
        self.commands = 0
        self._lock = threading.Lock()
        self._rx = FrameReceiver()
        self._closed = False
        self._thread = threading.Thread(target=self._read_loop, name=f"peer-{device}", daemon=True)
        self._thread.start()

    def send_readings(self, frames: int) -> None:
        with self._lock:
            seq = self.seq
            self._write(reading_frames(seq, frames))
            self.seq = seq + frames

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            for frame in self._rx.feed(data):
                if frame.type == "K":
                    self.acks_received += 1
                elif frame.type == "C":
                    self._answer(frame.number, frame.fields[0] if frame.fields else ("", None))

    def _answer(self, cid: int, field: tuple[str, str | None]) -> None:
        key, value = field
        led = lambda: "on" if self.led else "off"  # noqa: E731
        if key == "led" and value in ("on", "off", "toggle"):
            self.commands += 1
            self.led = (not self.led) if value == "toggle" else value == "on"
            self._send(encode("A", cid, [("led", led())]))
        elif key == "led" and value is None:
            self._send(encode("A", cid, [("led", led())]))
        elif key == "ping":
            self._send(encode("A", cid, []))
        elif key == "hello":
            boot = str(zlib.crc32(self.device.encode()) & 0x3FFFFFFF)  # (a boot of its own, as each Pico draws)
            keeps = [("ack", "240"), ("boot", boot), ("lost", "0")] if self.acks else []
            with self._lock:  # the hello carries the number the next reading will have
                self._write(encode("A", cid, []) + encode(
                    "H", self.seq, [("proto", "1"), ("fw", "bench"), ("dev", self.device[:32]),
                                    ("led", led()), ("metrics", METRIC), *keeps]))
        elif key == "resend" and self.acks:
            with self._lock:  # nothing kept: frames go on from the next number
                self._write(encode("A", cid, [("from", str(self.seq)), ("n", "0")]))
                self.synced = True
        else:
            self._send(encode("N", cid, [("err", "unknown")]))

    def close(self) -> None:
        self._closed = True
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass



class Feeder:
    """Floods every peer with reading frames, round robin, in chunks, as fast as the
    gateway keeps up: never more than ``window`` frames written but not yet received
    by the subscriber (so the rate measured is the sustained one, not a queue filling).
    With ``rate``, each peer sends at most that many frames per second, as a Pico
    on a real wire would (115,200 baud carries about 380 of these frames a second)."""

    def __init__(self, peers: list[Peer], received: Callable[[], int], window: int, chunk: int, sent,
                 rate: float | None = None) -> None:
        self.peers = peers
        self.received = received
        self.window = window
        self.chunk = chunk
        self.sent = sent  # a shared counter (multiprocessing RawValue)
        self.rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        peers, chunk = self.peers, self.chunk
        sent = first = self.sent.value
        start = time.monotonic()
        while not self._stop.is_set():
            wrote = False
            allowed = first + self.rate * len(peers) * (time.monotonic() - start) if self.rate else float("inf")
            for peer in peers:
                if sent - self.received() + chunk <= self.window and sent + chunk <= allowed:
                    peer.send_readings(chunk)
                    sent += chunk
                    self.sent.value = sent
                    wrote = True
            if not wrote:
                time.sleep(0.0002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


