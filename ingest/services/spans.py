"""Writing spans: validate, sample, price, store. One path for every ingest route."""

from __future__ import annotations

import logging
import operator
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from pydantic import ValidationError

from ingest.kinds import is_model_call, kind_normalize, kind_of
from ingest.metrics import metrics_record_ingest
from ingest.schemas import MAX_DEPTH, SpanIn
from ingest.services.embeddings import embeddings_enqueue, prompt_hash
from ingest.services.partitions import partitions_ensure, partitions_forget_cache
from ingest.services.pricing import price_table
from ingest.services.rollups import rollups_add, rollups_change
from ingest.services.sampling import should_sample
from ingest.services.scanning import scan_row
from ingest.services.span_content import content_merge_pending
from instrumentation_sdk import count_tokens

# Order of the columns in the COPY into the staging table.
COLUMNS = (
    "project_id", "span_id", "timestamp_utc", "trace_id", "parent_span_id", "schema_version",
    "model", "provider", "service_name", "endpoint", "environment", "user_id", "session_id",
    "status", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "token_count_method", "latency_ms_ttft", "latency_ms_total",
    "cost_usd_micro", "price_version", "is_sampled", "retry_count", "attempted_models",
    "pii_detected", "injection_attempt", "matched_patterns", "scan_status", "prompt", "response", "prompt_hash",
    "error_type", "error_message", "metadata", "received_at", "name", "kind", "response_id", "duplicate_of",
)
_JSON_COLUMNS = {"attempted_models", "matched_patterns", "metadata"}
_TEXT_FIELDS = (
    "span_id", "trace_id", "parent_span_id", "model", "provider", "service_name", "endpoint",
    "environment", "user_id", "session_id", "prompt", "response", "error_type", "error_message", "name",
    "response_id",
)
FUTURE_TOLERANCE = timedelta(days=1)

log = logging.getLogger(__name__)

_ERROR_RULES = {
    "missing": "missing_field",
    "string_too_long": "too_long",
    "string_too_short": "too_short",
    "too_long": "too_long",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "literal_error": "invalid_value",
    "value_error": "invalid_value",
    "extra_forbidden": "unknown_field",
}


@dataclass
class Rejection:
    index: int
    span_id: str | None
    rule: str
    field: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"index": self.index, "span_id": self.span_id, "rule": self.rule, "field": self.field, "reason": self.reason}


@dataclass
class Prepared:
    rows: list[dict] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoreResult:
    stored: int
    duplicates: int


def _clean_text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; replacing it beats rejecting the span.
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _rejection_from(index: int, raw: dict, exc: ValidationError) -> Rejection:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first.get("loc", ()))
    kind = first.get("type", "")
    rule = _ERROR_RULES.get(kind) or ("invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    span_id = raw.get("span_id") if isinstance(raw.get("span_id"), str) else None
    return Rejection(index, span_id, rule, loc or None, first.get("msg", "invalid"))


def spans_prepare(*, project, items: list[Any], received_at: datetime | None = None) -> Prepared:
    """Validate and enrich raw span dicts into storable rows; invalid ones become rejections."""
    received_at = received_at or datetime.now(timezone.utc)
    oldest = received_at - timedelta(days=settings.RETENTION_DAYS)
    newest = received_at + FUTURE_TOLERANCE
    prices = price_table()
    result = Prepared()
    for index, raw in enumerate(items):
        try:
            outcome = _prepare_one(index, raw, project=project, received_at=received_at, oldest=oldest,
                                   newest=newest, prices=prices)
        except Exception as exc:  # noqa: BLE001 - one span must never fail the others
            log.exception("span %d of a batch could not be prepared", index)
            span_id = raw.get("span_id") if isinstance(raw, dict) and isinstance(raw.get("span_id"), str) else None
            outcome = Rejection(index, span_id, "unprocessable", None,
                                f"the span could not be processed ({type(exc).__name__}); it was not stored")
        if isinstance(outcome, Rejection):
            result.rejected.append(outcome)
        else:
            result.rows.append(outcome)
    _link_calls_in_batch(result.rows)
    return result


# Two spans with the same response id are one call when they ran at the same time: both wrap the
# same request (an instrumentation's span and the client library's own, in one trace or, for
# OpenLLMetry beside the anthropic SDK, in two). Real response ids are unique, but a mock provider
# or a cache may hand the same id to many calls: those ran one after the other, not together.
# The tolerance covers rounding and two clocks of one host.
_OVERLAP_TOLERANCE = timedelta(seconds=1)
# What a stored carrier is read with: enough to demote it (roll-ups, duplicate counts).
_CARRIER_COLUMNS = ("span_id", "project_id", "timestamp_utc", "trace_id", "service_name", "model", "provider",
                    "status", "kind", "duplicate_of", "prompt_tokens", "completion_tokens", "cached_tokens",
                    "reasoning_tokens", "cost_usd_micro", "price_version", "latency_ms_total", "latency_ms_ttft",
                    "finish_reason", "pii_detected", "injection_attempt", "user_id", "metadata")


def _interval(row: dict) -> tuple[datetime, datetime]:
    start = row["timestamp_utc"]
    return start, start + timedelta(milliseconds=row["latency_ms_total"] or 0)


def _call_key(row: dict) -> tuple | None:
    if not row["response_id"] or not is_model_call(row["kind"], row["model"]):
        return None
    return row["project_id"], row["response_id"]


def _same_call(carrier: dict, row: dict) -> bool:
    (a_start, a_end), (b_start, b_end) = _interval(carrier), _interval(row)
    return a_start <= b_end + _OVERLAP_TOLERANCE and b_start <= a_end + _OVERLAP_TOLERANCE


# Instrumentation scopes of provider client libraries that trace themselves (the anthropic SDK 2.x):
# their span reads the provider's answer directly, where an instrumentation around it may count wrong
# (OpenLLMetry adds message_start's output tokens to a stream's total).
_CLIENT_LIBRARY_SCOPES = ("com.anthropic.",)


def _is_client_librarys(row: dict) -> bool:
    scope = (row["metadata"] or {}).get("otel.scope")
    return isinstance(scope, str) and scope.startswith(_CLIENT_LIBRARY_SCOPES)


def _carrier_rank(row: dict) -> tuple:
    # The span that keeps a call's tokens and cost: one with provider tokens, the client library's
    # own first, then the earliest.
    has_tokens = row["prompt_tokens"] is not None or row["completion_tokens"] is not None
    return (not has_tokens, row["token_count_method"] == "estimated", not _is_client_librarys(row),
            row["timestamp_utc"], row["span_id"])


def _link_calls_in_batch(rows: list[dict]) -> None:
    """Spans of one batch that describe the same model call: all but one become duplicates."""
    calls: dict[tuple, list[dict]] = {}
    for row in rows:
        key = _call_key(row)
        if key is not None:
            calls.setdefault(key, []).append(row)
    for same in calls.values():
        if len({row["span_id"] for row in same}) < 2:
            continue
        same.sort(key=_carrier_rank)
        carrier = same[0]
        for row in same[1:]:
            if row["span_id"] != carrier["span_id"] and _same_call(carrier, row):
                _inherit(carrier, row)
                span_mark_duplicate(row, of=carrier["span_id"])
    _link_failed_calls_in_batch(rows)


def _link_failed_calls_in_batch(rows: list[dict]) -> None:
    # A failed call has no response id, but the client library's own span of it is a child of the
    # instrumentation's span of the same call (OpenInference around the anthropic SDK): one error, not two.
    by_id = {(row["project_id"], row["span_id"]): row for row in rows}
    for row in rows:
        parent = by_id.get((row["project_id"], row["parent_span_id"]))
        if (parent is None or row["duplicate_of"] or parent["duplicate_of"] or row["response_id"]
                or not _is_client_librarys(row) or _is_client_librarys(parent)
                or not is_model_call(row["kind"], row["model"]) or not is_model_call(parent["kind"], parent["model"])
                or row["status"] != "error" or parent["status"] != "error" or not _same_call(parent, row)):
            continue
        _inherit(row, parent)
        span_mark_duplicate(parent, of=row["span_id"])


def _inherit(carrier: dict, duplicate: dict) -> None:
    # What only the other span saw of the call (the client library's own span times the first chunk).
    for name in ("latency_ms_ttft", "finish_reason"):
        if carrier[name] is None and duplicate[name] is not None:
            carrier[name] = duplicate[name]


def span_mark_duplicate(row: dict, *, of: str) -> None:
    """Leave a span's tokens and cost to `of`: the same call must count once in sums, metrics and budgets."""
    counted = {name: row[name] for name in ("prompt_tokens", "completion_tokens", "cached_tokens",
                                            "reasoning_tokens", "cost_usd_micro") if row[name] is not None}
    row["metadata"] = {**(row["metadata"] or {}), "llm_observe.duplicate_counts": counted}
    row["duplicate_of"] = of
    for name in counted:
        row[name] = None
    row["price_version"] = None


def _too_deep(value: Any, limit: int) -> bool:
    """True when objects/arrays nest more than `limit` levels (iterative: safe at any depth)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _prepare_one(index: int, raw: Any, *, project, received_at: datetime, oldest: datetime, newest: datetime,
                 prices) -> dict | Rejection:
    if not isinstance(raw, dict):
        return Rejection(index, None, "not_an_object", None, "each span must be a JSON object")
    for key, value in raw.items():
        if isinstance(value, (dict, list)) and _too_deep(value, MAX_DEPTH):
            span_id = raw.get("span_id") if isinstance(raw.get("span_id"), str) else None
            return Rejection(index, span_id, "too_deep", str(key),
                             f"objects and arrays may nest at most {MAX_DEPTH} levels")
    try:
        span = SpanIn.model_validate(raw)
    except ValidationError as exc:
        return _rejection_from(index, raw, exc)
    ts = span.timestamp_utc or received_at
    try:
        ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
    except OverflowError:
        # Before the year 1 or after 9999 once in UTC (0001-01-01T00:00+10:00): far outside the window.
        ts = datetime.min.replace(tzinfo=timezone.utc) if ts.year == 1 else datetime.max.replace(tzinfo=timezone.utc)
    if ts > newest:
        return Rejection(index, span.span_id, "timestamp_in_future", "timestamp_utc",
                         f"more than {FUTURE_TOLERANCE} after the server's clock")
    if ts < oldest:
        return Rejection(index, span.span_id, "timestamp_too_old", "timestamp_utc",
                         f"older than the retention of {settings.RETENTION_DAYS} days")
    return _row(project, span, ts, received_at, prices)


def _row(project, span: SpanIn, ts: datetime, received_at: datetime, prices) -> dict:
    row = dict(span.__dict__)  # the validated fields; cheaper than model_dump on the hot path
    text = row.pop("text")
    extra = span.__pydantic_extra__
    if extra:
        row["metadata"] = {**(span.metadata or {}), **extra}
    elif not row["metadata"]:
        row["metadata"] = None
    if row["prompt"] is None:
        row["prompt"] = text
    row["span_id"] = span.span_id or str(uuid.uuid4())
    row["trace_id"] = span.trace_id or str(uuid.uuid4())
    row["timestamp_utc"] = ts
    row["received_at"] = received_at
    row["project_id"] = project.id
    for name in _TEXT_FIELDS:
        row[name] = _clean_text(row[name])

    # Before anything else sees the text: redact PII, flag injection attempts.
    scan_row(row, drop_text=project.redaction_mode == "drop")

    sampled = should_sample(row["span_id"], project.sampling_rate)
    row["is_sampled"] = sampled
    row["prompt_hash"] = prompt_hash(row)
    ttft, total = row["latency_ms_ttft"], row["latency_ms_total"]
    if ttft is not None and total is not None and ttft > total:
        # A first chunk after the end: the two were timed on different clocks (the anthropic SDK starts
        # its TTFT clock before its span). Kept as sent in metadata; the span's own bound is stored.
        row["metadata"] = {**(row["metadata"] or {}), "llm_observe.ttft_reported_ms": ttft}
        row["latency_ms_ttft"] = total
    has_tokens = span.prompt_tokens is not None or span.completion_tokens is not None
    if row["token_count_method"] is None and has_tokens:
        row["token_count_method"] = "unspecified"
    # 1.8.1 reports said what a span was in a free `span_type` key.
    given = span.kind or kind_normalize((extra or {}).get("span_type"))
    row["kind"] = kind_of(kind=given, model=span.model, has_tokens=has_tokens)
    row["duplicate_of"] = None
    span_tokens_and_cost(row, prices=prices)
    return row


def span_tokens_and_cost(row: dict, *, prices) -> None:
    """Price a row; a model call whose provider sent no token counts gets them counted from its text.

    Spans that are not model calls (a tool, a chain) are never priced: their cost is
    "not applicable", not unknown. Also called when a span's text arrives later (OTLP logs).
    """
    if row["duplicate_of"] or not is_model_call(row["kind"], row["model"]):
        row["cost_usd_micro"] = row["price_version"] = None
        return
    # A failed call was not billed (a 400, a timeout): nothing to estimate.
    if row["prompt_tokens"] is None and row["completion_tokens"] is None and row["status"] != "error":
        _estimate_tokens(row)
    cost = prices.cost(provider=row["provider"], model=row["model"], prompt_tokens=row["prompt_tokens"],
                       completion_tokens=row["completion_tokens"], cached_tokens=row["cached_tokens"])
    row["cost_usd_micro"] = cost.cost_usd_micro if cost else None
    row["price_version"] = cost.price_version if cost else None


def _estimate_tokens(row: dict) -> None:
    # The stored (redacted) text, with the model's tokenizer when it is known (tiktoken for OpenAI
    # models), else characters / ratio: either way an estimate, never the provider's count.
    prompt, response = row["prompt"], row["response"]
    if not prompt and not response:
        return
    row["prompt_tokens"] = count_tokens(prompt, row["model"])[0] if prompt else 0
    row["completion_tokens"] = count_tokens(response, row["model"])[0] if response else 0
    row["token_count_method"] = "estimated"


_row_values = operator.itemgetter(*COLUMNS)
_JSON_INDEXES = tuple(i for i, name in enumerate(COLUMNS) if name in _JSON_COLUMNS)


def copy_values(row: dict) -> list:
    """A row in COPY column order, JSON columns serialised."""
    values = list(_row_values(row))
    for i in _JSON_INDEXES:
        if values[i] is not None:
            # jsonb rejects \u0000 as well.
            values[i] = orjson.dumps(values[i], option=orjson.OPT_NON_STR_KEYS).decode().replace("\\u0000", "\\ufffd")
    return values


# Keys first: the small key table decides which spans are new (a concurrent writer of
# the same key waits for ours to commit, then skips it), and only those rows are
# COPYed, straight into the partitioned table.
_KEYS_SQL = """
INSERT INTO ingest_spankey (project_id, span_id, timestamp_utc)
SELECT k.p, k.s, k.t FROM jsonb_to_recordset(%s::jsonb) AS k(p bigint, s varchar, t timestamptz)
ON CONFLICT DO NOTHING
RETURNING project_id, span_id
"""
_COPY_SQL = f"COPY ingest_span ({', '.join(COLUMNS)}) FROM STDIN"


def spans_store(*, rows: list[dict]) -> StoreResult:
    """Store rows exactly once per (project, span_id); commit before returning."""
    if not rows:
        return StoreResult(0, 0)
    unique: dict[tuple[int, str], dict] = {}
    for row in rows:
        unique[(row["project_id"], row["span_id"])] = row  # the last copy of a repeated id wins
    days = {row["timestamp_utc"].date() for row in unique.values()}
    partitions_ensure(days=days)
    try:
        stored = _copy_and_insert(list(unique.values()))
    except IntegrityError as exc:
        # A partition this process believed in is gone (dropped by retention elsewhere,
        # or its creating transaction rolled back): forget what we knew and retry once.
        if not isinstance(exc.__cause__, psycopg.errors.CheckViolation):
            raise
        partitions_forget_cache()
        partitions_ensure(days=days)
        stored = _copy_and_insert(list(unique.values()))
    return StoreResult(stored=stored, duplicates=len(rows) - stored)


def _copy_and_insert(rows: list[dict]) -> int:
    with transaction.atomic(), connection.cursor() as cur:
        # One JSON parameter: Django's client-side binding would quote every array element in Python.
        keys = orjson.dumps([{"p": r["project_id"], "s": r["span_id"], "t": r["timestamp_utc"]} for r in rows])
        cur.execute(_KEYS_SQL, [keys.decode()])
        fresh = set(cur.fetchall())
        new_rows = [r for r in rows if (r["project_id"], r["span_id"]) in fresh]
        if new_rows:
            _link_calls_stored(cur, new_rows)
            content_merge_pending(cursor=cur, rows=new_rows)  # GenAI text from OTLP logs that came first
            # COPY is psycopg's own API, which Django does not wrap: without this its errors (a full
            # disk: psycopg DiskFull) miss the API's 503 handlers and the consumer's retry.
            with connection.wrap_database_errors, cur.copy(_COPY_SQL) as copy:
                for row in new_rows:
                    copy.write_row(copy_values(row))
            # The console's hourly sums count exactly what this transaction inserted.
            rollups_add(cur, new_rows)
            # Embeddings are computed by workers, only for what was really committed.
            transaction.on_commit(lambda: embeddings_enqueue(rows=new_rows))
        return len(new_rows)


# Spans stored earlier (another batch) that carry the tokens and cost of a call.
_CARRIERS_SQL = f"""
SELECT DISTINCT ON (k.i) k.i, {', '.join('s.' + c for c in _CARRIER_COLUMNS)}
FROM jsonb_to_recordset(%s::jsonb) AS k(i int, p bigint, r varchar, lo timestamptz, hi timestamptz)
JOIN ingest_span s ON s.project_id = k.p AND s.response_id = k.r AND s.duplicate_of IS NULL
    AND s.timestamp_utc BETWEEN k.lo - interval '1 day' AND k.hi
    AND s.timestamp_utc + coalesce(s.latency_ms_total, 0) * interval '1 millisecond' >= k.lo
ORDER BY k.i, s.span_id
"""
_DEMOTE_SQL = """
UPDATE ingest_span SET duplicate_of = %s, prompt_tokens = NULL, completion_tokens = NULL, cached_tokens = NULL,
    reasoning_tokens = NULL, cost_usd_micro = NULL, price_version = NULL, metadata = %s::jsonb
WHERE project_id = %s AND timestamp_utc = %s AND span_id = %s
"""


def _link_calls_stored(cur, rows: list[dict]) -> None:
    """New rows describing a call that an earlier batch already stored become its duplicates.

    Unless the new row is the client library's own span and the stored one is not: then the stored
    one becomes the duplicate (updated in place, its roll-ups taken back) and the new one carries.
    """
    keyed = [(key, row) for row in rows if row["duplicate_of"] is None and (key := _call_key(row)) is not None]
    if not keyed:
        return
    # Two batches carrying the two spans of one call must not both see no carrier: one waits.
    for key in sorted({key for key, _ in keyed}):
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 13))", [orjson.dumps(key).decode()])
    # Stored spans that ran at the same time as the new one (a span longer than a day is not a call).
    lookup = [{"i": i, "p": key[0], "r": key[1], "lo": _interval(row)[0] - _OVERLAP_TOLERANCE,
               "hi": _interval(row)[1] + _OVERLAP_TOLERANCE} for i, (key, row) in enumerate(keyed)]
    cur.execute(_CARRIERS_SQL, [orjson.dumps(lookup).decode()])
    carriers = {values[0]: dict(zip(_CARRIER_COLUMNS, values[1:])) for values in cur.fetchall()}
    demoted: list[tuple[dict, dict]] = []
    for i, (_, row) in enumerate(keyed):
        carrier = carriers.get(i)
        if carrier is None or carrier["span_id"] == row["span_id"]:
            continue
        if carrier["metadata"] is not None and not isinstance(carrier["metadata"], dict):
            carrier["metadata"] = orjson.loads(carrier["metadata"])
        if _is_client_librarys(row) and not _is_client_librarys(carrier) and row["prompt_tokens"] is not None:
            after = dict(carrier)
            span_mark_duplicate(after, of=row["span_id"])
            _inherit(row, carrier)
            demoted.append((carrier, after))
        else:
            span_mark_duplicate(row, of=carrier["span_id"])
    for before, after in demoted:
        cur.execute(_DEMOTE_SQL, [after["duplicate_of"], orjson.dumps(after["metadata"]).decode(),
                                  after["project_id"], after["timestamp_utc"], after["span_id"]])
    rollups_change(cur, demoted)


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    stored: int
    duplicates: int
    rejected: list[Rejection]
    warnings: list[str]


def spans_ingest(*, project, items: list[Any]) -> IngestResult:
    prepared = spans_prepare(project=project, items=items)
    if settings.WITH_KAFKA:
        # Kafka mode: durable once the broker acknowledged; the consumer calls spans_store.
        from ingest.producer import spans_produce

        spans_produce(rows=prepared.rows)
        stored = StoreResult(stored=0, duplicates=0)
    else:
        stored = spans_store(rows=prepared.rows)
    metrics_record_ingest(prepared=prepared, stored=stored)
    return IngestResult(
        accepted=len(prepared.rows),
        stored=stored.stored,
        duplicates=stored.duplicates,
        rejected=prepared.rejected,
        warnings=prepared.warnings,
    )
