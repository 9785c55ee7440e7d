"""Retention: whole partitions past RETENTION_DAYS, and shorter per-project retention inside them."""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta, timezone

from django.conf import settings
from django.db import connection, transaction

from ingest.models import Project
from ingest.services.partitions import DELETE_BATCH, delete_batched, partitions_drop_expired
from ingest.services.rollups import rollups_delete

log = logging.getLogger(__name__)


def retention_apply(*, today: date | None = None) -> dict:
    """Drop expired partitions, then delete what projects with a shorter retention no longer keep."""
    today = today or datetime.now(timezone.utc).date()
    dropped = partitions_drop_expired(retention_days=settings.RETENTION_DAYS, today=today)
    cutoff = datetime.combine(today - timedelta(days=settings.RETENTION_DAYS), time.min, tzinfo=timezone.utc)
    rollups_delete(before=cutoff)
    trimmed = {}
    shorter = Project.objects.filter(retention_days__lt=settings.RETENTION_DAYS).values_list("id", "name",
                                                                                           "retention_days")
    for project_id, name, days in shorter:
        project_cutoff = datetime.combine(today - timedelta(days=days), time.min, tzinfo=timezone.utc)
        spans = delete_batched(
            # By primary key: a ctid is only unique within one partition.
            "DELETE FROM ingest_span WHERE (project_id, timestamp_utc, span_id) IN (SELECT project_id, timestamp_utc, "
            f"span_id FROM ingest_span WHERE project_id = %s AND timestamp_utc < %s LIMIT {DELETE_BATCH})",
            [project_id, project_cutoff])
        delete_batched(
            "DELETE FROM ingest_spankey WHERE ctid = ANY(ARRAY(SELECT ctid FROM ingest_spankey "
            f"WHERE project_id = %s AND timestamp_utc < %s LIMIT {DELETE_BATCH}))", [project_id, project_cutoff])
        # Prompts seen only before the cutoff lose their global vector, then the days' copies go.
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(
                "DELETE FROM ingest_embedding e USING (SELECT DISTINCT content_key FROM ingest_embeddingday "
                "WHERE project_id = %s AND day < %s) k WHERE e.project_id = %s AND e.content_key = k.content_key "
                "AND NOT EXISTS (SELECT 1 FROM ingest_embeddingday d WHERE d.project_id = %s "
                "AND d.content_key = k.content_key AND d.day >= %s)",
                [project_id, project_cutoff.date(), project_id, project_id, project_cutoff.date()])
        delete_batched(
            "DELETE FROM ingest_embeddingday WHERE (project_id, day, content_key, service_name, model, provider) IN ("
            "SELECT project_id, day, content_key, service_name, model, provider FROM ingest_embeddingday "
            f"WHERE project_id = %s AND day < %s LIMIT {DELETE_BATCH})", [project_id, project_cutoff.date()])
        rollups_delete(before=project_cutoff, project_id=project_id)
        if spans:
            log.info("retention: deleted %d spans of project %s older than %d days", spans, name, days)
        trimmed[name] = spans
    return {"dropped": dropped, "trimmed": trimmed}
