"""One thread reads every serial port the gateway has open (uart and usb links).

With a thread per port, 16 busy Picos meant 16 threads, each waking for every few
frames and queueing for the GIL, and a command's answer waited in that queue too
(docs/performance.md). Here one thread waits on every port at once (``selectors``),
reads whatever is ready, hands each port's bytes to its link's session, runs the
sessions' timers, and reopens a failed port with its own backoff. A port failing
or a session raising affects only that link.

What the reactor thread must never do is block: it opens ports (quick), reads only
what select() says is there, and its own writes (a session's hello and pings) go
through :meth:`SerialLink.write_nowait`. Commands are written by the bridge's
per-device workers, which may block on their own port only.

    REACTOR.add(link)      # from SerialLink.start(): opened, read, reopened from now on
    REACTOR.remove(link)   # from SerialLink.stop(): closed when this returns
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import serial

from gateway.backoff import Backoff
from gateway.log_once import Once
from gateway.progress import Heartbeat

if TYPE_CHECKING:
    from gateway.protocols.session import SerialSession

log = logging.getLogger("gateway.link.serial")

TICK = 0.05  # seconds between the sessions' timers (heartbeats, offline checks), and the longest sleep
READ_SIZE = 65536
GATHER = 0.001  # seconds the thread lets bytes gather after a round that read some, before it waits again
# on the ports: busy Picos are then read a dozen frames at a time, not one or two (16 ports sending flat out
# woke it ~2,400 times a second, a system call and a thread switch each; with this, ~780 and a third less
# CPU per reading, docs/performance.md). A quiet port's first bytes are still read at once, and nothing
# gathers while a command waits for its answer.


class PortConfig(Protocol):
    @property
    def port(self) -> str: ...


class ReactorLink(Protocol):
    """What the serial thread needs of a link it serves (gateway/links/serial_link.py's
    SerialLink), named here so that this module does not import that one."""

    session: SerialSession
    commands_waiting: int
    stats: Counter[str]
    log: logging.Logger

    @property
    def config(self) -> PortConfig: ...

    def open_port(self) -> serial.Serial: ...
    def attach(self, port: serial.Serial) -> None: ...
    def detach(self) -> None: ...
    def set_online(self, online: bool, reason: str = "") -> None: ...


@dataclass
class _Port:
    link: ReactorLink
    port: serial.Serial | None = None
    backoff: Backoff = field(default_factory=Backoff)
    reopen_at: float = 0.0  # monotonic time of the next open attempt while closed


class SerialReactor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: deque[tuple[bool, ReactorLink, threading.Event]] = deque()  # (add?, link, done)
        self._ports: dict[ReactorLink, _Port] = {}
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        # Nothing in a turn blocks (see above): it waits TICK at most.
        self.heartbeat = Heartbeat("serial", TICK)

    def add(self, link: ReactorLink) -> None:
        """Open ``link``'s port (retrying with backoff) and read it from now on."""
        self._request(True, link).wait(10)

    def remove(self, link: ReactorLink) -> None:
        """Close ``link``'s port and forget it; returns once it is closed."""
        if not self._request(False, link).wait(10):
            log.warning("serial port %s did not close within 10 s", link.config.port)

    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- any thread --------------------------------------------------------------------
    def _request(self, add: bool, link: ReactorLink) -> threading.Event:
        done = threading.Event()
        with self._lock:
            self._requests.append((add, link, done))
            if self._thread is None:  # the first link, or the first since the last one left
                self._selector = selectors.DefaultSelector()
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
                self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                self._thread = threading.Thread(target=self._run, name="serial", daemon=True)
                self._thread.start()
            else:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:
                    pass  # full: the thread is awake anyway
        return done

    # -- the reactor thread ---------------------------------------------------------------
    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        next_tick = 0.0
        errors = Once()  # kinds logged already
        heartbeat = self.heartbeat
        while True:
            heartbeat.beat()
            if not self._take_requests():
                return
            try:
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._tick(now)
                timeout = max(0.0, next_tick - time.monotonic())
                busy = False
                for key, _ in selector.select(timeout):
                    if key.data is None:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        self._read(key.data)
                        busy = True
                if busy and not any(link.commands_waiting for link in self._ports):
                    time.sleep(GATHER)
            except Exception as exc:  # a bug here would silence every serial Pico: survive it
                if errors.first(f"{type(exc).__name__}: {exc}"[:200]):
                    log.exception("error in the serial thread (survived)")
                time.sleep(0.1)

    def _take_requests(self) -> bool:
        """Apply queued adds and removes; False when no link is left (the thread ends)."""
        while True:
            with self._lock:
                if not self._requests:
                    if self._ports:
                        return True
                    # Last link gone: end, and let the next add start a fresh thread.
                    assert self._selector is not None
                    self._selector.close()
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._thread = None
                    return False
                add, link, done = self._requests.popleft()
            try:
                if add:
                    if link not in self._ports:
                        self._ports[link] = state = _Port(link)
                        self._open(state)
                else:
                    gone = self._ports.pop(link, None)
                    if gone is not None and gone.port is not None:
                        self._close(gone, "stopping", reopen=False)
                    else:
                        link.set_online(False, "stopping")
            finally:
                done.set()

    def _tick(self, now: float) -> None:
        for state in list(self._ports.values()):
            if state.port is None:
                if now >= state.reopen_at:
                    self._open(state)
                continue
            try:
                state.link.session.poll(now)
            except Exception:  # a bug in a session must not end the link for good
                self._failed(state, None)

    def _open(self, state: _Port) -> None:
        link = state.link
        try:
            port = link.open_port()
        except (serial.SerialException, OSError, ValueError) as exc:
            link.stats["open_failures"] += 1
            link.set_online(False, f"cannot open {link.config.port}: {exc}")
            state.reopen_at = time.monotonic() + state.backoff.next()
            return
        state.backoff.reset()
        link.stats["opens"] += 1
        state.port = port
        link.attach(port)
        assert self._selector is not None
        self._selector.register(port.fileno(), selectors.EVENT_READ, state)
        try:
            link.session.connected()
        except Exception:
            self._failed(state, None)

    def _read(self, state: _Port) -> None:
        port = state.port
        if port is None:
            return
        try:
            data = os.read(port.fileno(), READ_SIZE)
            if not data:
                raise serial.SerialException("the device reports readiness to read but returned no data "
                                             "(disconnected?)")
            state.link.session.received(data)
        except (serial.SerialException, OSError) as exc:
            self._failed(state, exc)
        except Exception:
            self._failed(state, None)

    def _failed(self, state: _Port, exc: Exception | None) -> None:
        """The port failed (``exc``) or the session raised (None, logged with its traceback)."""
        link = state.link
        if exc is None:
            link.stats["internal_errors"] += 1
            link.log.exception("session error; reopening the port")
            reason = "internal error"
        else:
            link.stats["port_errors"] += 1
            reason = f"{link.config.port} failed: {exc}"
        if state.port is not None:
            self._close(state, reason, reopen=True)

    def _close(self, state: _Port, reason: str, reopen: bool) -> None:
        port, state.port = state.port, None
        assert port is not None and self._selector is not None
        try:
            self._selector.unregister(port.fileno())
        except (KeyError, ValueError, OSError):
            pass
        link = state.link
        link.detach()
        port.close()
        try:
            link.session.disconnected()
        except Exception:
            link.stats["internal_errors"] += 1
            link.log.exception("session error while closing")
        link.set_online(False, reason)
        if reopen:
            state.reopen_at = time.monotonic() + state.backoff.next()


REACTOR = SerialReactor()
