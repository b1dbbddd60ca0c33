"""Every reading, in SQLite, and the outbox of what MQTT has not yet taken.

    store = Store("/tmp/readings.db")
    first_id = store.commit([("greenhouse", "temp", 21.5, 1764070000000, 7)])
    store.unsent(first_id - 1, 10)[0][1:4]     # ('greenhouse', 'temp', 21.5)

(History is read by ``pico-gateway readings``, gateway/history.py, over its own
read-only connection.)

Table ``readings(id, device, metric, value REAL, ts INTEGER, seq INTEGER, sent,
boot INTEGER, ts_pico INTEGER)``: ``ts`` in Unix milliseconds (UTC), indexed on
(device, metric, ts, id, value, seq) for "one device's metric over a time range",
read from the index alone. ``boot`` is the
random number a Pico that keeps its readings until they are acknowledged draws at
each boot (docs/protocol.md); such a Pico sends a reading again when it cannot know
it was stored, and the store keeps one row per (device, boot, seq, metric) (a
partial unique index: rows without a boot cost nothing). ``ts_pico`` is 1 when
``ts`` is the Pico's own time of the reading (one it sent late, from its buffer, or an
i2c snapshot read from its ring), 0 when it is the time the gateway received it.
``sent`` is the outbox: 0 until the broker acknowledged the reading's message, then
1; 2 when the backlog bound made the gateway give up publishing it (the reading
stays here). A partial index keeps
the unsent rows cheap to find however big the table grows. Table
``counters(device, name, value)`` keeps the few link counters that count across
runs (gateway/kept_counters.py).

``commit`` returns only after the transaction is durable at the configured
``synchronous`` level (FULL by default): a reading is on disk before it is
published. See docs/reliability.md for what a power cut can cost.

The SQLite connection itself lives in a small child process
(gateway/store_writer.py), so that a SIGBUS from SQLite's memory-mapped WAL index
(the database files made read-only or immutable under a running gateway) ends
that process, not the gateway: the call raises ``WriterDied``, a
``sqlite3.OperationalError`` that says what happened, and the next call starts a
new writer. The writer also notices when the database file is deleted or
replaced under it (``DatabaseReplaced``), and checkpoints and truncates the WAL
after a full disk.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

from gateway import store_writer
from gateway.store_writer import (
    EXPIRED,
    SENT,
    UNSENT,
    id_ranges,
    read_message,
    write_message,
)

__all__ = ["EXPIRED", "SENT", "UNSENT", "DatabaseReplaced", "Row", "Store", "StoreBusy", "StoredRow", "WriterDied",
           "id_ranges"]

log = logging.getLogger("gateway.store")

# (device, metric, value, ts_ms, seq), or with two more: boot, ts_pico (see above)
Row = tuple[str, str, float, int, "int | None"] | tuple[str, str, float, int, "int | None", "int | None", int]
StoredRow = tuple[int, str, str, float, int, "int | None"]  # id + Row

_WRITER = str(Path(store_writer.__file__).resolve())
_CLOSE_WAIT = 10.0  # seconds for a writer whose pipes broke to exit before it is killed
_CLOSE_LOCK = 0.5  # seconds close() waits for a request in progress (a disk that does not answer)
_EXIT_WAIT = 1.0  # seconds close() waits for the writer's exit (its last checkpoint), then leaves it to finish


class WriterDied(sqlite3.OperationalError):
    """The writer process ended during a request; the request may or may not have been done."""


class StoreBusy(sqlite3.OperationalError):
    """A request that may wait only so long found the writer still busy with another
    (a commit the disk does not answer): nothing was done."""


class DatabaseReplaced(sqlite3.DatabaseError):
    """The database file was deleted or replaced; the store now writes to the file at
    its path, with the unpublished rows carried over under new ids. The request was not done."""


def _death(code: int) -> str:
    if code == -signal.SIGBUS:
        return ("the database writer process was killed by SIGBUS: the filesystem refused a write into "
                "SQLite's memory-mapped WAL index (-shm): the database files are read-only or immutable, "
                "or the filesystem is full or failing")
    if code < 0:
        return f"the database writer process was killed by {signal.Signals(-code).name}"
    return f"the database writer process exited with code {code}"


class Store:
    def __init__(self, path: str | Path, synchronous: Literal["full", "normal"] = "full") -> None:
        self.path = Path(path)
        # Told after every commit what is on disk now: (rows stored, rows refused as already
        # stored); called on the committing thread, so it must not block.
        self.on_stored: Callable[[list[Row], list[Row]], None] | None = None
        self.duplicates_refused = 0
        self._hook_failed = False
        self.synchronous = synchronous
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer_starts = 0
        # One writer process, one request at a time: the outbox thread writes, others read.
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        with self._lock:
            self._start()
        self._say_if_old_series_index()

    def _say_if_old_series_index(self) -> None:
        """A database from before ``readings_series``, too large for the writer to build it
        at open (gateway/store_writer.py), keeps its older index: said once, with the fix."""
        try:
            with closing(sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
                names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        except sqlite3.Error:
            return
        if store_writer.OLD_SERIES_INDEX in names and "readings_series" not in names:
            log.warning("%s keeps its older (device, metric, ts) index: `readings` of a long range reads slower "
                        "(a day of one metric: about 5x). To build the one that covers it, stop the gateway and "
                        "run: sqlite3 %s 'DROP INDEX %s; %s' (a few minutes for tens of millions of readings)",
                        self.path, self.path, store_writer.OLD_SERIES_INDEX, store_writer.SERIES_INDEX)

    def _start(self) -> None:
        proc = subprocess.Popen([sys.executable, "-I", "-S", _WRITER, str(self.path), self.synchronous],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.writer_starts += 1
        self._proc = proc
        try:
            self._answer(proc)  # it answers once it has the database open
        except sqlite3.Error:
            if self._proc is proc:  # it could not open the database, and exits: reap it
                self._died(proc)
            raise

    def _answer(self, proc: subprocess.Popen[bytes]) -> Any:
        assert proc.stdout is not None
        try:
            answer = read_message(proc.stdout)
        except (EOFError, OSError, ValueError):
            raise self._died(proc) from None
        if answer[0] == "ok":
            return answer[1]
        if answer[0] == "replaced":
            raise DatabaseReplaced(answer[1])
        error = getattr(sqlite3, answer[1], None)
        if not (isinstance(error, type) and issubclass(error, sqlite3.Error)):
            error = sqlite3.Error
        raise error(answer[2])

    def _died(self, proc: subprocess.Popen[bytes]) -> WriterDied:
        self._proc = None
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            code = proc.wait(_CLOSE_WAIT)
        except subprocess.TimeoutExpired:  # its pipes broke but it lives on: end it
            proc.kill()
            code = proc.wait()
        return WriterDied(_death(code))

    def _call(self, op: str, *args: object, wait: float | None = None) -> Any:
        """One request to the writer; ``wait``: seconds to wait for a request in progress
        (None: as long as it takes), StoreBusy after that."""
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise StoreBusy(f"the database writer has been busy with one request for over {wait:g} s")
        try:
            if self._proc is None:
                self._start()
            proc = self._proc
            assert proc is not None and proc.stdin is not None
            try:
                write_message(proc.stdin, (op, *args))
            except (OSError, ValueError):
                raise self._died(proc) from None
            return self._answer(proc)
        finally:
            self._lock.release()

    def commit(self, rows: list[Row], sent_ids: Iterable[int] = ()) -> int:
        """Insert ``rows`` as unsent and mark ``sent_ids`` sent, in one transaction.

        Returns the id of the first inserted row (the others follow it, in order:
        this store is the only writer). Rows with a boot (7-tuples) that are stored
        already, or that repeat an earlier row of this call, are refused: taken out of
        ``rows`` (a list), counted in ``duplicates_refused``, and the first id is that of
        the first row left. Raises sqlite3.Error (disk full, read-only
        file) with nothing changed; ``WriterDied`` when the writer process died
        (the transaction may have been stored: at most this one is stored twice
        when retried); ``DatabaseReplaced`` (nothing changed) when the file was
        deleted or replaced and the store moved on to a new one.
        """
        batch = list(rows)
        first, refused = self._call("commit", batch, list(sent_ids))
        dropped: list[Row] = []
        if refused:
            self.duplicates_refused += len(refused)
            for i in reversed(refused):
                dropped.append(rows.pop(i))
            dropped.reverse()
        if self.on_stored is not None:
            try:
                self.on_stored(rows if refused else batch, dropped)
            except Exception:  # the commit stands; a broken listener must not look like a failed one
                if not self._hook_failed:
                    self._hook_failed = True
                    log.exception("error in a listener told of stored readings (logged once)")
        return first

    def record(self, rows: Sequence[Row]) -> None:
        """Insert rows that need no publishing (a recorder's: the broker has them), as sent."""
        try:
            self._call("record", list(rows))
        except DatabaseReplaced as exc:
            log.error("%s", exc)
            self._call("record", list(rows))

    def unsent(self, after_id: int, limit: int) -> list[StoredRow]:
        """The oldest unsent readings with ``id > after_id``, in id order."""
        return self._call("unsent", after_id, limit)

    def count_unsent_by_device(self, wait: float | None = None) -> dict[str, int]:
        """Unsent readings per device; ``wait``: see StoreBusy (diagnostics must not hang
        behind a commit that the disk does not answer)."""
        return dict(self._call("count_unsent_by_device", wait=wait))

    def expire_unsent(self, keep_rows: int, older_than_ms: int, own_from_id: int | None = None,
                      own_until_id: int = 0) -> tuple[int, int]:
        """Give up publishing the oldest unsent readings beyond ``keep_rows`` (first
        count), and those too old (second count); they stay in the table (sent = 2).

        Age: rows from ``own_from_id`` on were stored by the caller, which knows
        their age by its monotonic clock: those up to ``own_until_id`` are too old.
        Older rows (from an earlier run), and all when ``own_from_id`` is None, are
        too old when their ``ts`` is before ``older_than_ms``.
        """
        by_rows, by_age = self._call("expire_unsent", keep_rows, older_than_ms,
                                     own_from_id if own_from_id is not None else 1 << 62, own_until_id)
        return by_rows, by_age

    def size(self, wait: float | None = None) -> int:
        """Bytes of the database's pages in use (free pages left by deletions not counted);
        ``wait``: see StoreBusy."""
        pages, free, page_size = self._call("size", wait=wait)
        return int((pages - free) * page_size)

    @property
    def writer_pid(self) -> int | None:
        """The database writer process's pid, while one runs (its disk writes are the
        gateway's: gateway/disk_budget.py)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def counters(self, wait: float | None = None) -> dict[tuple[str, str], int]:
        """The counters kept across runs, by (device, name): see gateway/kept_counters.py."""
        return {(device, name): value for device, name, value in self._call("counters", wait=wait)}

    def keep_counters(self, values: dict[tuple[str, str], int], wait: float | None = None) -> None:
        """Store these counters' values (replacing what was kept for each), in one transaction."""
        self._call("keep_counters", [(device, name, value) for (device, name), value in values.items()], wait=wait)

    def _set_fault(self, pragma: str, value: int) -> None:
        """For tests: ``("max_page_count", 0)`` makes SQLite refuse to grow the file (a full
        disk), ``("query_only", 1)`` refuses writes; ``max_page_count`` 1073741823 and
        ``query_only`` 0 end the fault."""
        self._call("set_fault", pragma, value)

    def close(self) -> None:
        """Let the writer finish and exit (it checkpoints the WAL on its way out), in about
        two seconds at most, so that a disk that does not answer cannot hold up the
        gateway's stop: a writer still inside a request after _CLOSE_LOCK is killed (SQLite
        rolls its transaction back), one still checkpointing after _EXIT_WAIT is left to
        finish on its own (it has its end of file)."""
        locked = self._lock.acquire(timeout=_CLOSE_LOCK)
        try:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            assert proc.stdin is not None and proc.stdout is not None
            if not locked:
                log.error("the database writer is still inside a request after %g s (a disk that does not "
                          "answer?): ending it; its transaction is rolled back", _CLOSE_LOCK)
                proc.kill()
                return
            try:
                write_message(proc.stdin, ("close",))
                proc.stdin.close()
            except (OSError, ValueError):
                pass  # it died: nothing left to close
            try:
                proc.wait(_EXIT_WAIT)
            except subprocess.TimeoutExpired:  # (its answer pipe stays open: it may still write to it)
                log.warning("the database writer is still finishing after %g s; leaving it to end by itself",
                            _EXIT_WAIT)
            else:
                proc.stdout.close()
        finally:
            if locked:
                self._lock.release()
