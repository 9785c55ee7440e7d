"""Upgrades keep data: migrations 0007/0008 give the embeddings of an existing installation their day
copies and facets; 0009 turns the copies into half precision."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from ingest.services.partitions import partitions_forget_cache


def _migrate(target: str) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([("ingest", target)])


@pytest.fixture
def at_0006(db):
    """The schema of 0006 inside the test's transaction (DDL is transactional: rolled back after)."""
    _migrate("0006_hnsw_m24")
    partitions_forget_cache()
    yield
    partitions_forget_cache()


def test_0007_copies_each_prompt_vector_to_its_days_services_and_models(at_0006, project):
    day1, day2 = datetime(2026, 11, 20, 10, tzinfo=timezone.utc), datetime(2026, 11, 21, 23, tzinfo=timezone.utc)
    vector = "[" + ",".join(["0.05"] * 384) + "]"
    with connection.cursor() as cur:
        for day in (day1, day2):
            cur.execute(f"CREATE TABLE ingest_span_p{day:%Y%m%d} PARTITION OF ingest_span "
                        f"FOR VALUES FROM ('{day.date()}') TO ('{day.date()}'::date + 1)")
        spans = [("a", day1, "support", "gpt-4o", "openai", "k1", False),
                 ("b", day1, "billing", "gpt-4o", "openai", "k1", False),
                 ("c", day2, "support", "gpt-4o", "openai", "k1", False),
                 ("d", day2, None, None, None, "k2", False),
                 ("e", day2, "support", "gpt-4o", "openai", "k3", True)]  # PII: never embedded
        for span_id, ts, service, model, provider, key, pii in spans:
            cur.execute("INSERT INTO ingest_span (project_id, span_id, timestamp_utc, trace_id, status, received_at, "
                        "service_name, model, provider, prompt, prompt_hash, pii_detected, is_sampled) "
                        "VALUES (%s, %s, %s, 't', 'success', now(), %s, %s, %s, 'p', %s, %s, true)",
                        [project.id, span_id, ts, service, model, provider, key, pii])
        for key in ("k1", "k2"):
            cur.execute("INSERT INTO ingest_embedding (project_id, content_key, embedding, model_name, created_at) "
                        "VALUES (%s, %s, %s::vector, 'all-MiniLM-L6-v2', now())", [project.id, key, vector])

    _migrate("0008_embedding_facets")

    with connection.cursor() as cur:
        cur.execute("SELECT tableoid::regclass::text, day, content_key, service_name, model, provider, "
                    "embedding::text = %s FROM ingest_embeddingday ORDER BY 2, 3, 4", [vector])
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM ingest_embedding")
        global_rows = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'ingest_embeddingday_p20261120' "
                    "AND indexdef LIKE '%%USING hnsw%%'")
        hnsw_indexes = cur.fetchone()[0]
        cur.execute("SELECT content_key, service_name, model, provider FROM ingest_embeddingfacet ORDER BY 1, 2")
        facets = cur.fetchall()
    assert rows == [
        ("ingest_embeddingday_p20261120", day1.date(), "k1", "billing", "gpt-4o", "openai", True),
        ("ingest_embeddingday_p20261120", day1.date(), "k1", "support", "gpt-4o", "openai", True),
        ("ingest_embeddingday_p20261121", day2.date(), "k1", "support", "gpt-4o", "openai", True),
        ("ingest_embeddingday_p20261121", day2.date(), "k2", "", "", "", True),
    ]
    assert global_rows == 2 and hnsw_indexes == 1
    assert facets == [("k1", "billing", "gpt-4o", "openai"), ("k1", "support", "gpt-4o", "openai"), ("k2", "", "", "")]

    # 0009: the day copies become half precision, still in their partitions, with a halfvec graph.
    _migrate("0009_embeddingday_halfvec")
    with connection.cursor() as cur:
        cur.execute("SELECT tableoid::regclass::text, pg_typeof(embedding)::text, "
                    "1 - (embedding::vector <=> %s::vector) FROM ingest_embeddingday ORDER BY day, content_key, "
                    "service_name", [vector])
        converted = cur.fetchall()
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'ingest_embeddingday_p20261121' "
                    "AND indexdef LIKE '%%USING hnsw%%'")
        (hnsw,) = [row[0] for row in cur.fetchall()]
    assert [table for table, _, _ in converted] == [table for table, *_ in rows]
    assert all(kind == "halfvec" and cosine > 0.99999 for _, kind, cosine in converted), converted
    assert "halfvec_cosine_ops" in hnsw
