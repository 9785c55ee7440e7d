"""PII and prompt-injection events for the console's security page (flagged spans only, partial index)."""

from __future__ import annotations

from datetime import datetime

from django.db import connection

from ingest.selectors.overview import _hour_range, bucket_starts, step_for

_FLAGGED = "project_id = %s AND timestamp_utc >= %s AND timestamp_utc < %s AND (pii_detected OR injection_attempt)"


def security_overview(*, project_id: int, start: datetime, end: datetime, top: int = 10) -> dict:
    first, last = _hour_range(start, end)
    step = step_for(first, last)
    params = [project_id, first, end]
    with connection.cursor() as cur:
        cur.execute(f"SELECT date_bin(%s, timestamp_utc, %s) AS b, count(*) FILTER (WHERE pii_detected), "
                    f"count(*) FILTER (WHERE injection_attempt) FROM ingest_span WHERE {_FLAGGED} "
                    "GROUP BY b ORDER BY b", [step, first, *params])
        by_bucket = {b: (pii, inj) for b, pii, inj in cur.fetchall()}
        cur.execute(f"SELECT p.name, count(*) FROM ingest_span, jsonb_array_elements_text(matched_patterns) "
                    f"AS p(name) WHERE {_FLAGGED} GROUP BY p.name ORDER BY count(*) DESC, p.name", params)
        by_pattern = [{"name": n, "events": c} for n, c in cur.fetchall()]
        groups = {}
        for column, label in (("service_name", "service"), ("user_id", "user")):
            cur.execute(f"SELECT {column}, count(*) FILTER (WHERE pii_detected), "
                        f"count(*) FILTER (WHERE injection_attempt) FROM ingest_span WHERE {_FLAGGED} "
                        f"GROUP BY {column} ORDER BY count(*) DESC LIMIT %s", [*params, top])
            groups[label] = [{"name": n, "pii": p, "injections": i} for n, p, i in cur.fetchall()]
    series = []
    for point in bucket_starts(first, last, step):
        pii, injections = by_bucket.get(point, (0, 0))
        series.append({"t": point.isoformat(), "pii": pii, "injections": injections})
    totals = {"pii": sum(v[0] for v in by_bucket.values()), "injections": sum(v[1] for v in by_bucket.values())}
    return {"series": series, "totals": totals, "by_pattern": by_pattern, "by_service": groups["service"],
            "by_user": groups["user"], "step_seconds": int(step.total_seconds())}
