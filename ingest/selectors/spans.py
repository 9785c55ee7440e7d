"""Reading spans for the API and the console. Always scoped to one project."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
import psycopg
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce, Substr

from ingest.kinds import MODEL_CALL_KINDS
from ingest.models import Span, SpanKey, SpanRollup

SPAN_FIELDS = (
    "span_id", "trace_id", "parent_span_id", "timestamp_utc", "schema_version", "model", "provider",
    "service_name", "endpoint", "environment", "user_id", "session_id", "status", "finish_reason",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "token_count_method",
    "latency_ms_ttft", "latency_ms_total", "cost_usd_micro", "price_version", "is_sampled",
    "retry_count", "attempted_models", "pii_detected", "injection_attempt", "matched_patterns", "scan_status",
    "prompt", "response", "prompt_hash", "error_type", "error_message", "metadata", "received_at",
    "name", "kind", "response_id", "duplicate_of",
)


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC (PostgreSQL refuses some offsets Python accepts); out of range -> ValueError."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class SpanFilters:
    start: datetime | None = None
    end: datetime | None = None
    service: str | None = None
    model: str | None = None
    provider: str | None = None
    status: str | None = None
    trace_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    kind: str | None = None
    flag: str | None = None  # console only: "pii", "injection" or "flagged"
    text: str | None = None  # console only: a substring of the prompt (case-insensitive)
    # console only: fields that must be empty (names of MISSING_FIELDS), e.g. ("model",) for the
    # overview's "(none)" row; calls_only: the spans the roll-ups count (kinds.counts_as_call).
    missing: tuple[str, ...] = ()
    calls_only: bool = False


def encode_cursor(timestamp: datetime, span_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([timestamp.isoformat(), span_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        ts, span_id = orjson.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(ts), str(span_id)
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise BadCursor("cursor is not one this API returned") from exc


_FLAGS = {
    "pii": Q(pii_detected=True),
    "injection": Q(injection_attempt=True),
    "flagged": Q(pii_detected=True) | Q(injection_attempt=True),
}
FLAG_CHOICES = tuple(_FLAGS)
# The fields a filter can ask to be empty (None or ''), by SpanFilters name.
MISSING_FIELDS = {"service": "service_name", "model": "model", "provider": "provider", "user_id": "user_id",
                  "session_id": "session_id"}
# kinds.counts_as_call as a query: what the overview's roll-ups count.
CALLS = Q(duplicate_of__isnull=True) & (Q(kind__isnull=True) | Q(kind="UNKNOWN") | Q(kind__in=MODEL_CALL_KINDS))


def _filtered(project_id: int, filters: SpanFilters):
    qs = Span.objects.filter(project_id=project_id)
    if filters.start:
        qs = qs.filter(timestamp_utc__gte=filters.start)
    if filters.end:
        qs = qs.filter(timestamp_utc__lt=filters.end)
    for name, column in (("service", "service_name"), ("model", "model"), ("provider", "provider"),
                         ("status", "status"), ("trace_id", "trace_id"), ("user_id", "user_id"),
                         ("session_id", "session_id"), ("kind", "kind")):
        value = getattr(filters, name)
        if value is not None:
            qs = qs.filter(**{column: value})
    for name in filters.missing:
        column = MISSING_FIELDS[name]
        qs = qs.filter(Q(**{f"{column}__isnull": True}) | Q(**{column: ""}))
    if filters.calls_only:
        qs = qs.filter(CALLS)
    if filters.flag:
        qs = qs.filter(_FLAGS[filters.flag])
    if filters.text:
        qs = qs.filter(prompt__icontains=filters.text)
    return qs


def span_list(*, project_id: int, filters: SpanFilters, limit: int, cursor: str | None = None) -> tuple[list[dict], str | None]:
    """Newest first; keyset pagination on (timestamp_utc, span_id)."""
    qs = _filtered(project_id, filters)
    if cursor:
        ts, span_id = decode_cursor(cursor)
        qs = qs.filter(Q(timestamp_utc__lt=ts) | Q(timestamp_utc=ts, span_id__lt=span_id))
    rows = list(qs.order_by("-timestamp_utc", "-span_id").values(*SPAN_FIELDS)[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["timestamp_utc"], rows[-1]["span_id"])
    return rows, next_cursor


def trace_get(*, project_id: int, trace_id: str) -> dict | None:
    """The spans of one trace as a tree (roots = spans whose parent is absent)."""
    rows = list(
        Span.objects.filter(project_id=project_id, trace_id=trace_id)
        .order_by("timestamp_utc", "span_id").values(*SPAN_FIELDS)
    )
    if not rows:
        return None
    nodes = {row["span_id"]: {**row, "children": []} for row in rows}

    def in_cycle(span_id: str) -> bool:
        seen = set()
        while span_id in nodes:
            if span_id in seen:
                return True
            seen.add(span_id)
            span_id = nodes[span_id]["parent_span_id"]
        return False

    roots = []
    for node in nodes.values():
        parent = nodes.get(node["parent_span_id"]) if node["parent_span_id"] else None
        # Spans whose parent links loop (bad client data) are shown as roots, not lost.
        if parent is not None and not in_cycle(node["span_id"]):
            parent["children"].append(node)
        else:
            roots.append(node)
    return {"trace_id": trace_id, "span_count": len(rows), "roots": roots}


# Each sort but time has its own index (migration 0005), so any range costs one page of index reads.
# The explorer's columns: everything but the texts, plus the start of the prompt.
LIST_FIELDS = tuple(f for f in SPAN_FIELDS if f not in {"prompt", "response", "metadata", "error_message"})
SORTS = {
    "time": ("-timestamp_utc", "-span_id"),
    "cost": (F("cost_usd_micro").desc(nulls_last=True), "-timestamp_utc"),
    "latency": (F("latency_ms_total").desc(nulls_last=True), "-timestamp_utc"),
}


def span_explore(*, project_id: int, filters: SpanFilters, sort: str = "time", page: int = 1,
                 per_page: int = 50) -> dict:
    """One page of spans for the console: sorted, with a prompt preview; `has_next` instead of a count.

    A page that needs more than CONSOLE_QUERY_TIMEOUT_MS (a substring search over weeks of
    prompts, say) is cancelled and answered with timed_out=True rather than holding the database.
    """
    qs = _filtered(project_id, filters).annotate(
        prompt_preview=Substr("prompt", 1, 160),
        total_tokens=Coalesce("prompt_tokens", 0) + Coalesce("completion_tokens", 0),
    )
    offset = (page - 1) * per_page
    try:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("SELECT set_config('statement_timeout', %s, true)", [str(settings.CONSOLE_QUERY_TIMEOUT_MS)])
            rows = list(qs.order_by(*SORTS[sort]).values(*LIST_FIELDS, "prompt_preview", "total_tokens")
                        [offset: offset + per_page + 1])
    except OperationalError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
            raise
        return {"items": [], "has_next": False, "page": page, "timed_out": True}
    return {"items": rows[:per_page], "has_next": len(rows) > per_page, "page": page, "timed_out": False}


def span_get(*, project_id: int, span_id: str) -> dict | None:
    """One span by id, found through its key row (so only one partition is read)."""
    key = SpanKey.objects.filter(project_id=project_id, span_id=span_id).values_list("timestamp_utc", flat=True).first()
    if key is None:
        return None
    return Span.objects.filter(project_id=project_id, timestamp_utc=key, span_id=span_id).values(*SPAN_FIELDS).first()


def span_facets(*, project_id: int, since: datetime) -> dict:
    """Distinct services, models and providers seen since a time (for the filter menus), from the roll-ups."""
    facets = {}
    for column in ("service_name", "model", "provider"):
        facets[column] = [v for v in SpanRollup.objects.filter(project_id=project_id, hour__gte=since)
                          .exclude(**{column: ""}).values_list(column, flat=True).distinct().order_by(column)[:200]]
    return facets
