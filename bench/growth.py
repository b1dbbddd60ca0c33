"""Growth: does the ingest cost per reading stay flat with more devices and a big database?

The same ingest measurement with 1, 4, 16, 64 links, on an empty database and on
a copy of one already holding millions of readings. That one is generated once
with a recursive CTE into the gateway's own schema (indexes created after the
insert, which is much faster) and cached in bench/cache/, keyed by row count
and a hash of the schema, so a schema change makes a new one.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import ingest
from common import METRIC, REPO, Env

CACHE = REPO / "bench" / "cache"
DEVICES = 64  # the pre-existing rows are spread over d00..d63, the names the runs use


def prefilled_db(env: Env, rows: int) -> Path:
    """A database in the gateway's schema with ``rows`` readings older than now (cached)."""
    schema_db = env.tempdir("schema") / "schema.db"
    env.source.create_store(schema_db)
    with sqlite3.connect(schema_db) as conn:
        ddl = [sql for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'readings' AND sql IS NOT NULL ORDER BY type DESC, name")]
        indexes = [(name, sql) for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'readings' AND sql IS NOT NULL")]
    key = hashlib.sha1("\n".join(ddl).encode()).hexdigest()[:10]
    path = CACHE / f"readings-{rows}-{key}.db"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    partial.write_bytes(schema_db.read_bytes())
    started = time.monotonic()
    print(f"bench: generating {rows:,} readings into {path} (once; cached)...", flush=True)
    conn = sqlite3.connect(partial, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    start_ms = time.time_ns() // 1_000_000 - 86_400_000 * 365  # a year ago, one row per 10 ms per device
    conn.execute(
        "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
        "INSERT INTO readings (device, metric, value, ts, seq) "
        "SELECT printf('d%02d', i % ?), ?, (i / ?) * 0.01, ? + (i / ?) * 10, i / ? FROM c",
        (rows - 1, DEVICES, METRIC, DEVICES, start_ms, DEVICES, DEVICES))
    for _, sql in indexes:
        conn.execute(sql)
    conn.execute("PRAGMA journal_mode=WAL")  # what the gateway's Store sets, persistently
    conn.close()
    partial.rename(path)
    print(f"bench: generated in {time.monotonic() - started:.0f} s ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    return path


def run(env: Env, links: int, prefilled: Path | None) -> dict:
    return ingest.run(env, links, db_template=prefilled)
