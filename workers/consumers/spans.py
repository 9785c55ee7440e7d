"""`llm.spans.raw` -> PostgreSQL: decode each message with the span contract, store the batch.

Writes through `spans_store`, the storage service of direct mode, which stores each
(project, span_id) once: a batch re-delivered after a crash adds nothing.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections, connection

from ingest.contracts import ContractError, SpanMessageV1
from ingest.metrics import metrics_record_ingest
from ingest.models import Project
from ingest.services.spans import Prepared, StoreResult, spans_store
from workers.consumers import metrics
from workers.consumers.base import BatchConsumer, Poison, TransientError
from workers.queues import Topic

log = logging.getLogger(__name__)

# Errors of one row's content: that row can never be stored. Everything else from the
# database (connection lost, server restarting, even a missing table) is waited out.
_ROW_ERRORS = (DataError, IntegrityError)


class SpanConsumer(BatchConsumer):
    name = "spans"
    topic = str(Topic.SPANS_RAW)
    dlq_topic = str(Topic.SPANS_DLQ)
    transient_errors = (TransientError, DatabaseError)

    def process(self, messages: list[Message]) -> list[Poison]:
        close_old_connections()  # honours CONN_MAX_AGE and drops a connection broken by the last batch
        poison: list[Poison] = []
        rows: list[dict] = []
        sources: list[Message] = []
        for message in messages:
            try:
                rows.append(SpanMessageV1.from_bytes(message.value()).to_row())
                sources.append(message)
            except ContractError as exc:
                poison.append(Poison(message, "contract", str(exc)))
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
    def _store(rows: list[dict]) -> tuple[int, int]:
        result = spans_store(rows=rows)
        return result.stored, result.duplicates

    def on_retry(self, exc: BaseException) -> None:
        if isinstance(exc, DatabaseError):
            try:
                connection.close()
            except DatabaseError:
                pass
