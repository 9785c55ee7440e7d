"""One bad span never fails its batch: each is rejected with a rule and a field, the rest is stored.

Every case here answered 500 for the whole batch at 93dea7e (metadata nested 255 deep,
timestamps that overflow the platform's time_t), silently changed an id (NUL), or
accepted a body it does not parse (text/plain, XML).
"""

from __future__ import annotations

import json
import uuid

import orjson
import pytest

from ingest.models import Span
from ingest.schemas import MAX_DEPTH


def nested(depth: int) -> dict:
    root = node = {}
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    return root


def nested_list(depth: int) -> list:
    root = node = []
    for _ in range(depth - 1):
        node.append([])
        node = node[0]
    return root


def good(**extra) -> dict:
    return {"span_id": str(uuid.uuid4()), "model": "gpt-4o", "provider": "openai", "prompt": "hello", **extra}


def post(api, path, payload):
    # The stdlib encoder: orjson refuses to write what these tests must send (255 levels, 10**30).
    return api.post(path, raw=json.dumps(payload).encode())


def stored_ids() -> set[str]:
    return set(Span.objects.values_list("span_id", flat=True))


@pytest.mark.parametrize("poison, rule, field", [
    ({"metadata": nested(255)}, "too_deep", "metadata"),
    ({"metadata": nested(MAX_DEPTH + 1)}, "too_deep", "metadata"),
    ({"custom": nested_list(MAX_DEPTH + 1)}, "too_deep", "custom"),
    ({"timestamp_utc": 1e30}, "invalid_value", "timestamp_utc"),
    ({"timestamp_utc": 1e308}, "invalid_value", "timestamp_utc"),
    ({"timestamp_utc": -1e308}, "invalid_value", "timestamp_utc"),
    ({"timestamp_utc": -1e17}, "invalid_value", "timestamp_utc"),
    ({"timestamp_utc": "9999-12-31T23:00:00-14:00"}, "timestamp_in_future", "timestamp_utc"),
    ({"timestamp_utc": "0001-01-01T00:00:00+14:00"}, "timestamp_too_old", "timestamp_utc"),
    ({"timestamp_utc": "not a time"}, "invalid_type", "timestamp_utc"),
    ({"span_id": "a\x00b"}, "invalid_value", "span_id"),
    ({"trace_id": "\x00"}, "invalid_value", "trace_id"),
    ({"parent_span_id": "p\x00"}, "invalid_value", "parent_span_id"),
    ({"prompt_tokens": 10**12}, "out_of_range", "prompt_tokens"),
    ({"completion_tokens": 10**30}, "invalid_value", "completion_tokens"),
    ({"latency_ms_total": 1e308}, "out_of_range", "latency_ms_total"),
    ({"finish_reason": ""}, "invalid_value", "finish_reason"),
])
def test_a_poison_span_is_rejected_alone_and_the_batch_is_stored(api, poison, rule, field):
    before, after = good(), good()
    bad = {**good(), **poison}
    response = post(api, "/v1/spans", [before, bad, after])
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["rule"], r["field"]) for r in body["rejected"]] == [(1, rule, field)], body
    assert stored_ids() == {before["span_id"], after["span_id"]}

    alone = post(api, "/v1/spans", [bad])
    assert alone.status_code == 400
    assert (alone.json()["rule"], alone.json()["field"]) == (rule, field)


def test_metadata_at_the_depth_limit_is_stored_and_read_back(api):
    span = good(metadata=nested(MAX_DEPTH))
    assert api.post("/v1/spans", span).status_code == 202
    assert api.get("/v1/spans").json()["items"][0]["metadata"] == span["metadata"]


def test_a_body_deeper_than_the_parser_allows_is_400_not_500(api):
    raw = b"[" * 5000 + b"]" * 5000
    response = api.post("/v1/spans", raw=raw)
    assert response.status_code == 400
    assert response.json()["rule"] == "invalid_json"


def test_nul_in_free_text_is_kept_as_a_replacement_character_but_ids_are_never_rewritten(api):
    response = api.post("/v1/spans", [good(span_id="ok-1", prompt="a\x00b"), good(span_id="bad\x00id")])
    assert response.status_code == 202
    assert stored_ids() == {"ok-1"}
    assert Span.objects.get(span_id="ok-1").prompt == "a\ufffdb"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_content_types_that_are_not_json_are_415(client, api_key, content_type):
    response = client.post("/v1/spans", orjson.dumps(good()), content_type=content_type,
                           headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 415
    assert response.json()["rule"] == "unsupported_media_type"
    assert stored_ids() == set()


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/vnd.llm-observe+json", "text/json"])
def test_json_content_types_are_accepted(client, api_key, content_type):
    response = client.post("/v1/spans", orjson.dumps(good()), content_type=content_type,
                           headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 202, response.content


def test_the_1_8_1_record_routes_isolate_poison_spans_too(api):
    first = good()
    response = api.post("/v1/metrics/record-batch", [first, good(timestamp_utc=1e300)])
    assert response.status_code == 200, response.content
    assert response.json()["recorded_count"] == 1
    one = post(api, "/v1/metrics/record", good(metadata=nested(300)))
    assert one.status_code == 400 and one.json()["rule"] == "too_deep"
    assert stored_ids() == {first["span_id"]}
