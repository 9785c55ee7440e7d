"""Celery tasks. They take ids or plain values, never model instances."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from ingest.services.partitions import partitions_create_ahead, partitions_drop_expired
from workers import heartbeat  # noqa: F401 - registers the worker heartbeat signal


@shared_task(name="maintenance.partitions", ignore_result=True)
def maintain_partitions() -> dict:
    created = partitions_create_ahead(days_ahead=settings.PARTITIONS_AHEAD_DAYS)
    dropped = partitions_drop_expired(retention_days=settings.RETENTION_DAYS)
    return {"created": [d.isoformat() for d in created], "dropped": [d.isoformat() for d in dropped]}
