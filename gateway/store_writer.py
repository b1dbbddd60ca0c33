"""The process that holds the gateway's SQLite connection (run by gateway/store.py).

Why a process of its own: in WAL mode SQLite memory-maps the WAL index
(``readings.db-shm``). When the filesystem cannot back a write into a mapped page
(the files made immutable or read-only under a running gateway, some full or
failing filesystems) the kernel answers with SIGBUS, which no Python code can
catch: the process dies on the spot. Here it is only this small process that
dies; the gateway notices, holds its readings in memory and starts a new writer
at its next attempt.

It is run as ``python -I -S store_writer.py PATH SYNCHRONOUS`` (standard library
only, no site packages: about 10 MB of memory), reads requests on stdin and
answers on stdout, one at a time, each a marshal-encoded tuple behind a 4-byte
length. It ignores SIGTERM and SIGINT (a service manager signals the whole
process group; the gateway still needs its writer to store what it holds while
it stops) and exits when its stdin closes, which is also what happens when the
gateway dies.

Requests ``(op, *args)``; answers ``("ok", result)``, ``("error", kind, message)``
with ``kind`` an ``sqlite3`` exception class name, or ``("replaced", message)``
when the database file was deleted or replaced under it: it then has opened a
new file at the path, carrying over the unpublished rows, and did not do the
request.
"""

from __future__ import annotations

import marshal
import os
import signal
import sqlite3
import struct
import sys
import time
from collections.abc import Callable
from typing import IO, Any

UNSENT, SENT, EXPIRED = 0, 1, 2
INSERT = "INSERT INTO readings (device, metric, value, ts, seq, sent) VALUES (?, ?, ?, ?, ?, 0)"
INSERT_SENT = INSERT.replace("?, 0)", f"?, {SENT})")
# A row that names its Pico's boot (a 7-tuple: ... seq, boot, ts_pico) may be sent again by
# that Pico (docs/protocol.md, acknowledged readings): it is stored once per (device, boot,
# seq, metric), the unique index readings_once.
INSERT_BOOT = ("INSERT INTO readings (device, metric, value, ts, seq, boot, ts_pico, sent) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, 0)")
INSERT_BOOT_IGNORE = INSERT_BOOT.replace("INSERT", "INSERT OR IGNORE", 1)
FIND_STORED = "SELECT seq, metric FROM readings WHERE device = ? AND boot = ? AND seq BETWEEN ? AND ?"
# The WAL's bound: SQLite checkpoints it every WAL_PAGES pages (its default, 4 MiB at 4 KiB
# pages), and cuts it back to that size after a checkpoint (journal_size_limit; unbounded by
# default). On a nearly full filesystem the bound shrinks to an eighth of the free space (down
# to MIN_WAL_PAGES): a WAL that took the last free bytes would leave a checkpoint no room to
# grow the database into, and storing would stall for good. Checked at most every
# FREE_SPACE_CHECK seconds (one statvfs). A smaller bound costs more checkpoints (measured in
# docs/reliability.md), so it is only paid where the space is short.
WAL_PAGES = 1000
MIN_WAL_PAGES = 16
FREE_SPACE_CHECK = 1.0
# One device's metric over a time range, read from this index alone (it covers the columns
# ``readings`` prints, in its order: ts, then id): a day of one metric is 86,400 rows, and
# looking each up in the table took most of a one-day query's time on a month of 16 devices.
SERIES_INDEX = ('CREATE INDEX IF NOT EXISTS "readings_series" ON "readings" '
                '("device", "metric", "ts", "id", "value", "seq")')
SCHEMA = [
    ('CREATE TABLE IF NOT EXISTS "readings" ("id" INTEGER PRIMARY KEY, "device" TEXT NOT NULL, '
     '"metric" TEXT NOT NULL, "value" REAL NOT NULL, "ts" INTEGER NOT NULL, "seq" INTEGER, '
     '"sent" INTEGER NOT NULL DEFAULT 1, "boot" INTEGER, "ts_pico" INTEGER NOT NULL DEFAULT 0)'),
    SERIES_INDEX,
    "CREATE INDEX IF NOT EXISTS readings_unsent ON readings(id) WHERE sent = 0",
    # A reading a Pico sent again is refused (docs/protocol.md, acknowledged readings). Partial:
    # rows without a boot (older firmware, the tutorial's programs, other links) cost nothing.
    "CREATE UNIQUE INDEX IF NOT EXISTS readings_once ON readings(device, boot, seq, metric) WHERE boot IS NOT NULL",
    # Counters that outlive a run (gateway/kept_counters.py): one row per device and counter.
    ('CREATE TABLE IF NOT EXISTS "counters" ("device" TEXT NOT NULL, "name" TEXT NOT NULL, '
     '"value" INTEGER NOT NULL, PRIMARY KEY ("device", "name")) WITHOUT ROWID'),
]
_HEADER = struct.Struct("<I")
OLD_SERIES_INDEX = "idx_readings_device_metric_ts"  # (device, metric, ts): readings_series before it covered
MIGRATE_ROWS = 2_000_000  # a database up to this many rows gets readings_series at open (seconds here)


def _keeps_old_series_index(conn: sqlite3.Connection, columns: set[str]) -> bool:
    """A database from before readings_series: its old index is replaced by it when that
    takes seconds (up to MIGRATE_ROWS rows); a larger one keeps its old index (every query
    still works, a long range is slower) rather than hold the gateway's start for minutes
    building the new one. True when the old one stays."""
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(readings)")} if columns else set()
    if OLD_SERIES_INDEX not in indexes:
        return False
    span = conn.execute("SELECT max(id) - min(id) FROM readings").fetchone()[0] or 0
    if span > MIGRATE_ROWS:
        return True
    conn.execute(f'DROP INDEX "{OLD_SERIES_INDEX}"')
    return False


def read_message(stream: IO[bytes]) -> Any:
    """One framed message; EOFError when the other side closed."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        raise EOFError
    return marshal.loads(body)


def write_message(stream: IO[bytes], message: Any) -> None:
    body = marshal.dumps(message)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def id_ranges(ids: list[int]) -> list[tuple[int, int]]:
    """[3, 1, 2, 7] -> [(1, 3), (7, 7)]: acknowledgements mostly come in runs."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        elif not out or i != out[-1][1]:
            out.append((i, i))
    return out


DELETED = "was deleted"


class FileChanged(Exception):
    """The path no longer names the file this connection has open."""


class Writer:
    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None
        self._conn, self.identity = self._open()
        self.stale = False  # reopen before the next request
        # After the file was deleted or replaced: the unpublished rows to carry into the new
        # file, how many rows the lost one held, and why; conn is None until the new one is open.
        self.carry: list[tuple] = []
        self.lost: int | None = None
        self.reason = ""

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        conn = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(readings)")}
        with conn:
            conn.execute("BEGIN")
            if columns and "sent" not in columns:
                # Rows from before the outbox existed count as sent: never replay history.
                conn.execute(f'ALTER TABLE readings ADD COLUMN "sent" INTEGER NOT NULL DEFAULT {SENT}')
            if columns and "boot" not in columns:
                # Older rows have no boot: none of them is ever taken for a duplicate.
                conn.execute('ALTER TABLE readings ADD COLUMN "boot" INTEGER')
                conn.execute('ALTER TABLE readings ADD COLUMN "ts_pico" INTEGER NOT NULL DEFAULT 0')
            keep_old_index = _keeps_old_series_index(conn, columns)
            for statement in SCHEMA:
                if not (keep_old_index and statement is SERIES_INDEX):
                    conn.execute(statement)
        st = os.stat(self.path)  # (the file exists now: the schema is in it)
        self.wal_pages = 0  # (a new connection: fit_wal_to_free_space sets its bound)
        self.next_space_check = 0.0
        return conn, (st.st_dev, st.st_ino)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError(f"{self.path} {self.reason}; a new file is not open yet")
        return self._conn

    @property
    def opened(self) -> bool:
        return self._conn is not None

    def fit_wal_to_free_space(self) -> None:
        now = time.monotonic()
        if now < self.next_space_check:
            return
        self.next_space_check = now + FREE_SPACE_CHECK
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 1 << 62
        pages = max(MIN_WAL_PAGES, min(WAL_PAGES, free // 8 // page_size))
        if pages != self.wal_pages:
            self.wal_pages = pages
            self.conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            self.conn.execute(f"PRAGMA journal_size_limit={pages * page_size}")

    def check_identity(self) -> None:
        """Raise FileChanged when ``path`` was deleted, or now names another file (or a
        new one could not be opened yet). One stat per commit: far cheaper than the
        commit's fsync."""
        if self._conn is None:
            raise FileChanged(self.reason)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FileChanged(DELETED) from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise FileChanged("was replaced by another file")

    def switch(self, reason: str, sent_ranges: list[tuple[int, int]]) -> str:
        """Carry the unpublished rows of the open (deleted or replaced) file into the file
        now at ``path`` (a new one if there is none), and go on with that. When opening it
        fails, the rows wait here and the next commit tries again."""
        if self._conn is not None:
            done = {i for lo, hi in sent_ranges for i in range(lo, hi + 1)}  # acknowledged: not carried
            try:
                self.carry = [row[1:] for row in self.conn.execute(
                    "SELECT id, device, metric, value, ts, seq, boot, ts_pico FROM readings WHERE sent = 0 "
                    "ORDER BY id") if row[0] not in done]
                self.lost = self.conn.execute("SELECT count(*) FROM readings").fetchone()[0]
            except sqlite3.Error:
                self.carry, self.lost = [], None
            # Closing checkpoints into the old file and removes its -wal and -shm beside
            # the path, unless a reader still has them open: a new file there must not
            # find (and replay) them.
            self.conn.close()
            self._conn = None
            self.reason = reason
            if reason == DELETED:
                for suffix in ("-wal", "-shm"):
                    try:
                        os.unlink(self.path + suffix)
                    except FileNotFoundError:
                        pass
        conn, identity = self._open()
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(INSERT_BOOT_IGNORE, self.carry)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn, self.identity = conn, identity
        held = "an unknown number of" if self.lost is None else f"the {self.lost}"
        carried, self.carry = len(self.carry), []
        return (f"the database file {self.path} {self.reason} while the gateway was running: {held} reading(s) "
                f"it held are gone with it (history included); carried its {carried} unpublished reading(s) "
                f"into the file now at that path, and carrying on there")

    # -- requests ------------------------------------------------------------------------
    def commit(self, rows: list[tuple], sent_ids: list[int]) -> tuple[int, list[int]]:
        """(id of the first row stored, indexes in ``rows`` of those refused as duplicates):
        the stored rows have ids from the first on, in order."""
        self.check_identity()
        self.fit_wal_to_free_space()
        conn = self.conn
        with conn:
            conn.execute("BEGIN")
            refused: list[int] = []
            if all(len(row) == 5 for row in rows):  # (the usual case: nothing that can come twice)
                conn.executemany(INSERT, rows)
                stored = len(rows)
            else:
                # Readings sent again are rare: insert them all, and only when the unique
                # index refuses one find out which are stored already (looking them up at
                # every commit cost 1 µs a reading, a tenth of the gateway's CPU per reading:
                # docs/performance.md, ack cost).
                kept = rows if all(len(row) == 7 for row in rows) else [
                    row if len(row) == 7 else (*row, None, 0) for row in rows]
                try:
                    conn.executemany(INSERT_BOOT, kept)
                except sqlite3.IntegrityError:  # (not INSERT OR IGNORE, nor a savepoint: both cost more)
                    conn.rollback()  # (the transaction is this request's alone: begin it again)
                    conn.execute("BEGIN")
                    refused = self._duplicates(rows)
                    skip = set(refused)
                    kept = [row for i, row in enumerate(kept) if i not in skip]
                    conn.executemany(INSERT_BOOT, kept)
                stored = len(kept)
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            ranges = id_ranges(sent_ids)
            if ranges:
                conn.executemany("UPDATE readings SET sent = 1 WHERE id BETWEEN ? AND ?", ranges)
        return last - stored + 1, refused

    def _duplicates(self, rows: list[tuple]) -> list[int]:
        """Indexes of the rows with a boot that are stored already, or repeat an earlier row
        of this batch: one indexed range query per (device, boot) of the batch."""
        spans: dict[tuple[str, int], list[int]] = {}
        for row in rows:
            if len(row) > 5 and row[5] is not None and row[4] is not None:
                span = spans.get((row[0], row[5]))
                if span is None:
                    spans[(row[0], row[5])] = [row[4], row[4]]
                else:
                    span[0], span[1] = min(span[0], row[4]), max(span[1], row[4])
        seen: set[tuple[str, int, int, str]] = set()
        for (device, boot), (low, high) in spans.items():
            seen.update((device, boot, seq, metric)
                        for seq, metric in self.conn.execute(FIND_STORED, (device, boot, low, high)))
        refused = []
        for i, row in enumerate(rows):
            if len(row) > 5 and row[5] is not None and row[4] is not None:
                key = (row[0], row[5], row[4], row[1])
                if key in seen:
                    refused.append(i)
                else:
                    seen.add(key)
        return refused

    def record(self, rows: list[tuple]) -> None:
        self.check_identity()
        self.fit_wal_to_free_space()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(INSERT_SENT, rows)

    def unsent(self, after_id: int, limit: int) -> list[tuple]:
        return self.conn.execute("SELECT id, device, metric, value, ts, seq FROM readings WHERE sent = 0 AND id > ? "
                                 "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def count_unsent_by_device(self) -> list[tuple[str, int]]:
        return self.conn.execute("SELECT device, count(*) FROM readings WHERE sent = 0 GROUP BY device").fetchall()

    def expire_unsent(self, keep_rows: int, older_than_ms: int, own_from_id: int, own_until_id: int) -> tuple[int, int]:
        """(by count, by age): see Store.expire_unsent."""
        with self.conn:
            self.conn.execute("BEGIN")
            by_rows = self.conn.execute(
                "UPDATE readings SET sent = 2 WHERE sent = 0 AND id <= "
                "(SELECT id FROM readings WHERE sent = 0 ORDER BY id DESC LIMIT 1 OFFSET ?)", (keep_rows,)).rowcount
            by_age = self.conn.execute(
                "UPDATE readings SET sent = 2 WHERE sent = 0 AND (id <= ? OR (id < ? AND ts < ?))",
                (own_until_id, own_from_id, older_than_ms)).rowcount
        return by_rows, by_age

    def size(self) -> tuple[int, int, int]:
        """(page_count, freelist_count, page_size): the pages in use are the database's size."""
        conn = self.conn
        return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0]
                     for name in ("page_count", "freelist_count", "page_size"))

    def counters(self) -> list[tuple[str, str, int]]:
        return self.conn.execute('SELECT device, name, value FROM counters').fetchall()

    def keep_counters(self, rows: list[tuple[str, str, int]]) -> None:
        self.check_identity()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR REPLACE INTO counters (device, name, value) VALUES (?, ?, ?)", rows)

    def reopen_if_stale(self) -> None:
        if self.stale and self._conn is not None:
            self.conn.close()
            self._conn, self.identity = self._open()
            self.stale = False

    def set_fault(self, pragma: str, value: int) -> None:
        """For tests: make SQLite itself refuse writes (max_page_count: SQLITE_FULL exactly
        as a full disk; query_only: SQLITE_READONLY)."""
        if pragma not in ("max_page_count", "query_only"):
            raise sqlite3.ProgrammingError(f"not a fault pragma: {pragma}")
        if pragma == "max_page_count" and value == 0:
            value = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA {pragma} = {int(value)}")

    def after_error(self, exc: sqlite3.Error) -> None:
        """Read-only: SQLite falls back to a read-only connection when it cannot open
        the file for writing, and stays so: the next request opens it again.
        A full disk: the WAL holds pages that a checkpoint can move into the database,
        and truncating it gives its space back (SQLite reuses a WAL only after a
        checkpoint, and checkpoints on its own only after a commit succeeds)."""
        if self._conn is None:
            return
        if self.conn.in_transaction:
            try:
                self.conn.rollback()
            except sqlite3.Error:
                pass
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_READONLY and not self.conn.execute("PRAGMA query_only").fetchone()[0]:
            self.stale = True
        elif code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # still full, or a reader holds the WAL: the next attempt tries again


def serve(writer: Writer, requests: IO[bytes], answers: IO[bytes]) -> None:
    handlers: dict[str, Callable[..., Any]] = {
        "commit": writer.commit, "record": writer.record, "unsent": writer.unsent,
        "count_unsent_by_device": writer.count_unsent_by_device, "expire_unsent": writer.expire_unsent,
        "counters": writer.counters, "keep_counters": writer.keep_counters, "set_fault": writer.set_fault,
        "size": writer.size}
    while True:
        try:
            op, *args = read_message(requests)
        except EOFError:
            return
        if op == "close":
            if writer.opened:
                writer.conn.close()
            write_message(answers, ("ok", None))
            return
        try:
            writer.reopen_if_stale()
            answer: tuple = ("ok", handlers[op](*args))
        except FileChanged as exc:
            try:
                answer = ("replaced", writer.switch(str(exc), id_ranges(args[1]) if op == "commit" else []))
            except sqlite3.Error as err:
                answer = ("error", type(err).__name__, f"{writer.path} {exc}, and opening a new one failed: {err}")
        except sqlite3.Error as exc:
            writer.after_error(exc)
            answer = ("error", type(exc).__name__, str(exc))
        write_message(answers, answer)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not break the protocol
    requests = sys.stdin.buffer
    path, synchronous = argv
    try:
        writer = Writer(path, synchronous)
    except sqlite3.Error as exc:
        write_message(answers, ("error", type(exc).__name__, str(exc)))
        return 1
    except OSError as exc:
        write_message(answers, ("error", "OperationalError", str(exc)))
        return 1
    write_message(answers, ("ok", None))
    serve(writer, requests, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
