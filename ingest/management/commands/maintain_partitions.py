from django.conf import settings
from django.core.management.base import BaseCommand

from ingest.services.partitions import partitions_create_ahead
from ingest.services.retention import retention_apply


class Command(BaseCommand):
    help = "Create span partitions ahead and drop those past RETENTION_DAYS, apply per-project retention (also run by Celery beat)."

    def handle(self, *args, **options):
        created = partitions_create_ahead(days_ahead=settings.PARTITIONS_AHEAD_DAYS)
        applied = retention_apply()
        trimmed = sum(applied["trimmed"].values())
        self.stdout.write(f"partitions: {len(created)} created, {len(applied['dropped'])} dropped; "
                          f"{trimmed} spans past their project's retention deleted")
