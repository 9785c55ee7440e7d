"""GenAI text that arrives in OTLP logs, joined to its span by trace and span id.

The text is scanned and redacted like a prompt before anything is written (PII never
reaches disk unredacted, here either). It fills the span's prompt / response only
where the span has none: a span's own text wins. Then:

- the span is stored already: its row is updated in place (found through
  ingest_spankey, updated on its partition key);
- the span has not arrived: the text waits in ingest_pendingcontent, at most
  OTLP_LOG_PENDING_SECONDS and OTLP_LOG_PENDING_MAX_ROWS rows per project, and
  `content_merge_pending` applies it to the span's row inside the transaction that
  stores the span (direct mode and the Kafka consumer alike, both call spans_store).

A log and its span written at the same moment by two transactions can miss each other
(each looks before the other commits); `content_pending_maintain`, run by the beat
every minute, applies such rows, then deletes the expired ones.

The text is what a model call without provider token counts (an OpenAI stream without
include_usage) is counted from: when it fills such a span, its tokens are estimated and
priced (spans.span_tokens_and_cost), counted again from the fuller text when a later export
brings the rest of an estimated span's text, and the hourly roll-ups get what changed
(rollups_change: the span itself is counted once). The choice's finish reason fills a span
that has none (a stream's span often carries none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import orjson
from django.conf import settings
from django.db import connection, transaction

from ingest.metrics import metrics_record_log_events, metrics_record_log_events_expired
from ingest.otlp_logs import SpanContent
from ingest.services.embeddings import embeddings_enqueue, prompt_hash
from ingest.services.pricing import price_table
from ingest.services.rollups import rollups_change
from ingest.services.scanning import scan_row

log = logging.getLogger(__name__)

PARTS = ("prompt", "response")


def pending_seconds() -> int:
    return int(getattr(settings, "OTLP_LOG_PENDING_SECONDS", 600))


def pending_max_rows() -> int:
    return int(getattr(settings, "OTLP_LOG_PENDING_MAX_ROWS", 100_000))


@dataclass(frozen=True)
class Part:
    """A prompt or a response, scanned: text redacted (None in drop mode when PII was found)."""

    text: str | None
    pii: bool
    injection: bool
    patterns: tuple[str, ...]
    scan_error: bool


@dataclass(frozen=True)
class Content:
    trace_id: str
    span_id: str
    prompt: Part | None
    response: Part | None
    events: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class ContentResult:
    applied: int  # log records whose span was stored: applied now
    pending: int  # waiting for their span
    dropped: int  # pending ones dropped to keep the project under OTLP_LOG_PENDING_MAX_ROWS
    unmatched: int  # their span id is stored under another trace id: nothing to join


def _scan(text: str | None, *, span_id: str, drop: bool) -> Part | None:
    if not text:
        return None
    # scan_row is the prompt's own path: same patterns, same redaction, same drop mode.
    row = {"span_id": span_id, "prompt": text.replace("\x00", "\ufffd")}
    scan_row(row, drop_text=drop)
    return Part(row["prompt"], row["pii_detected"], row["injection_attempt"],
                tuple(row["matched_patterns"] or ()), row["scan_status"] == "error")


def content_scan(*, project, items: list[SpanContent]) -> list[Content]:
    """The text of each span, scanned and redacted; spans whose records carried neither text nor a finish
    reason (content capture off, and no choice) are left out."""
    drop = project.redaction_mode == "drop"
    out = []
    for item in items:
        prompt = _scan(item.prompt_text(), span_id=item.span_id, drop=drop)
        response = _scan(item.response_text(), span_id=item.span_id, drop=drop)
        reason = item.finish_reason()
        if prompt or response or reason:
            out.append(Content(item.trace_id, item.span_id, prompt, response, item.events, reason))
    return out


def _merge_finish_reason(row: dict, contents: list[Content]) -> bool:
    """Fill a span row's missing finish reason from the contents' choices; True if it changed."""
    if row.get("finish_reason") is not None:
        return False
    reason = next((c.finish_reason for c in contents if c.finish_reason), None)
    row["finish_reason"] = reason
    return reason is not None


def _recount(row: dict, prices) -> None:
    """Tokens and cost of a model call whose text just grew: counted from the text unless the provider's."""
    from ingest.services.spans import span_tokens_and_cost  # spans imports this module

    if row["duplicate_of"]:
        return  # the span it names carries the call's tokens and cost
    if row.get("token_count_method") == "estimated":
        # Estimated from part of the text (the prompt's export came first): counted again from all of it.
        row["prompt_tokens"] = row["completion_tokens"] = row["token_count_method"] = None
    if row["prompt_tokens"] is None and row["completion_tokens"] is None:
        span_tokens_and_cost(row, prices=prices)


def _merge(row: dict, contents: list[Content]) -> bool:
    """Fill a span row's empty prompt / response from the contents (in their order); True if the text changed."""
    changed = error = False
    for name in PARTS:
        if row.get(name):
            continue  # the span's own text wins
        parts = [part for content in contents if (part := getattr(content, name)) is not None]
        if not parts:
            continue
        # Distinct texts in order: an exporter's retry sends the same records again.
        texts = list(dict.fromkeys(part.text for part in parts if part.text))
        row[name] = "\n".join(texts) or None
        row["pii_detected"] = bool(row.get("pii_detected")) or any(part.pii for part in parts)
        row["injection_attempt"] = bool(row.get("injection_attempt")) or any(part.injection for part in parts)
        patterns = set(row.get("matched_patterns") or ()).union(*(part.patterns for part in parts))
        row["matched_patterns"] = sorted(patterns) or None
        error = error or any(part.scan_error for part in parts)
        changed = True
    if changed:
        if error:
            row["scan_status"] = "error"
        elif row.get("scan_status") is None:
            row["scan_status"] = "ok"
        row["prompt_hash"] = prompt_hash(row)  # as in spans_prepare
    return changed


# --- the span is stored ----------------------------------------------------------------
_KEYS_SQL = "SELECT span_id, timestamp_utc FROM ingest_spankey WHERE project_id = %s AND span_id = ANY(%s)"
_STORED_COLUMNS = ("span_id", "timestamp_utc", "trace_id", "prompt", "response", "pii_detected", "injection_attempt",
                   "matched_patterns", "scan_status", "is_sampled", "prompt_hash", "finish_reason",
                   # what span_tokens_and_cost reads and writes
                   "kind", "model", "provider", "status", "prompt_tokens", "completion_tokens", "cached_tokens",
                   "token_count_method", "duplicate_of", "cost_usd_micro", "price_version",
                   # what the roll-ups read besides
                   "service_name", "user_id", "latency_ms_total", "latency_ms_ttft")
# The timestamps are literals (Django binds on the client): only their partitions are read. Locked in
# span id order, so two requests updating the same spans wait for each other rather than deadlock.
_STORED_SQL = (f"SELECT {', '.join(_STORED_COLUMNS)} FROM ingest_span "
               "WHERE project_id = %s AND timestamp_utc = ANY(%s) AND span_id = ANY(%s) ORDER BY span_id FOR UPDATE")
_UPDATED_COLUMNS = ("prompt", "response", "pii_detected", "injection_attempt", "matched_patterns", "scan_status",
                    "prompt_hash", "finish_reason", "prompt_tokens", "completion_tokens", "token_count_method",
                    "cost_usd_micro", "price_version")
_UPDATE_SQL = (
    "UPDATE ingest_span SET "
    + ", ".join(f"{c} = %s::jsonb" if c == "matched_patterns" else f"{c} = %s" for c in _UPDATED_COLUMNS)
    + " WHERE project_id = %s AND timestamp_utc = %s AND span_id = %s"
)


def _apply_stored(cur, *, project_id: int, contents: list[Content]) -> tuple[set[str], set[str]]:
    """Apply contents to their stored spans; (span ids applied, span ids stored under another trace)."""
    by_span: dict[str, list[Content]] = {}
    for content in contents:
        by_span.setdefault(content.span_id, []).append(content)
    cur.execute(_KEYS_SQL, [project_id, list(by_span)])
    keys = dict(cur.fetchall())
    if not keys:
        return set(), set()
    cur.execute(_STORED_SQL, [project_id, sorted(set(keys.values())), list(keys)])
    applied, other_trace, updates, embed, changes = set(), set(), [], [], []
    prices = None
    for values in cur.fetchall():
        row = dict(zip(_STORED_COLUMNS, values), project_id=project_id)
        if keys.get(row["span_id"]) != row["timestamp_utc"]:
            continue
        if isinstance(row["matched_patterns"], str):
            row["matched_patterns"] = orjson.loads(row["matched_patterns"])
        mine = [c for c in by_span[row["span_id"]] if c.trace_id == row["trace_id"]]
        if not mine:
            other_trace.add(row["span_id"])
            continue
        applied.add(row["span_id"])
        before = dict(row)
        text = _merge(row, mine)
        reason = _merge_finish_reason(row, mine)
        if not (text or reason):
            continue
        if text:
            prices = prices or price_table()
            _recount(row, prices)
        changes.append((before, row))
        updates.append([orjson.dumps(row[c]).decode() if c == "matched_patterns" and row[c] else row[c]
                        for c in _UPDATED_COLUMNS] + [project_id, row["timestamp_utc"], row["span_id"]])
        new_hash = row["prompt_hash"] and row["prompt_hash"] != before["prompt_hash"]
        new_prompt = row["prompt"] and row["prompt"] != before["prompt"]
        if new_hash or new_prompt:
            # The embedding (a new sampled hash) and tier-2 injection classification (a new prompt).
            embed.append({"project_id": project_id, "prompt_hash": row["prompt_hash"] if new_hash else None,
                          "timestamp_utc": row["timestamp_utc"], "span_id": row["span_id"],
                          "prompt": row["prompt"] if new_prompt else None,
                          "injection_attempt": row["injection_attempt"]})
    if updates:
        cur.executemany(_UPDATE_SQL, updates)
        # The span was counted when it was stored: the roll-ups get only what changed (tokens, cost, flags).
        rollups_change(cur, changes)
    if embed:
        transaction.on_commit(lambda: embeddings_enqueue(rows=embed))
    return applied, other_trace


# --- the span has not arrived ------------------------------------------------------------
def _pending_row(project_id: int, content: Content, received_at: datetime, expires_at: datetime):
    from ingest.models import PendingContent

    fields = {}
    for name in PARTS:
        part = getattr(content, name)
        if part is not None:
            fields.update({name: part.text, f"{name}_pii": part.pii, f"{name}_injection": part.injection,
                           f"{name}_patterns": list(part.patterns) or None})
    if content.finish_reason:
        fields["finish_reason"] = content.finish_reason
    error = any(p is not None and p.scan_error for p in (content.prompt, content.response))
    return PendingContent(project_id=project_id, trace_id=content.trace_id, span_id=content.span_id,
                          scan_status="error" if error else "ok", events=content.events,
                          received_at=received_at, expires_at=expires_at, **fields)


_OLDEST_KEPT_SQL = """
SELECT id FROM ingest_pendingcontent WHERE project_id = %s ORDER BY id DESC OFFSET %s LIMIT 1
"""
_TRIM_SQL = "DELETE FROM ingest_pendingcontent WHERE project_id = %s AND id <= %s RETURNING events"


def _trim(cur, project_id: int) -> int:
    """Drop the project's oldest pending rows past OTLP_LOG_PENDING_MAX_ROWS; the log records dropped."""
    cur.execute(_OLDEST_KEPT_SQL, [project_id, pending_max_rows()])
    first_dropped = cur.fetchone()
    if first_dropped is None:
        return 0
    cur.execute(_TRIM_SQL, [project_id, first_dropped[0]])
    return sum(events for (events,) in cur.fetchall())


def content_ingest(*, project, items: list[SpanContent], received_at: datetime | None = None) -> ContentResult:
    """Scan the spans' text, apply it to the stored ones, keep the rest until their span lands."""
    from ingest.models import PendingContent

    contents = content_scan(project=project, items=items)
    if not contents:
        return ContentResult(0, 0, 0, 0)
    received_at = received_at or datetime.now(timezone.utc)
    expires_at = received_at + timedelta(seconds=pending_seconds())
    with transaction.atomic(), connection.cursor() as cur:
        applied_ids, other_trace = _apply_stored(cur, project_id=project.id, contents=contents)
        waiting = [c for c in contents if c.span_id not in applied_ids and c.span_id not in other_trace]
        dropped = 0
        if waiting:
            PendingContent.objects.bulk_create([_pending_row(project.id, c, received_at, expires_at)
                                                for c in waiting])
            dropped = _trim(cur, project.id)
    result = ContentResult(
        applied=sum(c.events for c in contents if c.span_id in applied_ids),
        pending=sum(c.events for c in waiting),
        dropped=dropped,
        unmatched=sum(c.events for c in contents if c.span_id in other_trace),
    )
    for outcome in ("applied", "pending", "dropped", "unmatched"):
        metrics_record_log_events(outcome=outcome, count=getattr(result, outcome))
    if dropped:
        log.warning("project %s: %d pending GenAI log records dropped (over OTLP_LOG_PENDING_MAX_ROWS=%d)",
                    project.id, dropped, pending_max_rows())
    return result


# --- the span lands ----------------------------------------------------------------
_PENDING_COLUMNS = ("id", "project_id", "trace_id", "span_id", "prompt", "prompt_pii", "prompt_injection",
                    "prompt_patterns", "response", "response_pii", "response_injection", "response_patterns",
                    "scan_status", "events", "finish_reason")
_TAKE_SQL = f"""
DELETE FROM ingest_pendingcontent p
USING jsonb_to_recordset(%s::jsonb) AS k(p bigint, s varchar, t varchar)
WHERE p.project_id = k.p AND p.span_id = k.s AND p.trace_id = k.t
RETURNING {', '.join('p.' + c for c in _PENDING_COLUMNS)}
"""
_LANDED_SQL = f"""
DELETE FROM ingest_pendingcontent p USING ingest_spankey k
WHERE k.project_id = p.project_id AND k.span_id = p.span_id
RETURNING {', '.join('p.' + c for c in _PENDING_COLUMNS)}
"""


def _json(value):
    return orjson.loads(value) if isinstance(value, str) else value


def _patterns(value) -> tuple[str, ...]:
    return tuple(_json(value) or ())


def _from_pending(values) -> tuple[int, Content]:
    row = dict(zip(_PENDING_COLUMNS, values))
    parts = {}
    for name in PARTS:
        if row[name] is not None or row[f"{name}_pii"]:
            parts[name] = Part(row[name], row[f"{name}_pii"], row[f"{name}_injection"],
                               _patterns(row[f"{name}_patterns"]), row["scan_status"] == "error")
    return row["project_id"], Content(row["trace_id"], row["span_id"], parts.get("prompt"), parts.get("response"),
                                      row["events"], row["finish_reason"])


def content_merge_pending(*, cursor, rows: list[dict]) -> int:
    """Fill the span rows about to be inserted from their pending log text, and delete it.

    Called by spans_store inside its transaction, before the COPY: rolled back with it.
    Returns the number of log records applied.
    """
    if not rows:
        return 0
    keys = orjson.dumps([{"p": r["project_id"], "s": r["span_id"], "t": r["trace_id"]} for r in rows])
    cursor.execute(_TAKE_SQL, [keys.decode()])
    taken = sorted(cursor.fetchall())  # by id: the order they arrived in
    if not taken:
        return 0
    by_key: dict[tuple[int, str], list[Content]] = {}
    for values in taken:
        project_id, content = _from_pending(values)
        by_key.setdefault((project_id, content.span_id), []).append(content)
    events = 0
    prices = price_table()
    for row in rows:
        contents = by_key.get((row["project_id"], row["span_id"]))
        if contents:
            _merge_finish_reason(row, contents)
            if _merge(row, contents):
                # A call whose provider sent no token counts: counted from the text that just arrived.
                # Before the COPY: rollups_add counts the row as it is stored.
                _recount(row, prices)
            events += sum(c.events for c in contents)
    transaction.on_commit(lambda: metrics_record_log_events(outcome="merged", count=events))
    return events


def content_pending_maintain(*, now: datetime | None = None) -> dict:
    """Apply pending rows whose span is stored by now; delete the expired ones. For the beat."""
    now = now or datetime.now(timezone.utc)
    merged = unmatched = 0
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(_LANDED_SQL)
        by_project: dict[int, list[Content]] = {}
        for values in sorted(cur.fetchall()):
            project_id, content = _from_pending(values)
            by_project.setdefault(project_id, []).append(content)
        for project_id, contents in by_project.items():
            applied_ids, other_trace = _apply_stored(cur, project_id=project_id, contents=contents)
            merged += sum(c.events for c in contents if c.span_id in applied_ids)
            unmatched += sum(c.events for c in contents if c.span_id in other_trace)
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("DELETE FROM ingest_pendingcontent WHERE expires_at <= %s RETURNING events", [now])
        expired = sum(events for (events,) in cur.fetchall())
    metrics_record_log_events(outcome="merged", count=merged)
    metrics_record_log_events(outcome="unmatched", count=unmatched)
    metrics_record_log_events_expired(count=expired)
    if expired:
        log.info("%d pending GenAI log records expired without their span", expired)
    return {"merged": merged, "unmatched": unmatched, "expired": expired}
