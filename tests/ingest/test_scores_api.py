"""POST/GET/DELETE /v1/scores through Django's test client against the embedded PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from django.db import connection
from prometheus_client import REGISTRY

from ingest.models import Project, Score, ScoreConfig
from ingest.selectors.api_keys import api_key_cache_clear
from ingest.services.api_keys import api_key_create
from ingest.services.scores import scores_delete_expired


@pytest.fixture
def configs(project):
    ScoreConfig.objects.create(project=project, name="helpfulness", data_type="numeric", min_value=1, max_value=5)
    ScoreConfig.objects.create(project=project, name="thumbs", data_type="boolean")
    ScoreConfig.objects.create(project=project, name="tone", data_type="categorical", categories=["polite", "rude"])


def test_one_score_is_stored_and_read_back(api, configs):
    response = api.post("/v1/scores", {"id": "sc-1", "name": "helpfulness", "value": 4, "comment": "good answer",
                                       "span_id": "s-1", "trace_id": "t-1"})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body == {"success": True, "accepted": 1, "duplicates": 0, "ids": ["sc-1"], "rejected": []}
    items = api.get("/v1/scores").json()["items"]
    assert len(items) == 1
    got = items[0]
    assert (got["id"], got["name"], got["value"], got["data_type"]) == ("sc-1", "helpfulness", 4.0, "numeric")
    assert (got["span_id"], got["trace_id"], got["session_id"]) == ("s-1", "t-1", None)
    assert got["source"] == "api" and got["comment"] == "good answer" and not got["comment_pii"]
    assert got["author"].startswith("key:")


def test_batch_types_and_idempotency(api, configs):
    batch = {"scores": [
        {"id": "a", "name": "thumbs", "value": True, "trace_id": "t-1"},
        {"id": "b", "name": "tone", "value": "rude", "session_id": "sess-1", "source": "annotation"},
        {"id": "c", "name": "unconfigured", "value": 0.25, "trace_id": "t-1"},
        {"id": "a", "name": "thumbs", "value": False, "trace_id": "t-1"},  # same id in the batch: kept once
    ]}
    body = api.post("/v1/scores", batch).json()
    assert body["accepted"] == 4 and body["duplicates"] == 1 and body["rejected"] == []
    again = api.post("/v1/scores", batch).json()
    assert again["accepted"] == 4 and again["duplicates"] == 4
    assert Score.objects.count() == 3
    by_id = {s["id"]: s for s in api.get("/v1/scores").json()["items"]}
    assert by_id["a"]["value"] is True and by_id["a"]["data_type"] == "boolean"
    assert by_id["b"]["value"] == "rude" and by_id["b"]["source"] == "annotation"
    assert by_id["c"]["value"] == 0.25 and by_id["c"]["data_type"] == "numeric"


def test_generated_ids_are_returned(api):
    body = api.post("/v1/scores", [{"name": "x", "value": 1, "trace_id": "t"}, {"name": "x", "value": 2,
                                                                               "trace_id": "t"}]).json()
    assert body["accepted"] == 2 and len(set(body["ids"])) == 2
    assert set(body["ids"]) == set(Score.objects.values_list("score_id", flat=True))


@pytest.mark.parametrize(("item", "rule", "field"), [
    ({"name": "helpfulness", "value": 9, "trace_id": "t"}, "out_of_range", "value"),
    ({"name": "helpfulness", "value": 0, "trace_id": "t"}, "out_of_range", "value"),
    ({"name": "helpfulness", "value": "great", "trace_id": "t"}, "wrong_type", "value"),
    ({"name": "helpfulness", "value": True, "trace_id": "t"}, "wrong_type", "value"),
    ({"name": "thumbs", "value": 0.5, "trace_id": "t"}, "wrong_type", "value"),
    ({"name": "tone", "value": "sarcastic", "trace_id": "t"}, "unknown_category", "value"),
    ({"name": "tone", "value": 1, "trace_id": "t"}, "wrong_type", "value"),
    ({"name": "free", "value": "text", "trace_id": "t"}, "unconfigured_categorical", "value"),
    ({"name": "free", "value": [1], "trace_id": "t"}, "invalid_type", "value"),
    ({"name": "helpfulness", "value": 3}, "missing_target", "trace_id"),
    ({"value": 3, "trace_id": "t"}, "missing_field", "name"),
    ({"name": "x", "trace_id": "t"}, "missing_field", "value"),
    ({"name": "x", "value": 1, "trace_id": "t", "colour": "red"}, "unknown_field", "colour"),
    ({"name": "x", "value": 1, "trace_id": "t", "source": "robot"}, "invalid_value", "source"),
    ({"name": "x", "value": 1, "trace_id": "t", "comment": "c" * 2001}, "too_long", "comment"),
    ({"name": "x" * 201, "value": 1, "trace_id": "t"}, "too_long", "name"),
    ({"name": "x", "value": 1, "trace_id": "t" * 129}, "too_long", "trace_id"),
    ({"name": "x", "value": 1, "trace_id": "t", "timestamp": "yesterday"}, "invalid_value", "timestamp"),
    ({"name": "x", "value": 1, "trace_id": "t", "timestamp": "2001-01-01T00:00:00Z"}, "out_of_range", "timestamp"),
    ({"name": "x", "value": 1, "trace_id": "t\x00"}, "invalid_value", "trace_id"),
    ("not an object", "invalid_type", None),
])
def test_invalid_scores_get_a_rule(api, configs, item, rule, field):
    response = api.post("/v1/scores", [item])
    assert response.status_code == 400, response.content
    body = response.json()
    assert (body["rule"], body["field"]) == (rule, field)
    assert body["rejected"][0]["index"] == 0 and body["rejected"][0]["reason"]
    assert Score.objects.count() == 0


def test_a_bad_score_does_not_cost_the_good_ones(api, configs):
    body = api.post("/v1/scores", [{"id": "ok", "name": "helpfulness", "value": 2, "trace_id": "t"},
                                   {"id": "bad", "name": "helpfulness", "value": 6, "trace_id": "t"}]).json()
    assert body["accepted"] == 1 and body["ids"] == ["ok"]
    assert body["rejected"] == [{"index": 1, "id": "bad", "rule": "out_of_range", "field": "value",
                                 "reason": "above this score's maximum (5)"}]


@pytest.mark.parametrize(("raw", "status", "rule"), [
    (b"", 400, "empty_body"),
    (b"{not json", 400, "invalid_json"),
    (b"[]", 400, "empty_batch"),
    (b"42", 400, "invalid_body"),
    (b'{"scores": 3}', 400, "invalid_body"),
    (orjson.dumps([{"name": "x", "value": 1, "trace_id": "t"}] * 1001), 413, "too_many_scores"),
])
def test_bad_bodies(api, raw, status, rule):
    response = api.post("/v1/scores", raw=raw)
    assert response.status_code == status, response.content
    assert response.json()["rule"] == rule


def test_needs_the_ingest_key(client, project):
    response = client.post("/v1/scores", b'{"name": "x", "value": 1, "trace_id": "t"}', content_type="application/json")
    assert response.status_code == 401 and response.json()["rule"] == "unauthenticated"
    assert client.get("/v1/scores").status_code == 401
    assert client.delete("/v1/scores/x").status_code == 401


def test_pii_in_a_comment_is_redacted(api):
    api.post("/v1/scores", {"name": "x", "value": 1, "trace_id": "t",
                            "comment": "call me at jane.doe@example.com about it"})
    stored = Score.objects.get()
    assert stored.comment_pii and "jane.doe@example.com" not in stored.comment
    assert "call me at" in stored.comment


def test_pii_comment_dropped_in_drop_mode(api, project):
    Project.objects.filter(id=project.id).update(redaction_mode="drop")
    api.post("/v1/scores", {"name": "x", "value": 1, "trace_id": "t", "comment": "my mail is jane.doe@example.com"})
    stored = Score.objects.get()
    assert stored.comment_pii and stored.comment is None


def test_score_before_its_span_is_found_when_the_span_lands(api):
    span_id, trace_id = str(uuid.uuid4()), str(uuid.uuid4())
    assert api.post("/v1/scores", {"name": "thumbs", "value": False, "span_id": span_id}).status_code == 202
    assert api.post("/v1/scores", {"name": "rating", "value": 3, "trace_id": trace_id}).status_code == 202
    assert api.get(f"/v1/traces/{trace_id}").status_code == 404  # the span is not there yet
    response = api.post("/v1/spans", {"span_id": span_id, "trace_id": trace_id, "model": "gpt-4o",
                                      "provider": "openai", "status": "success"})
    assert response.status_code == 202, response.content
    trace = api.get(f"/v1/traces/{trace_id}").json()
    stored_span = trace["roots"][0]["span_id"]
    assert [s["value"] for s in api.get("/v1/scores", {"span_id": stored_span}).json()["items"]] == [False]
    from ingest.selectors.scores import scores_for_trace

    found = scores_for_trace(project_id=Score.objects.first().project_id, trace_id=trace_id, span_ids=[stored_span])
    assert sorted(s["name"] for s in found) == ["rating", "thumbs"]


def test_filters_and_cursor(api):
    base = datetime.now(timezone.utc) - timedelta(hours=1)
    items = [{"id": f"s{i:02d}", "name": "a" if i % 2 else "b", "value": i, "trace_id": f"t{i % 3}",
              "source": "evaluator" if i < 5 else "sdk", "timestamp": (base + timedelta(minutes=i)).isoformat()}
             for i in range(12)]
    items.append({"id": "sess", "name": "a", "value": 1, "session_id": "sess-9", "span_id": "sp-9",
                  "timestamp": base.isoformat()})
    assert api.post("/v1/scores", items).json()["accepted"] == 13

    def ids(**params):
        return [s["id"] for s in api.get("/v1/scores", params).json()["items"]]

    assert ids(name="a") == ["s11", "s09", "s07", "s05", "s03", "s01", "sess"]
    assert ids(trace_id="t0") == ["s09", "s06", "s03", "s00"]
    assert ids(source="evaluator") == ["s04", "s03", "s02", "s01", "s00"]
    assert ids(session_id="sess-9") == ids(span_id="sp-9") == ["sess"]
    assert ids(**{"from": (base + timedelta(minutes=10)).isoformat()}) == ["s11", "s10"]
    assert ids(**{"to": (base + timedelta(minutes=1)).isoformat()}) == ["sess", "s00"]  # same time: by id, descending
    pages, cursor = [], None
    while True:
        page = api.get("/v1/scores", {"limit": 5, **({"cursor": cursor} if cursor else {})}).json()
        pages.append([s["id"] for s in page["items"]])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [len(p) for p in pages] == [5, 5, 3]
    assert sum(pages, []) == ids(limit=100)
    bad = api.get("/v1/scores", {"cursor": "nonsense"})
    assert bad.status_code == 400 and bad.json()["rule"] == "invalid_cursor"


def test_delete_and_project_scoping(api, client, project):
    api.post("/v1/scores", {"id": "mine", "name": "x", "value": 1, "trace_id": "t"})
    other = Project.objects.create(name="other")
    _, other_key = api_key_create(project=other, name="k")
    headers = {"Authorization": f"Bearer {other_key}"}
    assert client.get("/v1/scores", headers=headers).json()["items"] == []
    assert client.delete("/v1/scores/mine", headers=headers).status_code == 404
    # The same id in another project is another score.
    response = client.post("/v1/scores", b'{"id": "mine", "name": "x", "value": 2, "trace_id": "t"}',
                           content_type="application/json", headers=headers)
    assert response.json()["duplicates"] == 0
    mine = {"Authorization": f"Bearer {api.key}"}
    assert client.delete("/v1/scores/mine", headers=mine).status_code == 204
    assert client.delete("/v1/scores/mine", headers=mine).status_code == 404
    assert Score.objects.filter(project=other).count() == 1 and Score.objects.filter(project=project).count() == 0


def test_metric_counts_stored_scores_once(api, client, configs):
    def count(name, source):
        return REGISTRY.get_sample_value("llm_scores_count", {"name": name, "source": source}) or 0

    before = count("helpfulness", "api"), count("thumbs", "sdk")
    batch = [{"id": "m1", "name": "helpfulness", "value": 3, "trace_id": "t"},
             {"id": "m2", "name": "thumbs", "value": True, "trace_id": "t", "source": "sdk"},
             {"id": "m3", "name": "tone", "value": "polite", "trace_id": "t"}]
    api.post("/v1/scores", batch)
    api.post("/v1/scores", batch)  # duplicates are not observed again
    assert (count("helpfulness", "api") - before[0], count("thumbs", "sdk") - before[1]) == (1, 1)
    scraped = client.get("/metrics").content.decode()
    assert 'llm_scores_bucket{le="3.0",name="helpfulness",source="api"}' in scraped


def test_metric_names_are_capped(api, monkeypatch):
    from ingest.metrics import BoundedLabel
    from ingest.services import scores as service

    monkeypatch.setattr(service, "_name_label", BoundedLabel(2))
    api.post("/v1/scores", [{"name": f"cap-{i}", "value": 1, "trace_id": "t"} for i in range(4)])
    assert REGISTRY.get_sample_value("llm_scores_count", {"name": "cap-1", "source": "api"}) == 1
    assert REGISTRY.get_sample_value("llm_scores_count", {"name": "cap-2", "source": "api"}) is None
    assert REGISTRY.get_sample_value("llm_scores_count", {"name": "other", "source": "api"}) >= 2


def test_retention_deletes_old_scores(api, project, settings):
    api.post("/v1/scores", [{"id": "old", "name": "x", "value": 1, "trace_id": "t"},
                            {"id": "new", "name": "x", "value": 1, "trace_id": "t"}])
    with connection.cursor() as cur:
        cur.execute("UPDATE ingest_score SET created_at = now() - interval '40 days' WHERE score_id = 'old'")
    settings.RETENTION_DAYS = 30
    assert scores_delete_expired() == 1
    assert list(Score.objects.values_list("score_id", flat=True)) == ["new"]
    Project.objects.filter(id=project.id).update(retention_days=1)
    with connection.cursor() as cur:
        cur.execute("UPDATE ingest_score SET created_at = now() - interval '3 days'")
    assert scores_delete_expired() == 1 and Score.objects.count() == 0


def test_score_config_validation(project):
    from django.core.exceptions import ValidationError

    for bad in (dict(data_type="numeric", min_value=5, max_value=1), dict(data_type="categorical", categories=[]),
                dict(data_type="boolean", categories=["a"]), dict(data_type="categorical", categories=["a", "a"]),
                dict(data_type="boolean", min_value=0)):
        with pytest.raises(ValidationError):
            ScoreConfig(project=project, name="n", **bad).full_clean()
    ScoreConfig(project=project, name="n", data_type="categorical", categories=["a", "b"]).full_clean()


def test_openapi_documents_the_routes(api):
    schema = api.get("/api/openapi.json").json()
    post = schema["paths"]["/v1/scores"]["post"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert examples["one"]["value"]["name"] == "user_feedback"
    assert "get" in schema["paths"]["/v1/scores"]
    assert "delete" in schema["paths"]["/v1/scores/{score_id}"]


def test_a_comment_the_client_redacted_keeps_its_flag(api, project):
    api.post("/v1/scores", {"id": "r", "name": "x", "value": 1, "trace_id": "t", "comment": "mail [EMAIL]",
                            "comment_pii": True})
    assert Score.objects.get().comment_pii and Score.objects.get().comment == "mail [EMAIL]"
    Project.objects.filter(id=project.id).update(redaction_mode="drop")
    api_key_cache_clear()  # the key's project is cached for CONFIG_REFRESH_SECONDS
    api.post("/v1/scores", {"id": "d", "name": "x", "value": 1, "trace_id": "t", "comment": "mail [EMAIL]",
                            "comment_pii": True})
    assert Score.objects.get(score_id="d").comment is None
    bad = api.post("/v1/scores", {"name": "x", "value": 1, "trace_id": "t", "comment_pii": "yes"})
    assert bad.json()["rule"] == "invalid_type"


@pytest.mark.parametrize("raw", [
    b'{"name": "x", "value": 1e309, "trace_id": "t"}',
    b'{"name": ["x"], "value": 1, "trace_id": "t"}',
    b'{"id": 7, "name": "x", "value": 1, "trace_id": "t"}',
    b'{"name": "x", "value": {"a": [[[[1]]]]}, "trace_id": "t"}',
    b'{"name": "x", "value": 1, "trace_id": "t", "timestamp": "9999-12-31T23:59:59-23:00"}',
    b'{"name": "x", "value": 1, "span_id": {"a": 1}}',
    b'[1, "a", null, []]',
    b'{"scores": [{"scores": []}]}',
    "{\"name\": \"\\u0000\", \"value\": 1, \"trace_id\": \"t\"}".encode(),
])
def test_hostile_bodies_get_a_4xx_not_a_500(api, raw):
    response = api.post("/v1/scores", raw=raw)
    assert 400 <= response.status_code < 500, response.content
    assert response.json()["rule"]
