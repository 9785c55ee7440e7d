"""The SDK's write-ahead log: an SQLite file holding spans the appliance has not acknowledged yet.

Rows are written when the appliance is unreachable (or answers 5xx/429), when the
in-memory queue is full, at exit for whatever could not be sent in time, and when a
later process adopts the spill file of one that was killed. A row is deleted only
after the appliance answered 202 for the batch that carried it (or rejected it for good).
`attempts` counts the answers that blamed the row's batch (a server error); past a
bound the sender isolates the culprit and moves it to the dead-letter file.

Dead letters live in a second SQLite file next to the WAL (`spans-wal.dead.sqlite3`
beside `spans-wal.sqlite3`), not in a table of the WAL: it is what an operator
inspects, copies or deletes (`llm-observe wal list|replay|purge`) while applications
keep writing the WAL, it never counts against the WAL's row cap, and purging it
is deleting a file. A row is inserted there (committed with synchronous=FULL) before
it is deleted from the WAL, so a crash in between leaves it in both, never in neither;
the dead file keeps one row per (destination, span_id).

Several processes may share one file (gunicorn workers, a restarted process): a
process *leases* the oldest rows before posting them, so two processes do not
send the same rows at the same time; a lease ends when it expires or when its
owner process is gone. Should a row be sent twice anyway (a crash between the
202 and the delete), the appliance stores a span_id once, so the outcome is
still exactly one stored span.

journal_mode=WAL; appends commit with synchronous=FULL, so a written row survives a
power cut; leases and deletes commit without fsync (losing one only causes a re-send).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("instrumentation_sdk")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT NOT NULL,
    span_id TEXT,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spans_dest_id ON spans (dest, id);
"""

_DEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT NOT NULL,
    span_id TEXT,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    dead_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_dest_span ON dead (dest, span_id);
"""


class WalRow(NamedTuple):
    id: int
    span_id: str | None
    body: bytes
    attempts: int


def dead_letter_path(wal_path: str | os.PathLike) -> Path:
    """`spans-wal.sqlite3` -> `spans-wal.dead.sqlite3` (same folder, same permissions)."""
    path = Path(wal_path)
    return path.with_name(f"{path.stem}.dead{path.suffix}") if path.suffix else path.with_name(f"{path.name}.dead")


def _open_private(path: Path, schema: str) -> sqlite3.Connection:
    """An SQLite connection in WAL journal mode on an owner-only file (prompts live here)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = not path.exists()
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    if fresh:
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.executescript(schema)
    return conn

_HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


class WriteAheadLog:
    def __init__(self, path: str | os.PathLike, *, max_rows: int = 1_000_000) -> None:
        self.path = Path(path)
        self.dead_path = dead_letter_path(self.path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._dead: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.dropped = 0

    # -- connection ---------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists()

    def _durability(self, conn: sqlite3.Connection, level: str) -> None:
        # Appends must survive a power cut (FULL). Leases and deletes need not: a lost delete
        # means a re-send, which the appliance deduplicates by span_id; a lost lease expires.
        if self._sync != level:
            conn.execute(f"PRAGMA synchronous={level}")
            self._sync = level

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._pid != os.getpid():  # forked: the parent's connection must not be touched
            self._conn, self._dead, self._pid = None, None, os.getpid()
            self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        conn = _open_private(self.path, _SCHEMA)
        self._sync = "FULL"
        self._conn = conn
        return conn

    def _dead_conn(self) -> sqlite3.Connection:
        if self._dead is None or self._pid != os.getpid():
            self._connect()
            self._dead = _open_private(self.dead_path, _DEAD_SCHEMA)
        return self._dead

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._conn = None
        self._dead = None
        self._pid = os.getpid()
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def close(self) -> None:
        with self._lock:
            for conn in (self._conn, self._dead):
                if conn is not None and self._pid == os.getpid():
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
            self._conn = self._dead = None

    # -- writes -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, durability: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock (BEGIN IMMEDIATE: other processes wait, never fail later)."""
        with self._lock:
            conn = self._connect()
            self._durability(conn, durability)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def append(self, dest: str, rows: list[tuple[str | None, bytes]], *, attempts: int = 0) -> None:
        """Add rows (span_id, JSON body) in order, in one transaction."""
        if not rows:
            return
        now = time.time()
        with self._transaction("FULL") as conn:
            conn.executemany("INSERT INTO spans (dest, span_id, body, created, attempts) VALUES (?, ?, ?, ?, ?)",
                             [(dest, sid, body, now, attempts) for sid, body in rows])
            self._enforce_cap(conn)

    def _enforce_cap(self, conn: sqlite3.Connection) -> None:
        lo, hi = conn.execute("SELECT min(id), max(id) FROM spans").fetchone()
        if lo is None or hi - lo + 1 <= self.max_rows:
            return
        total = conn.execute("SELECT count(*) FROM spans").fetchone()[0]
        excess = total - self.max_rows
        if excess > 0:
            conn.execute("DELETE FROM spans WHERE id IN (SELECT id FROM spans ORDER BY id LIMIT ?)", (excess,))
            self.dropped += excess
            log.warning("llm-observe: the span WAL %s is over %d rows; dropped the %d oldest", self.path,
                        self.max_rows, excess)

    def claim(self, dest: str, *, limit: int, max_bytes: int, lease_seconds: float) -> list[WalRow]:
        """Lease the oldest unleased rows of `dest` (at most `limit` rows / `max_bytes`)."""
        now = time.time()
        with self._transaction("NORMAL") as conn:
            rows = conn.execute(
                "SELECT id, span_id, body, attempts FROM spans WHERE dest = ? AND lease_until < ? ORDER BY id LIMIT ?",
                (dest, now, limit)).fetchall()
            picked, size = [], 0
            for row in rows:
                if picked and size + len(row[2]) > max_bytes:
                    break
                picked.append(WalRow(*row))
                size += len(row[2]) + 1
            if picked:
                conn.executemany("UPDATE spans SET lease_owner = ?, lease_until = ? WHERE id = ?",
                                 [(self.owner, now + lease_seconds, row.id) for row in picked])
        return picked

    def blame(self, ids: list[int]) -> None:
        """The appliance answered these rows' batch with a server error: one more attempt counted."""
        if ids:
            with self._transaction("NORMAL") as conn:
                conn.executemany("UPDATE spans SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in ids])

    def bury(self, dest: str, rows: list[tuple[WalRow, str]]) -> None:
        """Move rows (with the reason) from the WAL to the dead-letter file: inserted there first."""
        if not rows:
            return
        now = time.time()
        with self._lock:
            dead = self._dead_conn()
            dead.execute("BEGIN IMMEDIATE")
            try:
                dead.executemany(
                    "INSERT OR REPLACE INTO dead (dest, span_id, body, reason, attempts, created, dead_at) "
                    "SELECT ?, ?, ?, ?, ?, coalesce((SELECT created FROM dead WHERE dest = ? AND span_id = ?), ?), ?",
                    [(dest, row.span_id, row.body, reason, row.attempts, dest, row.span_id, now, now)
                     for row, reason in rows])
                dead.execute("COMMIT")
            except BaseException:
                dead.execute("ROLLBACK")
                raise
        self.delete([row.id for row, _ in rows])

    def delete(self, ids: list[int]) -> None:
        if ids:
            with self._transaction("NORMAL") as conn:
                conn.executemany("DELETE FROM spans WHERE id = ?", [(i,) for i in ids])

    def release(self, ids: list[int]) -> None:
        if ids:
            with self._transaction("NORMAL") as conn:
                conn.executemany("UPDATE spans SET lease_owner = NULL, lease_until = 0 "
                                 "WHERE id = ? AND lease_owner = ?", [(i, self.owner) for i in ids])

    def release_dead_leases(self) -> int:
        """End the leases of processes on this host that no longer exist (a crashed or killed sender)."""
        now = time.time()
        with self._lock:
            conn = self._connect()
            owners = [o for (o,) in conn.execute(
                "SELECT DISTINCT lease_owner FROM spans WHERE lease_until >= ? AND lease_owner IS NOT NULL", (now,))]
            released = 0
            for owner in owners:
                host, _, rest = owner.partition(":")
                pid_text = rest.partition(":")[0]
                if owner == self.owner or host != _HOST or not pid_text.isdigit():
                    continue
                pid = int(pid_text)
                if pid == os.getpid() or not _pid_alive(pid):
                    cur = conn.execute("UPDATE spans SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = ?",
                                       (owner,))
                    released += cur.rowcount
            return released

    # -- reads ------------------------------------------------------------------------

    def has_rows(self, dest: str, *, upto: int | None = None) -> bool:
        """Rows waiting for `dest` (only those with an id up to `upto`, when given)."""
        with self._lock:
            conn = self._connect()
            if upto is None:
                return conn.execute("SELECT 1 FROM spans WHERE dest = ? LIMIT 1", (dest,)).fetchone() is not None
            return conn.execute("SELECT 1 FROM spans WHERE dest = ? AND id <= ? LIMIT 1",
                                (dest, upto)).fetchone() is not None

    def last_id(self, dest: str) -> int:
        with self._lock:
            conn = self._connect()
            return conn.execute("SELECT coalesce(max(id), 0) FROM spans WHERE dest = ?", (dest,)).fetchone()[0]

    def summary(self) -> list[dict]:
        """Per destination: rows, rows leased now, most attempts, oldest row's time (for `llm-observe wal status`)."""
        now = time.time()
        with self._lock:
            conn = self._connect()
            return [{"dest": dest, "rows": rows, "leased": leased, "max_attempts": attempts, "oldest": oldest}
                    for dest, rows, leased, attempts, oldest in conn.execute(
                        "SELECT dest, count(*), sum(lease_until >= ?), max(attempts), min(created) FROM spans "
                        "GROUP BY dest ORDER BY dest", (now,))]

    # -- dead letters ------------------------------------------------------------------

    def dead_rows(self, *, limit: int | None = None, span_ids: list[str] | None = None) -> list[dict]:
        with self._lock:
            dead = self._dead_conn()
            query = "SELECT id, dest, span_id, reason, attempts, created, dead_at, length(body) FROM dead"
            args: list = []
            if span_ids:
                query += f" WHERE span_id IN ({','.join('?' * len(span_ids))})"
                args += span_ids
            query += " ORDER BY id"
            if limit:
                query += " LIMIT ?"
                args.append(limit)
            keys = ("id", "dest", "span_id", "reason", "attempts", "created", "dead_at", "bytes")
            return [dict(zip(keys, row)) for row in dead.execute(query, args)]

    def dead_count(self) -> int:
        if not self.dead_path.exists():
            return 0
        with self._lock:
            return self._dead_conn().execute("SELECT count(*) FROM dead").fetchone()[0]

    def _dead_selection(self, span_ids: list[str] | None, older_than: float | None) -> tuple[str, list]:
        where, args = [], []
        if span_ids:
            where.append(f"span_id IN ({','.join('?' * len(span_ids))})")
            args += span_ids
        if older_than is not None:
            where.append("dead_at < ?")
            args.append(older_than)
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def dead_replay(self, *, span_ids: list[str] | None = None) -> int:
        """Move dead letters back into the WAL (attempts reset), to be sent again. Returns how many."""
        where, args = self._dead_selection(span_ids, None)
        with self._lock:
            dead = self._dead_conn()
            rows = dead.execute(f"SELECT id, dest, span_id, body FROM dead{where} ORDER BY id", args).fetchall()
        if not rows:
            return 0
        by_dest: dict[str, list] = {}
        for _, dest, span_id, body in rows:
            by_dest.setdefault(dest, []).append((span_id, body))
        for dest, items in by_dest.items():
            self.append(dest, items)
        with self._lock:
            dead = self._dead_conn()
            dead.execute("BEGIN IMMEDIATE")
            dead.executemany("DELETE FROM dead WHERE id = ?", [(row[0],) for row in rows])
            dead.execute("COMMIT")
        return len(rows)

    def dead_purge(self, *, span_ids: list[str] | None = None, older_than: float | None = None) -> int:
        where, args = self._dead_selection(span_ids, older_than)
        with self._lock:
            dead = self._dead_conn()
            dead.execute("BEGIN IMMEDIATE")
            removed = dead.execute(f"DELETE FROM dead{where}", args).rowcount
            dead.execute("COMMIT")
            return removed

    def count(self, dest: str | None = None) -> int:
        with self._lock:
            conn = self._connect()
            if dest is None:
                return conn.execute("SELECT count(*) FROM spans").fetchone()[0]
            return conn.execute("SELECT count(*) FROM spans WHERE dest = ?", (dest,)).fetchone()[0]
