"""Celery tasks. They take ids or plain values, never model instances."""

from __future__ import annotations

from datetime import datetime

from celery import shared_task
from django.conf import settings

from ingest.services.embeddings import embeddings_backfill, embeddings_compute
from ingest.services.partitions import partitions_create_ahead
from ingest.services.retention import retention_apply
from ingest.services.security_tier2 import injection_tier2_classify
from ingest.services.span_content import content_pending_maintain
from workers import heartbeat  # noqa: F401 - registers the worker heartbeat signal


@shared_task(name="maintenance.partitions", ignore_result=True)
def maintain_partitions() -> dict:
    created = partitions_create_ahead(days_ahead=settings.PARTITIONS_AHEAD_DAYS)
    applied = retention_apply()
    return {"created": [d.isoformat() for d in created], "dropped": [d.isoformat() for d in applied["dropped"]],
            "trimmed": applied["trimmed"]}


@shared_task(name="maintenance.pending_content", ignore_result=True)
def maintain_pending_content() -> dict:
    """GenAI log text still waiting for its span: applied if the span landed meanwhile, else expired."""
    return content_pending_maintain()


# Enrichment of committed spans: retried with backoff, acknowledged after it ran (a worker that dies runs it again).
_ENRICHMENT = dict(ignore_result=True, autoretry_for=(Exception,), retry_backoff=2, retry_backoff_max=300,
                   max_retries=8, acks_late=True)


@shared_task(name="enrichment.embed_prompts", **_ENRICHMENT)
def embed_prompts(*, project_id: int, content_keys: list[str], start: str, end: str) -> int:
    """Embed the sampled prompts of one committed batch (retried with backoff; ingestion never waits)."""
    return embeddings_compute(project_id=project_id, content_keys=content_keys,
                              start=datetime.fromisoformat(start), end=datetime.fromisoformat(end))


@shared_task(name="enrichment.backfill", ignore_result=True)
def backfill_embeddings(hours: int = 24) -> int:
    """Catch sampled prompts whose task was lost (broker down at commit time)."""
    return embeddings_backfill(hours=hours)


@shared_task(name="enrichment.classify_injections", **_ENRICHMENT)
def classify_injections(*, project_id: int, span_ids: list[str], start: str, end: str,
                        committed_at: str | None = None) -> dict:
    """Tier-2 (semantic) injection flags on one committed batch's prompts (a retry flags and counts nothing twice)."""
    return injection_tier2_classify(project_id=project_id, span_ids=span_ids, start=datetime.fromisoformat(start),
                                    end=datetime.fromisoformat(end),
                                    committed_at=datetime.fromisoformat(committed_at) if committed_at else None)
