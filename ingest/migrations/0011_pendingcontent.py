"""GenAI text from OTLP logs that arrived before its span (services.span_content).

A small, short-lived table: rows wait at most OTLP_LOG_PENDING_SECONDS for their span.
Looked up by (project, span_id) in every spans insert, trimmed per project by age (id)
and expired by expires_at.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ingest", "0010_span_name_kind")]

    operations = [
        migrations.CreateModel(
            name="PendingContent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("trace_id", models.CharField(max_length=128)),
                ("span_id", models.CharField(max_length=128)),
                ("prompt", models.TextField(null=True)),
                ("prompt_pii", models.BooleanField(default=False)),
                ("prompt_injection", models.BooleanField(default=False)),
                ("prompt_patterns", models.JSONField(null=True)),
                ("response", models.TextField(null=True)),
                ("response_pii", models.BooleanField(default=False)),
                ("response_injection", models.BooleanField(default=False)),
                ("response_patterns", models.JSONField(null=True)),
                ("scan_status", models.CharField(max_length=8, null=True)),
                ("events", models.PositiveIntegerField(default=1, help_text="log records merged into this row")),
                ("received_at", models.DateTimeField()),
                ("expires_at", models.DateTimeField(db_index=True)),
                ("project", models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE,
                                              related_name="+", to="ingest.project")),
            ],
            options={
                "indexes": [
                    models.Index(fields=["project", "span_id"], name="pendingcontent_span"),
                    models.Index(fields=["project", "id"], name="pendingcontent_age"),
                ],
            },
        ),
    ]
