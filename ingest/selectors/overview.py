"""The console's overview: totals, series and breakdowns from the hourly roll-ups (never the raw spans).

A range is read in whole hours (the roll-ups' grain): it starts at the hour that holds
`start` and ends with the hour that holds `end`. However wide the range, a series has at
most MAX_POINTS points: past that the buckets get coarser (a day, then several days), since
every point costs Python work here and a chart cannot show more anyway.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from django.db import connection
from django.utils import timezone as django_timezone

from ingest.services.rollups import BUCKETS, percentile

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
MAX_POINTS = 400


def step_for(start: datetime, end: datetime) -> timedelta:
    """The width of one point of the series: about 24 to MAX_POINTS points whatever the range."""
    span = end - start
    if span <= timedelta(days=2):
        return timedelta(hours=1)
    if span <= timedelta(days=14):
        return timedelta(hours=6)
    # Whole days keep the buckets aligned on UTC midnights (date_bin's origin is the range's first hour).
    return timedelta(days=max(1, -(-span.days // MAX_POINTS)))


def bucket_starts(first: datetime, last: datetime, step: timedelta) -> list[datetime]:
    """first, first + step, ... up to last; by index, so no addition ever passes the year 9999."""
    return [first + i * step for i in range((last - first) // step + 1)] if last >= first else []


def _hour_range(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    first = start.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return first, end.astimezone(timezone.utc)


def rollup_window(*, start: datetime, end: datetime, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The times the overview really covers for a range: whole hours, from the top of the hour that
    holds `start` to the end of the hour that holds `end`, but not past now (nothing is there yet)."""
    first, last = _hour_range(start, end)
    now = now or django_timezone.now()
    hour = last.replace(minute=0, second=0, microsecond=0)
    if hour >= max(now, last) - timedelta(hours=1):  # also: no hour after 9999-12-31 23:00
        return first, max(now, last)
    return first, hour + timedelta(hours=1)


_SUMS = ("sum(spans), sum(errors), sum(cost_usd_micro), sum(prompt_tokens), sum(completion_tokens), "
         "sum(latency_ms_sum), sum(latency_count), sum(pii), sum(injections)")


def _sums_dict(values) -> dict:
    # sum(bigint) is numeric (Decimal) in PostgreSQL: plain numbers from here on.
    spans, errors, cost, prompt, completion, lat_sum, lat_n, pii, injections = (float(v or 0) for v in values)
    return {"spans": int(spans), "errors": int(errors), "cost_usd": cost / 1e6, "prompt_tokens": int(prompt),
            "completion_tokens": int(completion), "avg_latency_ms": (lat_sum / lat_n) if lat_n else None,
            "pii": int(pii), "injections": int(injections)}


def overview_get(*, project_id: int, start: datetime, end: datetime, top: int = 10) -> dict:
    first, last = _hour_range(start, end)
    step = step_for(first, last)
    where = "project_id = %s AND hour >= %s AND hour <= %s"
    params = [project_id, first, last]
    with connection.cursor() as cur:
        cur.execute(f"SELECT date_bin(%s, hour, %s) AS b, {_SUMS} FROM ingest_spanrollup WHERE {where} "
                    "GROUP BY b ORDER BY b", [step, first, *params])
        sums_by_bucket = {row[0]: _sums_dict(row[1:]) for row in cur.fetchall()}
        cur.execute(f"SELECT date_bin(%s, hour, %s) AS b, latency, ttft FROM ingest_latencyrollup WHERE {where}",
                    [step, first, *params])
        hists: dict[datetime, tuple[list[int], list[int]]] = {}
        for bucket, latency, ttft in cur.fetchall():
            acc = hists.setdefault(bucket, ([0] * BUCKETS, [0] * BUCKETS))
            for i, n in enumerate(latency):
                acc[0][i] += n
            for i, n in enumerate(ttft):
                acc[1][i] += n
        breakdowns = {}
        for column, label in (("model", "model"), ("provider", "provider"), ("service_name", "service")):
            cur.execute(f"SELECT {column}, {_SUMS} FROM ingest_spanrollup WHERE {where} GROUP BY {column} "
                        "ORDER BY sum(cost_usd_micro) DESC, sum(spans) DESC", params)
            # missing: the spans of this row have no value there (the explorer's ?missing=...).
            breakdowns[label] = [{"name": row[0] or "(none)", "missing": not row[0], **_sums_dict(row[1:])}
                                 for row in cur.fetchall()]
        cur.execute("SELECT user_id, sum(spans), sum(cost_usd_micro), sum(prompt_tokens + completion_tokens) "
                    "FROM ingest_userrollup WHERE project_id = %s AND day >= %s AND day <= %s GROUP BY user_id "
                    "ORDER BY sum(cost_usd_micro) DESC, sum(spans) DESC LIMIT %s",
                    [project_id, first.date(), last.date(), top])
        top_users = [{"user_id": u, "spans": int(n), "cost_usd": float(c or 0) / 1e6, "tokens": int(t or 0)}
                     for u, n, c, t in cur.fetchall()]

    series = []
    total_latency, total_ttft = [0] * BUCKETS, [0] * BUCKETS
    empty = _sums_dict([0] * 9)
    for point in bucket_starts(first, last, step):
        sums = sums_by_bucket.get(point, empty)
        latency, ttft = hists.get(point, ([0] * BUCKETS, [0] * BUCKETS))
        for i in range(BUCKETS):
            total_latency[i] += latency[i]
            total_ttft[i] += ttft[i]
        series.append({
            "t": point.isoformat(), **sums,
            **{f"latency_{name}": percentile(latency, q) for name, q in QUANTILES.items()},
            **{f"ttft_{name}": percentile(ttft, q) for name, q in QUANTILES.items()},
        })
    totals = {key: sum(s[key] for s in sums_by_bucket.values())
              for key in ("spans", "errors", "cost_usd", "prompt_tokens", "completion_tokens", "pii", "injections")}
    totals["error_rate"] = totals["errors"] / totals["spans"] if totals["spans"] else None
    totals.update({f"latency_{name}": percentile(total_latency, q) for name, q in QUANTILES.items()})
    totals.update({f"ttft_{name}": percentile(total_ttft, q) for name, q in QUANTILES.items()})
    return {"start": first, "end": last, "window_end": rollup_window(start=start, end=end)[1],
            "days": (first.date(), last.date()), "step_seconds": int(step.total_seconds()), "totals": totals,
            "series": series, "breakdowns": breakdowns, "top_users": top_users}
