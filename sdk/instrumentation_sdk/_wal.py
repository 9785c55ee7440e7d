"""The SDK's write-ahead log: an SQLite file holding spans the appliance has not acknowledged yet.

Rows are written when the appliance is unreachable (or answers 5xx/429), when the
in-memory queue is full, and at exit for whatever could not be sent in time. A row
is deleted only after the appliance answered 202 for the batch that carried it.

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
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
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
            self._conn, self._pid = None, os.getpid()
            self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        conn = sqlite3.connect(str(self.path), timeout=10, isolation_level=None, check_same_thread=False)
        if fresh:
            try:
                os.chmod(self.path, 0o600)  # prompts live here: owner only
            except OSError:
                pass
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        self._sync = "FULL"
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        self._conn = conn
        return conn

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._conn = None
        self._pid = os.getpid()
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                try:
                    self._conn.close()
                except sqlite3.Error:
                    pass
            self._conn = None

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

    def append(self, dest: str, rows: list[tuple[str | None, bytes]]) -> None:
        """Add rows (span_id, JSON body) in order, in one transaction."""
        if not rows:
            return
        now = time.time()
        with self._transaction("FULL") as conn:
            conn.executemany("INSERT INTO spans (dest, span_id, body, created) VALUES (?, ?, ?, ?)",
                             [(dest, sid, body, now) for sid, body in rows])
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

    def claim(self, dest: str, *, limit: int, max_bytes: int, lease_seconds: float) -> list[tuple[int, bytes]]:
        """Lease the oldest unleased rows of `dest` (at most `limit` rows / `max_bytes`)."""
        now = time.time()
        with self._transaction("NORMAL") as conn:
            rows = conn.execute(
                "SELECT id, body FROM spans WHERE dest = ? AND lease_until < ? ORDER BY id LIMIT ?",
                (dest, now, limit)).fetchall()
            picked, size = [], 0
            for row_id, body in rows:
                if picked and size + len(body) > max_bytes:
                    break
                picked.append((row_id, body))
                size += len(body) + 1
            if picked:
                conn.executemany("UPDATE spans SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
                                 "WHERE id = ?",
                                 [(self.owner, now + lease_seconds, row_id) for row_id, _ in picked])
        return picked

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

    def has_rows(self, dest: str) -> bool:
        with self._lock:
            conn = self._connect()
            return conn.execute("SELECT 1 FROM spans WHERE dest = ? LIMIT 1", (dest,)).fetchone() is not None

    def count(self, dest: str | None = None) -> int:
        with self._lock:
            conn = self._connect()
            if dest is None:
                return conn.execute("SELECT count(*) FROM spans").fetchone()[0]
            return conn.execute("SELECT count(*) FROM spans WHERE dest = ?", (dest,)).fetchone()[0]
