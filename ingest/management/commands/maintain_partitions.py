from django.conf import settings
from django.core.management.base import BaseCommand

from ingest.services.partitions import partitions_create_ahead, partitions_drop_expired


class Command(BaseCommand):
    help = "Create span partitions ahead and drop those past RETENTION_DAYS (also run by Celery beat)."

    def handle(self, *args, **options):
        created = partitions_create_ahead(days_ahead=settings.PARTITIONS_AHEAD_DAYS)
        dropped = partitions_drop_expired(retention_days=settings.RETENTION_DAYS)
        self.stdout.write(f"partitions: {len(created)} created, {len(dropped)} dropped")
