"""`llm.spans.raw` -> PostgreSQL: decode each message with the span contract, store the batch.

Writes through `spans_store`, the storage service of direct mode, which stores each
(project, span_id) once: a batch re-delivered after a crash adds nothing.

Messages of the web process are prepared rows and are stored as they are. Messages
the SDK produced straight to Kafka (they carry HEADER_ORIGIN) are a client's spans:
the project comes from the API key named in HEADER_KEY (unknown or revoked key: DLQ),
and the span goes through `spans_prepare` like a POST /v1/spans would (validation,
PII/injection scan with the server's patterns and the project's redaction mode,
sampling, pricing); a span it rejects goes to the DLQ with the rule.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import psycopg
from confluent_kafka import Message
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections, connection

from ingest import kafka_metrics as metrics
from ingest.contracts import HEADER_KEY, HEADER_ORIGIN, PROJECT_FROM_KEY, ContractError, span_message_from_bytes
from ingest.kinds import kind_normalize
from ingest.metrics import metrics_record_ingest
from ingest.models import Project
from ingest.queues import Topic
from ingest.selectors.api_keys import api_key_check_hashed
from ingest.services.spans import Prepared, StoreResult, spans_prepare, spans_store
from workers.consumers.base import BatchConsumer, Poison, TransientError

log = logging.getLogger(__name__)

# Errors of one row's content: that row can never be stored. Everything else from the
# database (connection lost, server restarting, disk full, even a missing table) is waited out.
# psycopg's own classes too: what the store sends by COPY reaches us unwrapped by Django
# (a full disk came out as psycopg.errors.DiskFull and stopped the consumer).
_ROW_ERRORS = (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError)
_DATABASE_ERRORS = (DatabaseError, psycopg.Error)
# What the appliance derives itself: never taken from a client's message.
_SERVER_FIELDS = ("project_id", "received_at", "cost_usd_micro", "price_version", "matched_patterns", "scan_status",
                  "prompt_hash", "is_sampled")


def _header(message: Message, name: str) -> bytes | None:
    for key, value in message.headers() or ():
        if key == name:
            return value
    return None


def _key_project(header: bytes | None) -> tuple[Project | None, str]:
    """(project, "") for a valid key header ("prefix:sha256"); (None, poison reason) otherwise."""
    if not header:
        return None, "unauthenticated"
    prefix, _, digest = header.decode("ascii", "replace").partition(":")
    if not prefix or len(digest) != 64:
        return None, "unauthenticated"
    check = api_key_check_hashed(prefix=prefix, digest=digest)
    if check.project is None:
        return None, "unauthenticated"
    if check.revoked:
        return None, "revoked_key"
    return check.project, ""


# Span fields newer than the SDK's message (version 1): its Kafka transport sends them as
# metadata keys, like any key it does not know; over HTTP they are fields.
_PROMOTED = ("name", "kind", "response_id")


def _client_span(row: dict) -> dict:
    """A decoded SDK message as the span a client would POST (spans_prepare's input)."""
    span = {k: v for k, v in row.items() if v is not None and k not in _SERVER_FIELDS}
    metadata = span.get("metadata")
    if isinstance(metadata, dict) and any(key in metadata for key in _PROMOTED):
        metadata = dict(metadata)
        for key in _PROMOTED:
            # A user's own metadata "kind" that names no kind stays metadata (it would fail validation).
            if key in metadata and key not in span and isinstance(metadata[key], str) and (
                    key != "kind" or kind_normalize(metadata[key]) is not None):
                span[key] = metadata.pop(key)
        span["metadata"] = metadata or None
    return span


class SpanConsumer(BatchConsumer):
    name = "spans"
    topic = str(Topic.SPANS_RAW)
    dlq_topic = str(Topic.SPANS_DLQ)
    transient_errors = (TransientError, *_DATABASE_ERRORS)

    def process(self, messages: list[Message]) -> list[Poison]:
        close_old_connections()  # honours CONN_MAX_AGE and drops a connection broken by the last batch
        poison: list[Poison] = []
        rows: list[dict] = []
        sources: list[Message] = []
        from_clients: list[tuple[dict, Message]] = []
        for message in messages:
            try:
                row = span_message_from_bytes(message.value()).to_row()
            except ContractError as exc:
                poison.append(Poison(message, "contract", str(exc)))
                continue
            if _header(message, HEADER_ORIGIN) is not None:
                from_clients.append((row, message))
            else:
                rows.append(row)
                sources.append(message)
        if from_clients:
            prepared_rows, prepared_sources, rejected = self._prepare_client_spans(from_clients)
            rows += prepared_rows
            sources += prepared_sources
            poison += rejected
        if rows:
            known = set(Project.objects.filter(id__in={r["project_id"] for r in rows}).values_list("id", flat=True))
            if len(known) < len({r["project_id"] for r in rows}):
                kept = [(r, m) for r, m in zip(rows, sources) if r["project_id"] in known]
                poison += [Poison(m, "unknown_project", f"project {r['project_id']} does not exist")
                           for r, m in zip(rows, sources) if r["project_id"] not in known]
                rows, sources = [r for r, _ in kept], [m for _, m in kept]
        if rows:
            try:
                stored, duplicates = self._store(rows)
            except _ROW_ERRORS:
                # Some row is unstorable: find it by storing one at a time (rare, so slow is fine).
                stored = duplicates = 0
                for row, message in zip(rows, sources):
                    try:
                        one, again = self._store([row])
                        stored, duplicates = stored + one, duplicates + again
                    except _ROW_ERRORS as exc:
                        poison.append(Poison(message, "storage_rejected", f"{type(exc).__name__}: {exc}".strip()))
            metrics.SPANS_STORED.labels(self.topic).inc(stored)
            metrics.SPANS_DUPLICATES.labels(self.topic).inc(duplicates)
            # The span metrics (llm_spans, tokens, cost, ...) of direct mode, counted where the rows are written.
            poisoned = {id(p.message) for p in poison}
            stored_rows = [r for r, m in zip(rows, sources) if id(m) not in poisoned]
            metrics_record_ingest(prepared=Prepared(rows=stored_rows),
                                  stored=StoreResult(stored=stored, duplicates=duplicates))
            self._counts["stored"] += stored
        return poison

    @staticmethod
    def _prepare_client_spans(items: list[tuple[dict, Message]]) -> tuple[list[dict], list[Message], list[Poison]]:
        """SDK messages: authenticate the key, then validate/scan/sample/price as the HTTP API does."""
        poison: list[Poison] = []
        groups: dict[int, tuple[Project, list[tuple[dict, Message]]]] = {}
        for row, message in items:
            project, problem = _key_project(_header(message, HEADER_KEY))
            if project is None:
                poison.append(Poison(message, problem, "the API key of the message is unknown" if
                                     problem == "unauthenticated" else "the API key of the message was revoked"))
                continue
            if row["project_id"] not in (PROJECT_FROM_KEY, project.id):
                poison.append(Poison(message, "project_mismatch",
                                     f"project {row['project_id']} is not the project of the API key"))
                continue
            groups.setdefault(project.id, (project, []))[1].append((row, message))
        rows: list[dict] = []
        sources: list[Message] = []
        received_at = datetime.now(timezone.utc)
        for project, group in groups.values():
            prepared = spans_prepare(project=project, items=[_client_span(row) for row, _ in group],
                                     received_at=received_at)
            rejected = {r.index: r for r in prepared.rejected}
            accepted = [message for index, (_, message) in enumerate(group) if index not in rejected]
            rows += prepared.rows
            sources += accepted
            for index, rejection in rejected.items():
                poison.append(Poison(group[index][1], "invalid", f"{rejection.rule} "
                                     f"({rejection.field or 'span'}): {rejection.reason}"))
        return rows, sources, poison

    @staticmethod
    def _store(rows: list[dict]) -> tuple[int, int]:
        result = spans_store(rows=rows)
        return result.stored, result.duplicates

    def on_retry(self, exc: BaseException) -> None:
        if isinstance(exc, _DATABASE_ERRORS):
            try:
                connection.close()
            except _DATABASE_ERRORS:
                pass
