"""systemd integration without extra dependencies: sd_notify, the watchdog, journald logging.

- :class:`Notifier` speaks the sd_notify(3) protocol: one datagram per message to
  the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (abstract namespace when the name
  starts with ``@``). Every method is a no-op when we are not under systemd.
- :class:`Watchdog` is a daemon thread that sends ``WATCHDOG=1`` every half of
  ``$WATCHDOG_USEC``, but only while a health callable says the gateway works
  (:func:`gateway_health`: every loop alive *and turning*).
  When it does not, petting stops, the reason is logged once, and systemd kills
  and restarts the service after ``WatchdogSec=``.
- :func:`setup_logging` logs to stderr; when stderr *is* the journal
  (``$JOURNAL_STREAM`` names stderr's device and inode) every line gets a
  ``<N>`` syslog priority prefix (sd-daemon(3)) and no timestamp, since journald
  keeps both itself.

    notifier = Notifier()
    watchdog = Watchdog(notifier, gateway_health(mqtt, bridge)); watchdog.start()
    notifier.ready("running: 3 device(s)")
    notifier.reloading(); ...; notifier.ready("running: 4 device(s)")   # SIGHUP (gateway/reload.py)
    ...; watchdog.stop(); notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

log = logging.getLogger("gateway.systemd")

# What a health callable may return: True/False, or (ok, reason) so the log can say why.
HealthResult = bool | tuple[bool, str]
Health = Callable[[], HealthResult]


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (``systemctl stop``) and SIGINT (Ctrl-C) set ``stop``: the process then
    shuts down in order instead of dying. SIGHUP is ignored until the reload's handler
    takes it (gateway/reload.py): its default would end the process. Only the main thread
    may install handlers; elsewhere (a test running the daemon in a thread) this does nothing."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """systemd's watchdog timeout in seconds (``$WATCHDOG_USEC``), or None when not enabled
    for this process (unset, invalid, or ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return value / 1_000_000


class Notifier:
    """sd_notify(3) over a datagram socket; silent no-ops when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env
        self._address = self._parse(self._env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @staticmethod
    def _parse(name: str) -> str | None:
        if not name:
            return None
        if name.startswith("@"):
            return "\0" + name[1:]  # abstract namespace
        if name.startswith("/"):
            return name
        # e.g. vsock:... (systemd 253+ in VMs): not needed on a Pi; stay silent.
        log.debug("NOTIFY_SOCKET=%r is not an AF_UNIX path; sd_notify disabled", name)
        return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` each) in one datagram; True when it was sent."""
        if self._address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot notify systemd at %s: %s", self._env.get("NOTIFY_SOCKET"), exc)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([_status(status)] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """The config is being read again: ``RELOADING=1`` with ``MONOTONIC_USEC`` (when it
        began, on CLOCK_MONOTONIC, as systemd 253+'s ``Type=notify-reload`` requires; older
        ones ignore it). :meth:`ready` ends the reload, whatever its outcome."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *([_status(status)] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        return watchdog_interval(self._env)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str) -> str:
    # One datagram holds newline-separated assignments: a newline would end STATUS early.
    return "STATUS=" + " ".join(str(text).split())[:1000]


def _check(health: Health) -> tuple[bool, str]:
    try:
        result: Any = health()
    except Exception as exc:  # a broken health check is itself unhealthy
        return False, f"health check raised {type(exc).__name__}: {exc}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason)
    return bool(result), "" if result else "health check returned False"


class Watchdog:
    """Pets systemd's watchdog every ``interval / 2`` while ``health()`` holds.

    ``interval`` defaults to the notifier's ``$WATCHDOG_USEC``; without one (not
    under systemd, or no ``WatchdogSec=``) :meth:`start` does nothing.
    """

    def __init__(self, notifier: Notifier, health: Health, interval: float | None = None) -> None:
        self.notifier = notifier
        self.health = health
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self.pings = 0
        self.healthy = True
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.notifier.enabled or not self.interval or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        log.debug("watchdog: pinging systemd every %.1f s (timeout %.1f s)", self.interval / 2, self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def tick(self) -> bool:
        """One round: check health, pet when healthy; True when it petted."""
        ok, reason = _check(self.health)
        if ok:
            if not self.healthy:
                log.warning("healthy again; watchdog pings resume")
                self.notifier.status("running")
            self.healthy, self.reason = True, ""
            if self.notifier.watchdog():
                self.pings += 1
            return True
        if self.healthy:  # log once per unhealthy spell
            log.error("unhealthy: %s; no more watchdog pings, systemd will restart the gateway "
                      "within %.0f s", reason, self.interval or 0)
            self.notifier.status(f"unhealthy: {reason}")
        self.healthy, self.reason = False, reason
        return False

    def _run(self) -> None:
        period = (self.interval or 0) / 2
        self.tick()
        while not self._stop.wait(period):
            self.tick()


def gateway_health(mqtt: Any, bridge: Any) -> Health:
    """The daemon's health: the MQTT network thread, the bridge's writer thread and every
    link thread are alive, and each of their loops turns within its bound: a thread that
    is alive but stuck (a deadlock, a read that never returns) is unhealthy too, named
    with how long it has not turned (gateway/progress.py). Links without a thread of
    their own (wifi) have only the MQTT loop to depend on.

    ``mqtt`` is a :class:`gateway.mqtt.MqttConnection`, ``bridge`` a
    :class:`gateway.bridge.Bridge`; both started."""

    def health() -> tuple[bool, str]:
        if not mqtt.alive():
            return False, "the MQTT network thread is not running"
        return bridge.health()

    return health


# -- logging -------------------------------------------------------------------

_PREFIXES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    for level, prio in _PREFIXES:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message``; every line of a multi-line record (tracebacks) carries the
    prefix, since journald turns each line of a stream into its own entry."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stderr_is_journal(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is connected to journald: ``$JOURNAL_STREAM`` is
    ``<device>:<inode>`` of the stream systemd connected (see systemd.exec(5))."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def journald_logging(stream: IO[str] | None = None, env: Mapping[str, str] | None = None) -> logging.Handler:
    """A handler on ``stream`` (stderr): ``<N>`` prefixes without timestamps when it is the
    journal, the usual timestamped lines otherwise."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream, env):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger for the CLI (replaces ``gateway.cli.setup_logging``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[journald_logging()])
