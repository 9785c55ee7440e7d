"""PII and prompt-injection events for the console's security page (flagged spans only, partial index)."""

from __future__ import annotations

from datetime import datetime

from django.db import connection

from ingest.selectors.overview import _hour_range, bucket_starts, step_for
from ingest.services.injection_classifier import LABEL as SEMANTIC

# Tier 1 flags inline at ingest (patterns and phrases, PII and injection); tier 2 is the semantic classifier
# of the worker, which flags after storage under one pattern name.
TIER_NAMES = {1: "inline", 2: "semantic"}

_FLAGGED = "project_id = %s AND timestamp_utc >= %s AND timestamp_utc < %s AND (pii_detected OR injection_attempt)"


def security_overview(*, project_id: int, start: datetime, end: datetime, top: int = 10) -> dict:
    first, last = _hour_range(start, end)
    step = step_for(first, last)
    params = [project_id, first, end]
    with connection.cursor() as cur:
        cur.execute(f"SELECT date_bin(%s, timestamp_utc, %s) AS b, count(*) FILTER (WHERE pii_detected), "
                    f"count(*) FILTER (WHERE injection_attempt), "
                    f"count(*) FILTER (WHERE injection_attempt AND matched_patterns ? %s) FROM ingest_span "
                    f"WHERE {_FLAGGED} GROUP BY b ORDER BY b", [step, first, SEMANTIC, *params])
        by_bucket = {b: (pii, inj, semantic) for b, pii, inj, semantic in cur.fetchall()}
        cur.execute(f"SELECT p.name, count(*) FROM ingest_span, jsonb_array_elements_text(matched_patterns) "
                    f"AS p(name) WHERE {_FLAGGED} GROUP BY p.name ORDER BY count(*) DESC, p.name", params)
        by_pattern = [{"name": n, "events": c, "tier": 2 if n == SEMANTIC else 1,
                       "tier_name": TIER_NAMES[2 if n == SEMANTIC else 1]} for n, c in cur.fetchall()]
        groups = {}
        for column, label in (("service_name", "service"), ("user_id", "user")):
            cur.execute(f"SELECT {column}, count(*) FILTER (WHERE pii_detected), "
                        f"count(*) FILTER (WHERE injection_attempt) FROM ingest_span WHERE {_FLAGGED} "
                        f"GROUP BY {column} ORDER BY count(*) DESC LIMIT %s", [*params, top])
            groups[label] = [{"name": n, "pii": p, "injections": i} for n, p, i in cur.fetchall()]
    series = []
    for point in bucket_starts(first, last, step):
        pii, injections, _ = by_bucket.get(point, (0, 0, 0))
        series.append({"t": point.isoformat(), "pii": pii, "injections": injections})
    semantic = sum(v[2] for v in by_bucket.values())
    injections = sum(v[1] for v in by_bucket.values())
    totals = {"pii": sum(v[0] for v in by_bucket.values()), "injections": injections}
    # A span tier 1 flagged is not classified by tier 2: the two counts add up to the injections.
    by_tier = {1: injections - semantic, 2: semantic}
    # start: the top of the hour that holds the range's start, where the counts begin.
    return {"start": first, "series": series, "totals": totals, "injections_by_tier": by_tier, "by_pattern": by_pattern,
            "by_service": groups["service"],
            "by_user": groups["user"], "step_seconds": int(step.total_seconds())}
