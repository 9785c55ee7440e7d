"""Daily RANGE partitions of ingest_span and ingest_embeddingday: created on demand, ahead of
time, dropped past retention. A day always has both (the embedding partition of a day holds the
vectors of that day's sampled prompts), created and dropped together."""

from __future__ import annotations

import logging
import re
import threading
import zlib
from datetime import date, datetime, time, timedelta, timezone

from django.db import connection, transaction

log = logging.getLogger(__name__)

PARENT = "ingest_span"
# Partitioned by day: the span table on timestamp_utc, the embedding table on its `day` column.
PARENTS = ("ingest_span", "ingest_embeddingday")
_NAME = re.compile(r"^(ingest_span|ingest_embeddingday)_p(\d{8})$")
_known: set[date] = set()
_known_lock = threading.Lock()


def partition_name(day: date, parent: str = PARENT) -> str:
    return f"{parent}_p{day:%Y%m%d}"


def _bounds(day: date, parent: str) -> tuple[datetime | date, datetime | date]:
    if parent == "ingest_embeddingday":
        return day, day + timedelta(days=1)
    start = datetime.combine(day, time.min, tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


def _existing_by_parent(cur) -> dict[str, set[date]]:
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s)",
        [list(PARENTS)],
    )
    found: dict[str, set[date]] = {parent: set() for parent in PARENTS}
    for (name,) in cur.fetchall():
        match = _NAME.match(name)
        if match:
            found[match.group(1)].add(datetime.strptime(match.group(2), "%Y%m%d").date())
    return found


def _existing(cur) -> set[date]:
    """Days that have a partition in every partitioned table."""
    found = _existing_by_parent(cur)
    return set.intersection(*found.values())


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
            with transaction.atomic(), connection.cursor() as cur:
                # One lock per day (the span partition's name), both tables in one transaction.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(partition_name(day).encode())])
                made = False
                for parent in PARENTS:
                    name = partition_name(day, parent)
                    cur.execute("SELECT to_regclass(%s)", [name])
                    if cur.fetchone()[0] is None:
                        start, end = _bounds(day, parent)
                        cur.execute(
                            f'CREATE TABLE "{name}" PARTITION OF "{parent}" FOR VALUES FROM (%s) TO (%s)',
                            [start, end],
                        )
                        made = True
                        log.info("created partition %s", name)
                if made:
                    created.append(day)
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
    """Days with a partition in any partitioned table."""
    with connection.cursor() as cur:
        return sorted(set.union(*_existing_by_parent(cur).values()))


def partitions_drop_expired(*, retention_days: int, today: date | None = None) -> list[date]:
    """Drop whole partitions whose day ended more than retention_days ago."""
    today = today or datetime.now(timezone.utc).date()
    cutoff = today - timedelta(days=retention_days)
    dropped = []
    for day in partitions_list():
        if day >= cutoff:
            continue
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(partition_name(day).encode())])
            vectors = partition_name(day, "ingest_embeddingday")
            cur.execute("SELECT to_regclass(%s)", [vectors])
            if cur.fetchone()[0] is not None:
                # A prompt seen on no other day loses its global vector too.
                cur.execute(
                    f'DELETE FROM ingest_embedding e USING (SELECT DISTINCT project_id, content_key FROM "{vectors}") k '
                    "WHERE e.project_id = k.project_id AND e.content_key = k.content_key AND NOT EXISTS ("
                    "SELECT 1 FROM ingest_embeddingday d WHERE d.project_id = k.project_id "
                    "AND d.content_key = k.content_key AND d.day <> %s)",
                    [day],
                )
            for parent in PARENTS:
                cur.execute(f'DROP TABLE IF EXISTS "{partition_name(day, parent)}"')
        dropped.append(day)
        with _known_lock:
            _known.discard(day)
        log.info("dropped the partitions of %s (retention %d days)", day, retention_days)
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
