"""Embeddings (real MiniLM, offline) and POST /v1/search/similar on real pgvector."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from django.db import connection

from ingest.models import Embedding, EmbeddingDay, Span
from ingest.services.embeddings import embed_texts, embeddings_compute, load_model

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = {
    "refund-1": ("support", "gpt-4o", "I want a refund for my late order"),
    "refund-2": ("support", "claude-sonnet-4", "Please give me my money back, the parcel arrived two weeks late"),
    "weather": ("search", "gpt-4o", "What will the weather be like in Paris tomorrow?"),
    "python": ("coding", "gpt-4o", "How do I reverse a list in Python?"),
    "sql": ("coding", "claude-sonnet-4", "Write a SQL query that counts orders per customer"),
    "poem": ("creative", "gpt-4o", "Write a short poem about the sea at night"),
}



def sample(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0

def test_embeddings_are_384_d_unit_vectors_and_meaningful():
    a, b, c = embed_texts(["refund my order", "I want my money back", "the weather in Paris"])
    assert len(a) == 384
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-3)
    cos = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert cos(a, b) > cos(a, c) + 0.1


@pytest.fixture
def indexed(api, project):
    project.sampling_rate = 100  # every span sampled
    project.save()
    now = datetime.now(timezone.utc)
    spans = [{"span_id": sid, "service_name": service, "model": model, "prompt": text, "metadata": {"n": 1},
              "timestamp_utc": (now - timedelta(hours=i + 1)).isoformat()}
             for i, (sid, (service, model, text)) in enumerate(PROMPTS.items())]
    spans.append({"span_id": "refund-1-again", "service_name": "support", "model": "gpt-4o",
                  "prompt": PROMPTS["refund-1"][2], "timestamp_utc": now.isoformat()})
    spans.append({"span_id": "pii", "prompt": "my email is a@b.io", "timestamp_utc": now.isoformat()})
    assert api.post("/v1/spans", spans).status_code == 202
    keys = list(Span.objects.filter(prompt_hash__isnull=False).values_list("prompt_hash", flat=True))
    made = embeddings_compute(project_id=project.id, content_keys=keys, start=now - timedelta(days=1), end=now)
    assert made == len(PROMPTS)  # the repeated prompt is embedded once, the PII one never
    assert Embedding.objects.count() == len(PROMPTS)
    # A copy per day/service/model/provider a prompt was seen in (the hours above may cross midnight).
    occurrences = set(Span.objects.filter(prompt_hash__isnull=False).values_list(
        "timestamp_utc__date", "prompt_hash", "service_name", "model", "provider"))
    assert EmbeddingDay.objects.count() == len(occurrences)
    return api


def ids(response):
    assert response.status_code == 200, response.content
    return [item["span_id"] for item in response.json()["items"]]


def test_search_by_text_orders_by_meaning(indexed):
    response = indexed.post("/v1/search/similar", {"text": "refund for a delayed delivery", "k": 3})
    found = ids(response)
    assert set(found[:2]) == {"refund-1-again", "refund-2"}  # latest span of the repeated prompt
    scores = [item["score"] for item in response.json()["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.4
    by_id = {item["span_id"]: item for item in response.json()["items"]}
    assert by_id["refund-2"]["metadata"] == {"n": 1}


def test_search_filters_and_k(indexed):
    assert ids(indexed.post("/v1/search/similar", {"text": "money back", "k": 10, "service": "coding"})) \
        and set(ids(indexed.post("/v1/search/similar", {"text": "money back", "k": 10, "service": "coding"}))) == {"python", "sql"}
    assert ids(indexed.post("/v1/search/similar", {"text": "refund", "k": 10, "model": "claude-sonnet-4"}))[0] == "refund-2"
    assert len(ids(indexed.post("/v1/search/similar", {"text": "anything", "k": 2}))) == 2
    now = datetime.now(timezone.utc)
    recent = ids(indexed.post("/v1/search/similar", {"text": "refund", "k": 10,
                                                     "from": (now - timedelta(minutes=30)).isoformat()}))
    assert recent == ["refund-1-again"]


def test_filtered_hnsw_search_still_returns_k(indexed, settings):
    settings.SEARCH_EXACT_BELOW = 0  # force the HNSW path with a selective filter
    found = ids(indexed.post("/v1/search/similar", {"text": "sea poem", "k": 2, "service": "coding"}))
    assert sorted(found) == ["python", "sql"]


def test_selective_filter_is_scanned_exactly_and_a_short_hnsw_walk_falls_back_to_it(indexed, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def search(k):
        with CaptureQueriesContext(connection) as queries:
            found = ids(indexed.post("/v1/search/similar", {"text": "sea poem", "k": k, "service": "coding"}))
        sql = [q["sql"] for q in queries.captured_queries]
        return sorted(found), any("hnsw.ef_search" in q for q in sql), any("WITH keys AS" in q for q in sql)

    # Two candidate prompts: far below SEARCH_EXACT_BELOW by the planner's estimate, no HNSW walk.
    assert search(10) == (["python", "sql"], False, True)
    settings.SEARCH_EXACT_BELOW = 0
    assert search(2) == (["python", "sql"], True, False)
    # k=10 but only two prompts match: the walk ends short of k, then the exact scan answers.
    assert search(10) == (["python", "sql"], True, True)


def test_a_narrow_window_walks_the_day_graphs_or_scans_them_exactly(indexed, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    start = (datetime.now(timezone.utc) - timedelta(hours=30)).isoformat()

    def search(k, **filters):
        with CaptureQueriesContext(connection) as queries:
            found = ids(indexed.post("/v1/search/similar", {"text": "sea poem", "k": k, "from": start, **filters}))
        sql = " ".join(q["sql"] for q in queries.captured_queries)
        path = ("day-exact" if "enable_indexscan = off" in sql else "day-hnsw" if "ingest_embeddingday" in sql
                and "hnsw.ef_search" in sql else "global")
        return sorted(found), path

    assert search(10, service="coding") == (["python", "sql"], "day-exact")
    settings.SEARCH_EXACT_BELOW = 0
    assert search(2, service="coding") == (["python", "sql"], "day-hnsw")
    # k=10 but only two prompts match: the day graphs' iterative scans run dry and answer the two.
    assert search(10, service="coding") == (["python", "sql"], "day-hnsw")
    assert search(10)[0] == sorted(["python", "sql", "poem", "weather", "refund-2", "refund-1-again"])
    settings.SEARCH_DAY_GRAPHS_MAX_DAYS = 1  # the 30 hours touch two UTC days: the global graph answers
    assert search(10, service="coding") == (["python", "sql"], "global")


def test_day_graph_results_are_scored_from_the_fp32_vectors(indexed, settings):
    """The day copies are half precision; the scores and order a search returns are the global vectors'."""
    start = (datetime.now(timezone.utc) - timedelta(hours=30)).isoformat()

    def scores(**extra):
        response = indexed.post("/v1/search/similar", {"text": "a poem about the sea", "k": 6, "from": start})
        assert response.status_code == 200, response.content
        return [(item["span_id"], item["score"]) for item in response.json()["items"]]

    through_days = scores()
    settings.SEARCH_DAY_GRAPHS_MAX_DAYS = 1  # the global graph (fp32) answers the same window
    through_global = scores()
    assert through_days == through_global
    assert [s for _, s in through_days] == sorted((s for _, s in through_days), reverse=True)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_typeof(embedding)::text FROM ingest_embeddingday LIMIT 1")
        assert cur.fetchone()[0] == "halfvec"


def test_a_prompt_seen_on_several_days_and_services_is_embedded_once_and_found_by_each(api, project):
    from ingest.services.partitions import partition_name

    project.sampling_rate = 100
    project.save()
    now = datetime.now(timezone.utc)
    days_ago = lambda d: (now - timedelta(days=d)).isoformat()  # noqa: E731
    text = "How do I cancel my subscription and get a refund?"
    spans = [{"span_id": "old-support", "service_name": "support", "prompt": text, "timestamp_utc": days_ago(3)},
             {"span_id": "old-billing", "service_name": "billing", "prompt": text, "timestamp_utc": days_ago(3)},
             {"span_id": "new-support", "service_name": "support", "prompt": text, "timestamp_utc": days_ago(0)},
             {"span_id": "other", "service_name": "support", "prompt": "Tell me a joke about cats",
              "timestamp_utc": days_ago(3)}]
    assert api.post("/v1/spans", spans).status_code == 202
    keys = list(Span.objects.values_list("prompt_hash", flat=True))
    backend = load_model().backend
    counted = lambda: (sample("llm_embeddings_total", backend=backend),  # noqa: E731
                       sample("llm_embeddings_reused_total"), sample("llm_embedding_seconds_count", backend=backend))
    before = counted()
    assert embeddings_compute(project_id=project.id, content_keys=keys, start=now - timedelta(days=4), end=now) == 2
    assert Embedding.objects.count() == 2
    assert [b - a for a, b in zip(before, counted())] == [2, 0, 1]  # two prompts, one batch
    key = Span.objects.get(span_id="old-support").prompt_hash
    rows = set(EmbeddingDay.objects.filter(content_key=key).values_list("day", "service_name"))
    old_day, new_day = (now - timedelta(days=3)).date(), now.date()
    assert rows == {(old_day, "support"), (old_day, "billing"), (new_day, "support")}
    with connection.cursor() as cur:  # each row lives in its day's partition
        cur.execute("SELECT tableoid::regclass::text, day FROM ingest_embeddingday")
        assert all(table == partition_name(day, "ingest_embeddingday") for table, day in cur.fetchall())
    # Computing again (a retried task) stores and embeds nothing new.
    assert embeddings_compute(project_id=project.id, content_keys=keys, start=now - timedelta(days=4), end=now) == 0
    assert (Embedding.objects.count(), EmbeddingDay.objects.count()) == (2, 4)
    assert [b - a for a, b in zip(before, counted())] == [2, 2, 1]  # both deduplicated, nothing embedded

    def search(**filters):
        return ids(api.post("/v1/search/similar", {"text": "cancel my plan and refund me", "k": 1, **filters}))

    assert search() == ["new-support"]  # the latest span of the prompt
    assert search(service="billing") == ["old-billing"]
    window = {"from": days_ago(4), "to": days_ago(2)}
    assert search(**window, service="support") == ["old-support"]
    # The window's edges are exact, not whole days: an hour after the old spans finds none of them.
    after = lambda minutes: (now - timedelta(days=3) + timedelta(minutes=minutes)).isoformat()  # noqa: E731
    assert ids(api.post("/v1/search/similar", {"text": "cancel my plan", "k": 5, "from": after(1), "to": after(60)})) == []
    assert sorted(ids(api.post("/v1/search/similar", {"text": "cancel my plan", "k": 5, "from": after(-1),
                                                       "to": after(1)}))) == ["old-billing", "other"]


def test_search_by_span_excludes_its_own_prompt(indexed):
    found = ids(indexed.post("/v1/search/similar", {"span_id": "refund-2", "k": 2}))
    assert found[0] == "refund-1-again" and "refund-2" not in found


def test_search_errors_are_4xx(indexed):
    assert indexed.post("/v1/search/similar", {"span_id": "pii"}).json()["rule"] == "not_searchable"
    assert indexed.post("/v1/search/similar", {"span_id": "nope"}).status_code == 404
    assert indexed.post("/v1/search/similar", {"text": "a", "span_id": "refund-2"}).status_code == 400
    assert indexed.post("/v1/search/similar", {}).status_code == 400
    assert indexed.post("/v1/search/similar", {"text": "a", "k": 1000}).status_code == 400
    assert indexed.post("/v1/search/similar", {"text": "a", "service": "x\x00"}).status_code == 400
    assert indexed.get("/v1/spans", {"service": "a\x00b"}).status_code == 400


def test_other_projects_see_nothing(indexed, db):
    from ingest.models import Project
    from ingest.services.api_keys import api_key_create

    _, other_key = api_key_create(project=Project.objects.create(name="other"))
    indexed.key = other_key
    assert ids(indexed.post("/v1/search/similar", {"text": "refund"})) == []


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_embeds_committed_spans_once(api, project, settings):
    project.sampling_rate = 100
    project.save()
    db = connection.settings_dict
    env = {**os.environ, "DATABASE_URL": f"postgresql://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "REDIS_URL": settings.REDIS_URL, "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "appliance", "worker", "--concurrency", "1",
                               "--pool", "solo", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        spans = [{"span_id": f"w{i}", "prompt": "How do I reset my password?" if i % 2 else f"unique prompt {i}"}
                 for i in range(10)]
        assert api.post("/v1/spans", spans).status_code == 202
        deadline = time.monotonic() + 120
        # Only this project's rows: the day copies are not Django-managed, so a flush keeps other tests' rows.
        vectors = Embedding.objects.filter(project_id=project.id)
        copies = EmbeddingDay.objects.filter(project_id=project.id)
        while time.monotonic() < deadline and (vectors.count() < 6 or copies.count() < 6):
            assert worker.poll() is None, worker.stdout.read()
            time.sleep(0.5)
        assert vectors.count() == 6  # 5 unique prompts + the repeated one once
        assert copies.count() == 6  # all on one day, service, model
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_facets_follow_the_prompts_and_go_with_their_vector(indexed, project):
    from ingest.models import EmbeddingFacet

    facets = set(EmbeddingFacet.objects.values_list("service_name", "model"))
    assert facets == {(service, model) for service, model, _ in PROMPTS.values()}
    key = Span.objects.get(span_id="python").prompt_hash
    Embedding.objects.filter(project_id=project.id, content_key=key).delete()
    assert not EmbeddingFacet.objects.filter(content_key=key).exists()  # the delete trigger
