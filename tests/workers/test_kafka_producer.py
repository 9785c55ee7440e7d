"""Kafka mode of POST /v1/spans against a real broker: 202 only after acks=all, 503 while the broker is away."""

from __future__ import annotations

import time

from ingest.contracts import span_message_from_bytes
from ingest.models import Span
from ingest.queues import Topic
from tests.kafka_broker import SESSION_TIMEOUT_MS, TansuBroker, kafka_broker, kafka_mode  # noqa: F401 - fixtures


def _spans(prefix: str, n: int, **extra) -> list[dict]:
    return [{"span_id": f"{prefix}-{i}", "trace_id": f"{prefix}-trace-{i % 3}", "model": "gpt-4o", "provider": "openai",
             "prompt_tokens": 100, "completion_tokens": 10, **extra} for i in range(n)]


def test_accepted_spans_are_on_the_topic_redacted_keyed_by_trace(api, project, kafka_mode):
    from prometheus_client import REGISTRY

    def produced():
        return REGISTRY.get_sample_value("llm_kafka_spans_produced_total", {"topic": str(Topic.SPANS_RAW)}) or 0

    before = produced()
    spans = _spans("k", 5, prompt="write to jane.doe@example.com", response="done")
    response = api.post("/v1/spans", spans + [{"span_id": "bad", "status": "weird"}])
    assert response.status_code == 202, response.content
    assert produced() - before == 5
    body = response.json()
    assert body["accepted"] == 5 and [r["span_id"] for r in body["rejected"]] == ["bad"]
    # Kafka mode stores nothing itself: the consumer does.
    assert Span.objects.count() == 0

    messages = kafka_mode.read_all(Topic.SPANS_RAW, expect=5)
    assert len(messages) == 5
    decoded = {}
    for m in messages:
        span = span_message_from_bytes(m.value())
        assert m.key() == span.trace_id.encode()
        decoded[span.span_id] = span
    assert set(decoded) == {f"k-{i}" for i in range(5)}
    span = decoded["k-0"]
    assert span.project_id == project.id and span.pii_detected and "jane.doe@example.com" not in span.prompt
    # The same trace lands on one partition: its spans stay in order for the consumer.
    by_trace = {}
    for m in messages:
        by_trace.setdefault(m.key(), set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_trace.values())


def test_a_batch_without_valid_spans_produces_nothing(api, kafka_mode):
    response = api.post("/v1/spans", [{"span_id": "x", "prompt_tokens": -1}])
    assert response.status_code == 400
    assert kafka_mode.read_all(Topic.SPANS_RAW, expect=1, timeout=4) == []


def test_broker_down_answers_503_then_ingestion_resumes(api, kafka_mode):
    assert api.post("/v1/spans", _spans("before", 2)).status_code == 202

    kafka_mode.stop()
    started = time.monotonic()
    response = api.post("/v1/spans", _spans("during", 3))
    assert response.status_code == 503, response.content
    assert response["Retry-After"].isdigit()
    assert response.json()["rule"] == "broker_unavailable"
    assert time.monotonic() - started < 10  # bounded by KAFKA_DELIVERY_TIMEOUT_MS, not hanging

    # Back on the same port (empty: a memory broker lost its topics); clients retry on 503.
    kafka_mode.restart()
    deadline = time.monotonic() + 30
    while True:
        response = api.post("/v1/spans", _spans("during", 3))
        if response.status_code == 202 or time.monotonic() > deadline:
            break
        assert response.status_code == 503
        time.sleep(0.5)
    assert response.status_code == 202, response.content
    messages = kafka_mode.read_all(Topic.SPANS_RAW, expect=3)
    ids = {span_message_from_bytes(m.value()).span_id for m in messages}
    assert {"during-0", "during-1", "during-2"} <= ids


def test_after_a_broker_restart_that_outlasted_a_request_the_next_request_is_accepted(api, settings, tmp_path):
    """A broker that keeps its data (S3 storage) fences the producer whose messages timed out while it was
    away; the request that meets the fence is retried at once with a new producer, not answered 503."""
    from ingest.producer import producer_close

    broker = TansuBroker(tmp_path / "tansu.log", storage=tmp_path / "storage")
    broker.start()
    settings.WITH_KAFKA, settings.KAFKA_BOOTSTRAP_SERVERS = True, broker.bootstrap
    settings.KAFKA_DELIVERY_TIMEOUT_MS, settings.KAFKA_SESSION_TIMEOUT_MS = 2000, SESSION_TIMEOUT_MS
    try:
        assert api.post("/v1/spans", _spans("before", 2)).status_code == 202
        broker.stop()
        assert api.post("/v1/spans", _spans("during", 2)).status_code == 503  # timed out: the broker is away
        broker.start()
        response = api.post("/v1/spans", _spans("during", 2))
        assert response.status_code == 202, response.content
        ids = {span_message_from_bytes(m.value()).span_id for m in broker.read_all(Topic.SPANS_RAW, expect=4)}
        assert ids == {"before-0", "before-1", "during-0", "during-1"}
    finally:
        producer_close(timeout=2)
        broker.close()


def test_missing_topics_are_created_with_the_configured_partitions(api, kafka_mode, settings):
    from confluent_kafka.admin import AdminClient

    settings.KAFKA_SPAN_PARTITIONS = 4
    assert api.post("/v1/spans", _spans("t", 1)).status_code == 202
    topics = AdminClient({"bootstrap.servers": kafka_mode.bootstrap}).list_topics(timeout=10).topics
    assert len(topics[str(Topic.SPANS_RAW)].partitions) == 4
    assert str(Topic.SPANS_DLQ) in topics


def test_a_span_over_kafkas_default_message_size_goes_through(api, kafka_mode):
    # 2 MB: over Kafka's default 1 MB limit, within the API's body limit; topics and producer are sized for it.
    big = "lorem ipsum dolor sit amet " * 80_000
    response = api.post("/v1/spans", [{"span_id": "big", "prompt": big}])
    assert response.status_code == 202, response.content[:500]
    [message] = kafka_mode.read_all(Topic.SPANS_RAW, expect=1)
    assert span_message_from_bytes(message.value()).prompt == big.strip()


def test_a_span_too_large_for_a_message_is_413_not_retried(api, kafka_mode, monkeypatch):
    import ingest.producer

    monkeypatch.setattr(ingest.producer, "message_max_bytes", lambda: 3000)
    response = api.post("/v1/spans", [{"span_id": "small"}, {"span_id": "big", "prompt": "x" * 4000}])
    assert response.status_code == 413 and response.json()["rule"] == "span_too_large"
    assert kafka_mode.read_all(Topic.SPANS_RAW, expect=1, timeout=4) == []
