from __future__ import annotations

from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from ingest.models import Project, Span
from ingest.services.spans import FUTURE_TOLERANCE


def projects_for_user(*, user):
    """Staff see every project; others the projects they are members of."""
    qs = Project.objects.all()
    return qs if user.is_staff else qs.filter(members=user)


def project_summaries(*, user) -> list[dict]:
    since = timezone.now() - timedelta(hours=24)
    projects = list(projects_for_user(user=user).annotate(
        active_keys=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True))))
    counts = dict(
        Span.objects.filter(project_id__in=[p.id for p in projects], timestamp_utc__gte=since)
        .values_list("project_id").annotate(n=Count("span_id")).values_list("project_id", "n")
    )
    return [{"project": p, "active_keys": p.active_keys, "spans_24h": counts.get(p.id, 0)} for p in projects]


def project_for_user(*, user, name: str) -> Project | None:
    """The project of that name if the user may see it (staff: any), else None."""
    return projects_for_user(user=user).filter(name=name).first()


def project_keys(*, project: Project) -> list:
    return list(project.api_keys.order_by("revoked_at", "-created_at"))


def project_data_window(*, project: Project, now: datetime | None = None) -> tuple[datetime, datetime]:
    """(earliest, latest): the times this project can hold spans for, the bounds of any console range.

    The earliest is retention's own cut-off (ingest.services.retention: whole UTC days of the
    project's retention_days, else RETENTION_DAYS), so a range never reads days already deleted;
    the latest is as far ahead as ingestion accepts a span stamped by a fast clock.
    """
    now = now or timezone.now()
    days = project.retention_days or settings.RETENTION_DAYS
    earliest = datetime.combine(now.date() - timedelta(days=days), time.min, tzinfo=dt_timezone.utc)
    return earliest, now + FUTURE_TOLERANCE
