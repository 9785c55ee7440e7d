"""Hourly roll-ups of spans for the console's overview: written with the spans, read by selectors.

Three tables (see models): sums per hour x service x model x provider, latency/TTFT
histograms per hour, and cost per user per day. They are written in the same
transaction as the spans they count, so they never disagree with the span table
(only spans really inserted are counted: re-sent ones are not). They count calls: not chains,
tools or agents around them, nor the second span of a call another span already carries. Rows are upserted in
key order, which keeps concurrent writers free of deadlocks, and each writer picks
one of SHARDS rows per key, so two batches of the same hour rarely wait for each other.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from datetime import datetime, timezone

import orjson
from django.db import connection, transaction

from ingest.kinds import counts_as_call

SHARDS = 4
# Latency histograms: bucket 0 is < 1 ms, bucket i in 1..62 is [R^(i-1), R^i) ms, 63 is the rest.
RATIO = 1.25
BUCKETS = 64
_LOG_RATIO = math.log(RATIO)


def bucket_of(ms: float) -> int:
    if ms < 1:
        return 0
    return min(BUCKETS - 1, 1 + int(math.log(ms) / _LOG_RATIO))


def bucket_bounds(index: int) -> tuple[float, float]:
    if index == 0:
        return 0.0, 1.0
    return RATIO ** (index - 1), RATIO ** index


def percentile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram, interpolated geometrically inside its bucket.

    The error is bounded by the bucket width (25 %), in practice a few percent.
    """
    total = sum(hist)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(hist):
        if count and seen + count >= rank:
            low, high = bucket_bounds(index)
            frac = (rank - seen) / count
            if index == 0:
                return low + (high - low) * frac
            return low * (high / low) ** frac
        seen += count
    return bucket_bounds(BUCKETS - 1)[1]


def _hour(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def rollups_from_rows(rows, *, shard: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Aggregate span rows (dicts with the span columns) into the three roll-up shapes."""
    sums: dict[tuple, list] = {}
    hists: dict[tuple, tuple[list[int], list[int]]] = {}
    users: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0])
    for row in rows:
        if not counts_as_call(row):
            continue
        project_id = row["project_id"]
        hour = _hour(row["timestamp_utc"])
        key = (project_id, hour, row["service_name"] or "", row["model"] or "", row["provider"] or "")
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0, 0, 0.0, 0, 0, 0]
        prompt_tokens = row["prompt_tokens"] or 0
        completion_tokens = row["completion_tokens"] or 0
        cost = row["cost_usd_micro"] or 0
        acc[0] += 1
        acc[1] += row["status"] == "error"
        acc[2] += prompt_tokens
        acc[3] += completion_tokens
        acc[4] += cost
        latency = row["latency_ms_total"]
        ttft = row["latency_ms_ttft"]
        if latency is not None or ttft is not None:
            hist = hists.get((project_id, hour))
            if hist is None:
                hist = hists[(project_id, hour)] = ([0] * BUCKETS, [0] * BUCKETS)
            if latency is not None:
                acc[5] += latency
                acc[6] += 1
                hist[0][bucket_of(latency)] += 1
            if ttft is not None:
                hist[1][bucket_of(ttft)] += 1
        acc[7] += bool(row["pii_detected"])
        acc[8] += bool(row["injection_attempt"])
        if row["user_id"]:
            user = users[(project_id, hour.date(), row["user_id"])]
            user[0] += 1
            user[1] += cost
            user[2] += prompt_tokens
            user[3] += completion_tokens
    names = ("spans", "errors", "prompt_tokens", "completion_tokens", "cost_usd_micro", "latency_ms_sum",
             "latency_count", "pii", "injections")
    sum_rows = [{"project_id": k[0], "hour": k[1], "service_name": k[2], "model": k[3], "provider": k[4],
                 "shard": shard, **dict(zip(names, v))} for k, v in sorted(sums.items())]
    hist_rows = [{"project_id": k[0], "hour": k[1], "shard": shard, "latency": v[0], "ttft": v[1]}
                 for k, v in sorted(hists.items())]
    user_rows = [{"project_id": k[0], "day": k[1], "user_id": k[2], "spans": v[0], "cost_usd_micro": v[1],
                  "prompt_tokens": v[2], "completion_tokens": v[3]} for k, v in sorted(users.items())]
    return sum_rows, hist_rows, user_rows


_SUMS_SQL = """
INSERT INTO ingest_spanrollup (project_id, hour, service_name, model, provider, shard, spans, errors,
    prompt_tokens, completion_tokens, cost_usd_micro, latency_ms_sum, latency_count, pii, injections)
SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(project_id bigint, hour timestamptz, service_name varchar,
    model varchar, provider varchar, shard smallint, spans bigint, errors bigint, prompt_tokens bigint,
    completion_tokens bigint, cost_usd_micro bigint, latency_ms_sum float8, latency_count bigint, pii bigint,
    injections bigint)
ORDER BY project_id, hour, service_name, model, provider
ON CONFLICT (project_id, hour, service_name, model, provider, shard) DO UPDATE SET
    spans = ingest_spanrollup.spans + excluded.spans,
    errors = ingest_spanrollup.errors + excluded.errors,
    prompt_tokens = ingest_spanrollup.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = ingest_spanrollup.completion_tokens + excluded.completion_tokens,
    cost_usd_micro = ingest_spanrollup.cost_usd_micro + excluded.cost_usd_micro,
    latency_ms_sum = ingest_spanrollup.latency_ms_sum + excluded.latency_ms_sum,
    latency_count = ingest_spanrollup.latency_count + excluded.latency_count,
    pii = ingest_spanrollup.pii + excluded.pii,
    injections = ingest_spanrollup.injections + excluded.injections
"""
_HIST_SQL = """
INSERT INTO ingest_latencyrollup (project_id, hour, shard, latency, ttft)
SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(project_id bigint, hour timestamptz, shard smallint,
    latency bigint[], ttft bigint[])
ORDER BY project_id, hour
ON CONFLICT (project_id, hour, shard) DO UPDATE SET
    latency = llmobs_array_add(ingest_latencyrollup.latency, excluded.latency),
    ttft = llmobs_array_add(ingest_latencyrollup.ttft, excluded.ttft)
"""
_USERS_SQL = """
INSERT INTO ingest_userrollup (project_id, day, user_id, spans, cost_usd_micro, prompt_tokens, completion_tokens)
SELECT * FROM jsonb_to_recordset(%s::jsonb) AS r(project_id bigint, day date, user_id varchar, spans bigint,
    cost_usd_micro bigint, prompt_tokens bigint, completion_tokens bigint)
ORDER BY project_id, day, user_id
ON CONFLICT (project_id, day, user_id) DO UPDATE SET
    spans = ingest_userrollup.spans + excluded.spans,
    cost_usd_micro = ingest_userrollup.cost_usd_micro + excluded.cost_usd_micro,
    prompt_tokens = ingest_userrollup.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = ingest_userrollup.completion_tokens + excluded.completion_tokens
"""


def rollups_add(cur, rows) -> None:
    """Count freshly inserted span rows; call inside the transaction that inserted them."""
    sum_rows, hist_rows, user_rows = rollups_from_rows(rows, shard=random.randrange(SHARDS))
    for sql, data in ((_SUMS_SQL, sum_rows), (_HIST_SQL, hist_rows), (_USERS_SQL, user_rows)):
        if data:
            cur.execute(sql, [orjson.dumps(data).decode()])


_KEYS = (("project_id", "hour", "service_name", "model", "provider", "shard"), ("project_id", "hour", "shard"),
         ("project_id", "day", "user_id"))


def _minus(new: list[dict], old: list[dict], key: tuple[str, ...]) -> list[dict]:
    """new - old, row by key and field by field (histograms element-wise); rows that come to nothing left out."""
    out = {tuple(row[k] for k in key): dict(row) for row in new}
    for row in old:
        target = out.setdefault(tuple(row[k] for k in key), {k: row[k] for k in key})
        for name, value in row.items():
            if name in key:
                continue
            if isinstance(value, list):
                mine = target.get(name) or [0] * len(value)
                target[name] = [a - b for a, b in zip(mine, value)]
            else:
                target[name] = target.get(name, 0) - value
    return [row for k, row in sorted(out.items())
            if any(any(v) if isinstance(v, list) else v for n, v in row.items() if n not in key)]


def rollups_change(cur, changes) -> None:
    """Count stored span rows updated in place: `changes` are (row before, row after) pairs.

    Adds what the update changed (tokens and cost counted later, a flag set later) without
    counting the span twice: the sums of the rows after minus those of the rows before. Call
    inside the transaction that updates them; the rows need the columns rollups_add reads.
    """
    if not changes:
        return
    shard = random.randrange(SHARDS)
    before = rollups_from_rows([old for old, _ in changes], shard=shard)
    after = rollups_from_rows([new for _, new in changes], shard=shard)
    for sql, key, old, new in zip((_SUMS_SQL, _HIST_SQL, _USERS_SQL), _KEYS, before, after):
        data = _minus(new, old, key)
        if data:
            cur.execute(sql, [orjson.dumps(data).decode()])


_ROLLUP_COLUMNS = ("project_id", "timestamp_utc", "service_name", "model", "provider", "status", "prompt_tokens",
                   "completion_tokens", "cost_usd_micro", "latency_ms_total", "latency_ms_ttft", "pii_detected",
                   "injection_attempt", "user_id", "kind", "duplicate_of")


def rollups_delete(*, before: datetime, project_id: int | None = None) -> None:
    """Forget the roll-ups of hours that start before `before` (retention)."""
    scope = " AND project_id = %s" if project_id is not None else ""
    extra = [project_id] if project_id is not None else []
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"DELETE FROM ingest_spanrollup WHERE hour < %s{scope}", [before, *extra])
        cur.execute(f"DELETE FROM ingest_latencyrollup WHERE hour < %s{scope}", [before, *extra])
        cur.execute(f"DELETE FROM ingest_userrollup WHERE day < %s{scope}",
                    [before.astimezone(timezone.utc).date(), *extra])


def rollups_rebuild(*, project_id: int | None = None, chunk: int = 20_000, progress=None,
                    columns: tuple[str, ...] = _ROLLUP_COLUMNS) -> int:
    """Recompute every roll-up from the span table (after a restore, or for spans stored before them)."""
    scope = "WHERE project_id = %s" if project_id is not None else ""
    params = [project_id] if project_id is not None else []
    counted = 0
    with transaction.atomic():
        with connection.cursor() as cur:
            for table in ("ingest_spanrollup", "ingest_latencyrollup", "ingest_userrollup"):
                cur.execute(f"DELETE FROM {table} {scope}", params)
        # A server-side cursor streams the spans; the sums are built in memory by chunk.
        raw = connection.connection
        with raw.cursor(name="llmobs_rollup_rebuild") as stream, connection.cursor() as cur:
            stream.itersize = chunk
            stream.execute(f"SELECT {', '.join(columns)} FROM ingest_span {scope} "
                           "ORDER BY timestamp_utc", params)
            while True:
                batch = stream.fetchmany(chunk)
                if not batch:
                    break
                rollups_add(cur, [dict(zip(columns, values)) for values in batch])
                counted += len(batch)
                if progress:
                    progress(counted)
    return counted
