import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])

app.conf.beat_schedule = {
    # Hourly is plenty: partitions are made days ahead, and on demand for late spans.
    "partitions": {"task": "maintenance.partitions", "schedule": 3600.0},
    "embedding-backfill": {"task": "enrichment.backfill", "schedule": 600.0},
    # GenAI text from OTLP logs waits OTLP_LOG_PENDING_SECONDS (default 600) for its span: a minute is fine-grained.
    "pending-content": {"task": "maintenance.pending_content", "schedule": 60.0},
}
