"""Spans have a name and a kind, and two spans of one model call are linked.

`kind` says what a span is (LLM, CHAIN, TOOL, AGENT, RETRIEVER, EMBEDDING, RERANKER,
GUARDRAIL, EVALUATOR, UNKNOWN): only model calls are priced. `response_id` is the
provider's id of the answer; when two spans carry the same one (an instrumentation's
span beside the client library's own, running at the same time), the later is stored with
`duplicate_of` naming the first and without tokens or cost, so the call is counted once.

Adding nullable columns to the partitioned table touches no row. The kind index serves
the explorer's filter; the response index the duplicate lookup, and only holds spans
that have a response id.
"""

from django.db import migrations, models

COLUMNS = """
ALTER TABLE ingest_span ADD COLUMN IF NOT EXISTS name varchar(500) NULL;
ALTER TABLE ingest_span ADD COLUMN IF NOT EXISTS kind varchar(16) NULL;
ALTER TABLE ingest_span ADD COLUMN IF NOT EXISTS response_id varchar(200) NULL;
ALTER TABLE ingest_span ADD COLUMN IF NOT EXISTS duplicate_of varchar(128) NULL;
CREATE INDEX IF NOT EXISTS ingest_span_kind ON ingest_span (project_id, kind, timestamp_utc DESC);
CREATE INDEX IF NOT EXISTS ingest_span_response ON ingest_span (project_id, response_id, timestamp_utc)
    WHERE response_id IS NOT NULL;
"""

DROP = """
DROP INDEX IF EXISTS ingest_span_response;
DROP INDEX IF EXISTS ingest_span_kind;
ALTER TABLE ingest_span DROP COLUMN IF EXISTS duplicate_of;
ALTER TABLE ingest_span DROP COLUMN IF EXISTS response_id;
ALTER TABLE ingest_span DROP COLUMN IF EXISTS kind;
ALTER TABLE ingest_span DROP COLUMN IF EXISTS name;
"""


class Migration(migrations.Migration):
    dependencies = [("ingest", "0009_embeddingday_halfvec")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(COLUMNS, DROP)],
            state_operations=[
                migrations.AddField("span", "name", models.CharField(max_length=500, null=True)),
                migrations.AddField("span", "kind", models.CharField(max_length=16, null=True)),
                migrations.AddField("span", "response_id", models.CharField(max_length=200, null=True)),
                migrations.AddField("span", "duplicate_of", models.CharField(max_length=128, null=True)),
            ],
        ),
    ]
