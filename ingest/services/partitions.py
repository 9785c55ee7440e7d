"""Daily RANGE partitions of ingest_span: created on demand, ahead of time, dropped past retention."""

from __future__ import annotations

import logging
import re
import threading
import zlib
from datetime import date, datetime, time, timedelta, timezone

from django.db import connection, transaction

log = logging.getLogger(__name__)

PARENT = "ingest_span"
_NAME = re.compile(r"^ingest_span_p(\d{8})$")
_known: set[date] = set()
_known_lock = threading.Lock()


def partition_name(day: date) -> str:
    return f"{PARENT}_p{day:%Y%m%d}"


def _bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


def _existing(cur) -> set[date]:
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
        [PARENT],
    )
    days = set()
    for (name,) in cur.fetchall():
        match = _NAME.match(name)
        if match:
            days.add(datetime.strptime(match.group(1), "%Y%m%d").date())
    return days


def partitions_ensure(*, days: set[date]) -> list[date]:
    """Make sure a partition exists for each day; returns the days created now.

    Cheap on the hot path: days already seen by this process cost a set lookup.
    Creation runs in its own transaction under an advisory lock per day, so two
    processes racing for the same new day do not fail each other.
    """
    missing = days - _known
    if not missing:
        return []
    created = []
    with connection.cursor() as cur:
        existing = _existing(cur)
    for day in sorted(missing):
        if day not in existing:
            start, end = _bounds(day)
            name = partition_name(day)
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(name.encode())])
                cur.execute("SELECT to_regclass(%s)", [name])
                if cur.fetchone()[0] is None:
                    cur.execute(
                        f'CREATE TABLE "{name}" PARTITION OF "{PARENT}" FOR VALUES FROM (%s) TO (%s)',
                        [start, end],
                    )
                    created.append(day)
                    log.info("created partition %s", name)
        with _known_lock:
            _known.add(day)
    return created


def partitions_forget_cache() -> None:
    with _known_lock:
        _known.clear()


def partitions_create_ahead(*, today: date | None = None, days_ahead: int) -> list[date]:
    today = today or datetime.now(timezone.utc).date()
    return partitions_ensure(days={today + timedelta(days=n) for n in range(days_ahead + 1)})


def partitions_list() -> list[date]:
    with connection.cursor() as cur:
        return sorted(_existing(cur))


def partitions_drop_expired(*, retention_days: int, today: date | None = None) -> list[date]:
    """Drop whole partitions whose day ended more than retention_days ago."""
    today = today or datetime.now(timezone.utc).date()
    cutoff = today - timedelta(days=retention_days)
    dropped = []
    for day in partitions_list():
        if day >= cutoff:
            continue
        name = partition_name(day)
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(name.encode())])
            cur.execute(f'DROP TABLE IF EXISTS "{name}"')
        dropped.append(day)
        with _known_lock:
            _known.discard(day)
        log.info("dropped partition %s (retention %d days)", name, retention_days)
    # The de-duplication keys of dropped days go too, in bounded batches.
    cutoff_ts = datetime.combine(cutoff, time.min, tzinfo=timezone.utc)
    delete_batched(
        "DELETE FROM ingest_spankey WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM ingest_spankey WHERE timestamp_utc < %s LIMIT {DELETE_BATCH}))",
        [cutoff_ts],
    )
    return dropped


DELETE_BATCH = 10_000


def delete_batched(sql: str, params: list) -> int:
    """Run a DELETE that removes at most DELETE_BATCH rows, one transaction each, until it removes fewer."""
    deleted = 0
    while True:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(sql, params)
            deleted += cur.rowcount
            if cur.rowcount < DELETE_BATCH:
                return deleted
