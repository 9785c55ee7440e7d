"""Reading scores for the API and the console. Always scoped to one project."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q

from ingest.models import Score
from ingest.selectors.spans import decode_cursor, encode_cursor

SCORE_FIELDS = ("score_id", "name", "data_type", "value", "string_value", "comment", "comment_pii", "source",
                "author", "trace_id", "span_id", "session_id", "created_at", "received_at")


@dataclass(frozen=True)
class ScoreFilters:
    start: datetime | None = None
    end: datetime | None = None
    name: str | None = None
    source: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    session_id: str | None = None


def _out(row: dict) -> dict:
    row["id"] = row.pop("score_id")
    # What was sent: a number, true/false, or the category.
    if row["data_type"] == "boolean":
        row["value"] = row["value"] == 1.0
    elif row["data_type"] == "categorical":
        row["value"] = row["string_value"]
    del row["string_value"]
    return row


def score_list(*, project_id: int, filters: ScoreFilters, limit: int,
               cursor: str | None = None) -> tuple[list[dict], str | None]:
    """Newest first; keyset pagination on (created_at, score_id). A bad cursor raises selectors.spans.BadCursor."""
    qs = Score.objects.filter(project_id=project_id)
    if filters.start:
        qs = qs.filter(created_at__gte=filters.start)
    if filters.end:
        qs = qs.filter(created_at__lt=filters.end)
    for name in ("name", "source", "trace_id", "span_id", "session_id"):
        value = getattr(filters, name)
        if value is not None:
            qs = qs.filter(**{name: value})
    if cursor:
        ts, score_id = decode_cursor(cursor)
        qs = qs.filter(Q(created_at__lt=ts) | Q(created_at=ts, score_id__lt=score_id))
    rows = list(qs.order_by("-created_at", "-score_id").values(*SCORE_FIELDS)[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["score_id"])
    return [_out(row) for row in rows], next_cursor


def scores_for_trace(*, project_id: int, trace_id: str, span_ids: list[str] | None = None) -> list[dict]:
    """Scores of a trace: on the trace itself or on any of its spans (given, e.g. from trace_get), oldest first."""
    target = Q(trace_id=trace_id)
    if span_ids:
        target |= Q(span_id__in=span_ids)
    rows = Score.objects.filter(target, project_id=project_id).order_by("created_at", "score_id").values(*SCORE_FIELDS)
    return [_out(row) for row in rows[:1000]]
