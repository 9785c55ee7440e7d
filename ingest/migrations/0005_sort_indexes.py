"""Indexes for the console explorer's "most expensive" and "slowest" sorts.

On the partitioned span table each daily partition gets its own index, so a sort over
a time range is a merge of a few index scans that stops after one page.
"""

from django.db import migrations

INDEXES = {
    "ingest_span_cost_sort": "(project_id, cost_usd_micro DESC NULLS LAST, timestamp_utc DESC)",
    "ingest_span_latency_sort": "(project_id, latency_ms_total DESC NULLS LAST, timestamp_utc DESC)",
}


class Migration(migrations.Migration):
    dependencies = [("ingest", "0004_rollups")]

    operations = [
        migrations.RunSQL(f"CREATE INDEX IF NOT EXISTS {name} ON ingest_span {columns}",
                          f"DROP INDEX IF EXISTS {name}")
        for name, columns in INDEXES.items()
    ]
