"""Store first, publish after, and remember what the broker has taken.

The outbox thread is the only writer of the readings table. Each turn it:

1. takes every reading the links queued, and learns from paho's message infos which
   readings in flight were written (QoS 0) or acknowledged (QoS 1);
2. commits them in one transaction: new rows as unsent, acknowledged ones as sent
   (under load at most every ``commit_interval``; meanwhile they wait in memory, as in the queue);
3. publishes the new rows at once when connected ("live");
4. publishes older unsent rows ("backlog": after a broker outage, a restart, a
   full disk) in id order, a window at a time, so live readings never wait
   behind a long backlog.

A backlog message carries the reading's own time as the MQTT v5 user property
``ts`` (Unix ms), and so does a reading its Pico kept and sent late (stored at the
Pico's time, ``ts_pico``: after a gateway restart or an unplugged cable); a live one
goes out within milliseconds of its reading and needs none (building the property
per message tripled paho's cost). At most WINDOW readings sit in paho's queue, so a
command's answer never waits behind more. Delivery is at least once: see docs/reliability.md for the duplicate
bound, and the bounds on the backlog and on memory while the disk refuses writes.

One module, past 400 lines, because it is one thread's state: the rows waiting for a
commit, the window in flight, the backlog's scan position and its bounds change
together in each turn, and every method here is a step of that turn.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.log_once import Once
from gateway.mqtt import Delivery, MqttConnection, published
from gateway.progress import Heartbeat
from gateway.store import DatabaseReplaced, Row, Store
from gateway.topics import Topics

log = logging.getLogger("gateway.outbox")

MAX_BATCH = 5000  # readings per transaction
WINDOW = 64  # readings handed to paho and not yet acknowledged (QoS 1) or written (QoS 0), at most:
# bounds memory, and how many readings a command's answer can find ahead of it in paho's queue
READY_MAX = 20_000  # stored readings waiting for the window in memory; past that they are read back later
EXPIRY_CHECK = 60.0  # seconds between backlog bound checks
RETRY_STORE = 2.0  # seconds between commit attempts while the disk refuses
COMMIT_GAP = 0.01  # seconds between commits under load (store.commit_interval's default): readings wait
# (in memory, as they did in the queue) and go into the database together; each commit costs ~0.4 ms of
# CPU here (its WAL write and fsync), far more on a Pi's SD card, and writes a few pages to the WAL
# (docs/performance.md, wear). After a quiet spell a reading is committed at once.
STALLED = 60.0  # seconds without any acknowledgement, while connected, before in-flight ones are sent again
STOP_TIMEOUT = 2.2  # seconds Outbox.stop waits: the flush's 2 s for acks, then the last commit
ACK_FLUSH = 0.25  # seconds acknowledgements may wait for a commit of their own (bounds duplicates after a crash)
_STOP = object()


def format_value(value: float) -> str:
    """``21.53`` -> ``"21.53"``, ``5.0`` -> ``"5"``: plain text a human or HA can read."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def taken_earlier(row: Row) -> bool:
    """Whether ``row`` is stored at its Pico's time (``ts_pico``): a reading the Pico kept
    until acknowledged and sent late, whose time a subscriber cannot take as now."""
    return len(row) > 6 and bool(row[6])  # (the long form of Row)


@dataclass(frozen=True)
class OutboxSettings:
    qos: int = 1
    max_backlog_rows: int = 1_000_000
    max_backlog_age_s: float = 7 * 86400.0
    memory_rows: int = 100_000  # readings held in memory while the database refuses writes
    commit_interval: float = COMMIT_GAP  # seconds between commits, at least: what a power cut may lose


class Outbox:
    def __init__(self, store: Store, mqtt: MqttConnection, topics: Topics, settings: OutboxSettings,
                 publishes_itself: Callable[[str], bool] = lambda device: False) -> None:
        self.store = store
        self.mqtt = mqtt
        self.topics = topics
        self.settings = settings
        self.publishes_itself = publishes_itself
        self.stats: Counter[str] = Counter()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # lists of rows, None (wake), _STOP
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._inflight: dict[int, Delivery] = {}  # row id -> paho's info, in publish order
        self._done: set[int] = set()  # acknowledged, to be marked sent in the next commit
        self._ready: deque[tuple[int, Row]] = deque()  # stored, waiting for room in the window
        self._window_full = False  # the outbox waits for acks: the next one wakes it
        self._last_commit = 0.0
        self._gap = settings.commit_interval
        # Acknowledgements alone get a commit of their own at most this often: every ACK_FLUSH
        # seconds, or with a longer commit_interval the next regular one takes them.
        self._ack_flush = max(ACK_FLUSH, settings.commit_interval)
        self._last_ack = time.monotonic()
        self._pending: list[Row] = []  # not yet committed: waiting for the next commit, or the database refused
        self._room = threading.Event()  # set when the window has room again, or there is news
        self._backlog_from: int | None = 0  # scan position; None: nothing left to scan
        self._lost_connection = threading.Event()
        self._stop_requested = threading.Event()
        self._committing = 0  # readings inside the commit in progress (what a stuck one would lose)
        self._last_store_error = ""  # while the database refuses writes: its last error
        self._store_errors_logged = Once()  # the distinct errors of the current refusal
        self._unpublishable_logged = Once()
        # A turn waits 0.5 s at most; rarely, a commit waits out the store's busy timeout (5 s), a
        # refused one RETRY_STORE, or the bounds check updates a large backlog: 15 s covers them.
        self.heartbeat = Heartbeat("outbox", 15.0)
        # Ages for the backlog bound: the rows this process stored are timed by the monotonic
        # clock (a wall-clock step, a Pi's first NTP sync, must not age them); (when, last id).
        self._own_from: int | None = None  # the first id this process stored
        self._last_id = 0
        self._marks: deque[tuple[float, int]] = deque()
        self._own_expired_until = 0  # ids up to here, stored by this process, are past the age bound
        self._removers: list[Callable[[], None]] = []

    # -- any thread ------------------------------------------------------------------
    def _after_io(self) -> None:  # the MQTT network thread, after each round of I/O
        # Wake the outbox when half the window is free, not at every ack: fewer, larger turns.
        if self._window_full and sum(map(published, list(self._inflight.values()))) >= WINDOW // 2:
            self._window_full = False
            self._wake()

    def _wake(self) -> None:
        self._room.set()  # the outbox sleeps on this while readings wait for their commit,
        self._queue.put(None)  # and on the queue otherwise

    def put(self, rows: list[Row]) -> None:
        """Queue readings for storing and publishing; any thread. The list is the outbox's now."""
        self._queue.put(rows)

    def start(self) -> None:
        mqtt = self.mqtt
        self._removers = [mqtt.after_io(self._after_io), mqtt.on_connect(self._wake),  # (the backlog can move)
                          mqtt.on_disconnect(self._lost_connection.set)]
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Commit and publish what is queued, wait up to 2 s for acks, stop; at most
        ``timeout`` seconds, so that a commit stuck on a disk that does not answer cannot
        hold up the gateway's stop (its readings then are lost with the process, and said)."""
        self._stop_requested.set()
        self._queue.put(_STOP)
        self._room.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a commit: what it commits, and what waits behind it, is lost with the process.
            lost = self._committing
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item.__class__ is list:
                    lost += len(item)
            self.stats["lost_at_shutdown"] += lost
            log.error("the outbox did not finish within %g s (a commit the disk does not answer?): "
                      "%d held reading(s) lost", timeout, lost)
        removers, self._removers = self._removers, []
        for remove in removers:  # (its hooks on the connection go with it)
            remove()

    # -- outbox thread ----------------------------------------------------------------
    def _run(self) -> None:
        next_expiry = 0.0
        stopping = False
        while not stopping:
            self.heartbeat.beat()
            if self._pending and not self._last_store_error:
                # Readings wait for the next commit; meanwhile publish what is committed
                # whenever the window has room.
                self._room.wait(max(0.0, self._last_commit + self._gap - time.monotonic()))
                self._room.clear()
                rows, stopping = self._take(timeout=None)
            else:
                busy = bool(self._pending or self._ready) or (self._backlog_from is not None
                                                              and self.mqtt.connected.is_set())
                rows, stopping = self._take(timeout=0.05 if busy else 0.5)
            try:
                if time.monotonic() >= next_expiry:  # first, so nothing past the bound goes out
                    next_expiry = time.monotonic() + EXPIRY_CHECK
                    self._enforce_bounds()
                self._turn(rows)
            except Exception:  # a bug here must not end storage for good
                self.stats["internal_errors"] += 1
                log.exception("outbox error (survived)")
                time.sleep(0.5)
        self._flush()

    def _take(self, timeout: float | None) -> tuple[list[Row], bool]:
        """What the links queued, up to about MAX_BATCH readings: wait up to ``timeout``
        for the first item (None: do not wait)."""
        rows: list[Row] = []
        stopping = False
        try:
            item = self._queue.get(timeout=timeout) if timeout is not None else self._queue.get_nowait()
            while True:
                if item.__class__ is list:
                    rows += item
                elif item is _STOP:
                    stopping = True
                if len(rows) >= MAX_BATCH:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return rows, stopping

    def _turn(self, rows: list[Row], force: bool = False) -> None:
        """Commit (when due, or ``force``), then publish while the window has room."""
        self._resolve_acks()
        if self._lost_connection.is_set():
            self._lost_connection.clear()
            self.stats["disconnects"] += 1
            if self.settings.qos == 0:
                # paho drops unwritten QoS 0 messages on disconnect: publish them again.
                self._forget_inflight()
        elif self._inflight and self.mqtt.connected.is_set() and time.monotonic() - self._last_ack > STALLED:
            # paho keeps unacknowledged QoS 1 messages and sends them again after a
            # reconnect; should it ever lose them, the window must not stay full for good.
            self.stats["window_stalls"] += 1
            log.warning("%d message(s) unacknowledged for %g s: publishing them again", len(self._inflight), STALLED)
            self._forget_inflight()
        if self._pending:
            rows = self._pending + rows
        if (rows and not force and not self._last_store_error and len(rows) < MAX_BATCH
                and time.monotonic() - self._last_commit < self._gap):
            self._pending = rows  # the next commit takes them
            self._send()
            return
        if not rows and (not self._done or time.monotonic() - self._last_commit < self._ack_flush):
            # Acknowledgements alone are worth a commit (an fsync) only every _ack_flush seconds.
            self._send()
            return
        try:
            first_id = self._commit(rows)
            self._last_commit = time.monotonic()
            self.stats["commits"] += 1
        except sqlite3.Error as exc:
            self._hold(rows, exc)
            return
        if self._last_store_error:
            log.warning("the database takes writes again; %d held reading(s) stored", len(rows))
            self._last_store_error = ""
            self._store_errors_logged = Once()
        if rows:
            self._own_from = first_id if self._own_from is None else self._own_from
            self._last_id = first_id + len(rows) - 1
        self.stats["stored"] += len(rows)
        self._pending = []
        self._done = set()
        self._ready.extend(zip(range(first_id, first_id + len(rows)), rows, strict=True))
        if len(self._ready) > READY_MAX:  # the broker is slower than the Picos: read them back later
            self._rescan_from(self._ready[0][0])
            self._ready.clear()
        self._send()

    def _send(self) -> None:
        """Publish ready readings, then the backlog, while the window has room."""
        with self.mqtt.batch():
            self._send_batch()

    def _send_batch(self) -> None:
        ready = self._ready
        if self.settings.qos == 0:
            self._publish_live_many()
        while ready and len(self._inflight) < WINDOW:
            row_id, row = ready.popleft()
            if not self._publish(row_id, row, live=not taken_earlier(row)):
                if ready:
                    self._rescan_from(ready[0][0])  # not connected: they wait in the database
                    ready.clear()
                return
        if ready or (self._backlog_from is not None and not self._drain_backlog()):
            self._window_full = True

    def _hold(self, rows: list[Row], exc: sqlite3.Error) -> None:
        """The database refused (disk full, read-only): keep readings in memory, bounded."""
        self.stats["store_errors"] += 1
        overflow = len(rows) - self.settings.memory_rows
        if overflow > 0:
            self.stats["dropped_memory_full"] += overflow
            log.error("memory bound reached while the database refuses writes: dropped the %d oldest "
                      "reading(s)", overflow)
            rows = rows[overflow:]
        self._pending = rows
        self._last_store_error = str(exc)
        if self._store_errors_logged.first(str(exc)):
            log.error("cannot write to %s: %s; holding readings in memory (up to %d) and retrying",
                      self.store.path, exc, self.settings.memory_rows)
        self._stop_requested.wait(RETRY_STORE)  # (a stop must not wait out the pause)

    def _commit(self, rows: list[Row]) -> int:
        """``store.commit`` of ``rows`` and the acknowledged ids, counting the rows inside it
        (what a commit stuck on the disk would lose); when the file was replaced, once more
        into the new one. Raises sqlite3.Error as the store does."""
        self._committing = len(rows)
        try:
            try:
                return self.store.commit(rows, self._done)
            except DatabaseReplaced as exc:
                self._moved_to_new_file(exc)  # (forgets the acknowledged ids: they were the old file's)
                return self.store.commit(rows, self._done)
        finally:
            self._committing = 0

    def _moved_to_new_file(self, exc: DatabaseReplaced) -> None:
        """The database file was deleted or replaced, and the store carried the unpublished
        rows into a new one, under new ids: what the outbox knows by id starts over."""
        self.stats["database_replaced"] += 1
        log.error("%s", exc)
        self._inflight.clear()  # (paho may still deliver them: duplicates, at most the window)
        self._done = set()
        self._ready.clear()
        self._backlog_from = 0
        self._own_from, self._last_id = None, 0
        self._marks.clear()
        self._own_expired_until = 0

    def _publish_live_many(self) -> None:
        """QoS 0: ready readings go out as one paho write (``publish_many``), up to the
        window's room; what cannot go now waits in the database."""
        ready = self._ready
        if not ready or not self.mqtt.connected.is_set():
            return  # (the one-by-one path sends them to the database scan)
        row_ids: list[int] = []
        messages: list[tuple[str, str]] = []
        room = WINDOW - len(self._inflight)
        while ready and len(row_ids) < room:
            if taken_earlier(ready[0][1]):
                break  # it needs its time as a property: the one-by-one path sends it, and what follows
            row_id, row = ready.popleft()
            device, metric, value = row[0], row[1], row[2]  # (a row may be longer: gateway/store.py)
            if self.publishes_itself(device):
                self._done.add(row_id)  # its Pico published it already
                continue
            row_ids.append(row_id)
            messages.append((self.topics.sensor(device, metric), format_value(value)))
        if not row_ids:
            return
        try:
            info = self.mqtt.publish_many(messages)
        except ValueError:  # a topic no message may have: set those rows aside, send the rest
            keep = [i for i, (topic, _) in enumerate(messages) if self.mqtt.publishable(topic)]
            for i in sorted(set(range(len(messages))) - set(keep)):
                self._unpublishable(row_ids[i], messages[i][0])
            row_ids, messages = [row_ids[i] for i in keep], [messages[i] for i in keep]
            if not row_ids:
                return
            info = self.mqtt.publish_many(messages)
        if info.rc != paho.MQTT_ERR_SUCCESS:  # the connection dropped just now
            self._rescan_from(row_ids[0])
            ready.clear()
            return
        if not self._inflight:
            self._last_ack = time.monotonic()  # the stall clock starts with the first message out
        for row_id in row_ids:
            self._inflight[row_id] = info
        self.stats["published_live"] += len(row_ids)

    def _publish(self, row_id: int, row: Row, live: bool) -> bool:
        """Hand one reading to paho; False when it could not take it now."""
        device, metric, value, ts = row[0], row[1], row[2], row[3]  # (a row may be longer: gateway/store.py)
        if self.publishes_itself(device):
            self._done.add(row_id)  # its Pico published it already
            return True
        if not self.mqtt.connected.is_set():
            self._rescan_from(row_id)
            return False
        props = None
        if not live:  # a live reading's time is now; a late one says when it was taken
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("ts", str(ts))
        topic = self.topics.sensor(device, metric)
        try:
            info = self.mqtt.publish_message(topic, format_value(value), self.settings.qos, props)
        except ValueError:  # a topic no message may have
            self._unpublishable(row_id, topic)
            return True
        rc = info.rc
        if rc == paho.MQTT_ERR_SUCCESS or (rc == paho.MQTT_ERR_NO_CONN and self.settings.qos > 0):
            # (QoS 1 while the connection just dropped: paho keeps it and sends it on reconnect.)
            if not self._inflight:
                self._last_ack = time.monotonic()  # the stall clock starts with the first message out
            self._inflight[row_id] = info
            self.stats["published_live" if live else "published_backlog"] += 1
            return True
        self._rescan_from(row_id)
        return False

    def _unpublishable(self, row_id: int, topic: str) -> None:
        """A reading whose topic MQTT forbids (a wildcard or NUL in a metric name a link let
        through): it stays in the database, is counted, logged once per topic, and marked
        sent so that it does not hold up the readings behind it."""
        self.stats["unpublishable"] += 1
        self._done.add(row_id)
        if self._unpublishable_logged.first(topic):
            log.error("cannot publish to %r: MQTT forbids + # and NUL in a topic; the reading stays in the "
                      "database (counted as unpublishable)", topic)

    def _rescan_from(self, row_id: int | None) -> None:
        if row_id is None:
            return
        start = row_id - 1
        self._backlog_from = start if self._backlog_from is None else min(self._backlog_from, start)

    def _drain_backlog(self) -> bool:
        """Publish unsent rows from the database while the window has room; True when
        the backlog is done (or cannot move now: not connected)."""
        start = self._backlog_from
        if start is None or not self.mqtt.connected.is_set():
            return True
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return False
        rows = self.store.unsent(start, room)
        position = start
        for row_id, *row in rows:
            # Skip what is out already, or acknowledged but not yet marked sent.
            if row_id in self._inflight or row_id in self._done:
                position = row_id
                continue
            if not self._publish(row_id, tuple(row), live=False):  # type: ignore[arg-type]
                return True  # connection lost: _rescan_from kept the position
            position = row_id
        self._backlog_from = position if len(rows) == room else None
        return self._backlog_from is None

    def _forget_inflight(self) -> None:
        self._rescan_from(min(self._inflight, default=None))
        self._inflight.clear()
        self._last_ack = time.monotonic()

    def _resolve_acks(self) -> None:
        done = [row_id for row_id, info in self._inflight.items() if published(info)]
        if done:
            self._last_ack = time.monotonic()
            for row_id in done:
                if self._inflight.pop(row_id).rc == paho.MQTT_ERR_CONN_LOST:
                    # QoS 0 that a reconnect found unwritten: paho marks it done, but it is not.
                    self._rescan_from(row_id)
                else:
                    self._done.add(row_id)

    def _enforce_bounds(self) -> None:
        s = self.settings
        now = time.monotonic()
        if not self._marks or self._marks[-1][1] != self._last_id:
            self._marks.append((now, self._last_id))
        while self._marks and self._marks[0][0] <= now - s.max_backlog_age_s:
            self._own_expired_until = self._marks.popleft()[1]
        try:
            by_rows, by_age = self.store.expire_unsent(s.max_backlog_rows,
                                                       int((time.time() - s.max_backlog_age_s) * 1000),
                                                       self._own_from, self._own_expired_until)
        except sqlite3.Error as exc:  # the database refuses writes: commits report it, and retry
            if self._store_errors_logged.first(str(exc)):
                log.error("cannot apply the backlog bound to %s: %s", self.store.path, exc)
            return
        self.stats["backlog_expired"] += by_rows + by_age
        if by_rows:
            log.warning("backlog bound reached (store.max_backlog_rows = %d): %d oldest unpublished reading(s) will "
                        "not be published; they stay in the database", s.max_backlog_rows, by_rows)
        if by_age:
            log.warning("backlog bound reached (store.max_backlog_hours = %g): %d unpublished reading(s) stored "
                        "longer ago will not be published; they stay in the database", s.max_backlog_age_s / 3600,
                        by_age)

    def _flush(self, wait: float = 2.0) -> None:
        """At stop: store what is pending, publish what is ready window by window for up
        to ``wait`` seconds, record the acknowledgements. Whatever is left stays unsent in
        the database and goes out at the next start; readings the database still refuses
        are lost, and the log says how many."""
        deadline = time.monotonic() + wait
        try:
            if not self._last_store_error:  # (held readings get one last attempt below, without the pause)
                self._turn([], force=True)
            while (self._ready or self._inflight) and self.mqtt.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)
                self._resolve_acks()
                self._send()
            if self._done or self._pending:
                self._commit(self._pending)
                self.stats["commits"] += 1
                self._pending, self._done = [], set()
        except sqlite3.Error as exc:
            self.stats["lost_at_shutdown"] += len(self._pending)
            log.error("stopping while the database refuses writes (%s): %d held reading(s) lost", exc,
                      len(self._pending))
