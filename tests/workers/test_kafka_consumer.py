"""The span consumer against a real broker and the real database, as a real process.

`transaction=True`: the consumer is another process and must see the committed rows
of the test (pytest-django's default test transaction is invisible to it).
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from django.db import OperationalError, connection
from prometheus_client import REGISTRY

from ingest.contracts import SpanMessage, span_message_from_bytes
from ingest.models import Project
from ingest.queues import Topic
from ingest.services.spans import spans_prepare
from tests.kafka_broker import SESSION_TIMEOUT_MS, ConsumerProcess, kafka_broker, kafka_mode, wait_for  # noqa: F401
from workers.consumers.base import HEADER_REASON, HEADER_REDACTED

pytestmark = pytest.mark.django_db(transaction=True)
GROUP = "llm-observe-spans"


def _rows(project, prefix: str, n: int) -> list[dict]:
    """n storable rows prepared like the web process does (one prepared, then new ids: fast)."""
    template = spans_prepare(project=project, items=[{
        "span_id": "template", "model": "gpt-4o", "provider": "openai", "prompt_tokens": 120,
        "completion_tokens": 12, "prompt": "summarise the invoice", "response": "done", "metadata": {"k": "v"},
    }]).rows[0]
    return [{**template, "span_id": f"{prefix}-{i}", "trace_id": f"{prefix}-trace-{i % 50}"} for i in range(n)]


def _encoded(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(r["trace_id"].encode(), SpanMessage.from_row(r).to_bytes()) for r in rows]


def _counts(project) -> tuple[int, int]:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT span_id) FROM ingest_span WHERE project_id = %s", [project.id])
        return cur.fetchone()


def _committed(broker, partitions: int = 3) -> int:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    try:
        offsets = consumer.committed([TopicPartition(str(Topic.SPANS_RAW), p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in offsets)


@pytest.fixture
def consumer_factory(kafka_broker, tmp_path):
    started: list[ConsumerProcess] = []

    def make(name: str = "consumer", **env) -> ConsumerProcess:
        process = ConsumerProcess(kafka_broker, tmp_path / f"{name}.log", **env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.kill()


def test_api_to_broker_to_consumer_rows_visible_via_get(api, project, kafka_mode, consumer_factory):
    consumer = consumer_factory().start()
    ids = set()
    for batch in range(3):
        spans = [{"span_id": f"e2e-{batch}-{i}", "trace_id": f"trace-{batch}", "model": "gpt-4o",
                  "provider": "openai", "prompt": "contact me: +44 20 7946 0958", "prompt_tokens": 10}
                 for i in range(40)]
        ids |= {s["span_id"] for s in spans}
        response = api.post("/v1/spans", spans)
        assert response.status_code == 202, response.content

    def visible():
        found, cursor = set(), None
        while True:
            page = api.get("/v1/spans", {"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
            found |= {item["span_id"] for item in page["items"]}
            cursor = page["next_cursor"]
            if not cursor:
                return found == ids

    wait_for(visible, 60, "the spans through Kafka in GET /v1/spans", consumer)
    item = api.get("/v1/spans", {"limit": 1}).json()["items"][0]
    assert item["pii_detected"] and "7946" not in (item.get("prompt") or "")
    assert _counts(project) == (120, 120)

    assert consumer.terminate() == 0  # SIGTERM: clean exit
    assert "consumer spans: stopped" in consumer.output()
    assert _committed(kafka_mode) == 120  # offsets of everything stored were committed before leaving


@pytest.mark.e2e
def test_broker_restart_api_answers_503_then_ingestion_resumes_end_to_end(api, project, kafka_mode, consumer_factory):
    consumer = consumer_factory().start()
    assert api.post("/v1/spans", [{"span_id": "before"}]).status_code == 202
    wait_for(lambda: _counts(project)[0] == 1, 30, "the first span stored", consumer)

    kafka_mode.stop()
    response = api.post("/v1/spans", [{"span_id": "during"}])
    assert response.status_code == 503 and response.json()["rule"] == "broker_unavailable", response.content
    assert int(response["Retry-After"]) > 0

    # Back on the same port, empty (memory storage): topics recreated, clients retry what got a 503.
    kafka_mode.restart()
    deadline = time.monotonic() + 40
    while (status := api.post("/v1/spans", [{"span_id": "during"}, {"span_id": "after"}]).status_code) != 202:
        assert status == 503 and time.monotonic() < deadline, status
        time.sleep(0.3)
    wait_for(lambda: _counts(project) == (3, 3), 60, "the spans after the restart stored by the same consumer", consumer)
    assert consumer.terminate() == 0


def _dead_letters(kafka_broker, n: int) -> list | None:
    found = kafka_broker.read_all(str(Topic.SPANS_DLQ), expect=n, timeout=5)
    return found if len(found) >= n else None


def test_poison_messages_go_to_the_dlq_with_a_reason_and_the_consumer_goes_on(kafka_broker, consumer_factory):
    project = Project.objects.create(name="poison")
    kafka_broker.create_topics()
    good = _encoded(_rows(project, "good", 20))
    stranger = _rows(project, "stranger", 1)[0] | {"project_id": 987654}
    wrong_version = (SpanMessage.from_row(_rows(project, "v2", 1)[0]).to_bytes()
                     .replace(b'"version":2', b'"version":9'))
    # Rejected messages nobody scanned (an old client's, a hand-made one): their PII must not sit raw
    # in the dead-letter topic, which is disk.
    secrets = ("jane.doe@example.com", "4111 1111 1111 1111")
    raw_pii = _rows(project, "pii", 1)[0] | {"error_message": f"no account for {secrets[0]}",
                                             "metadata": {"customer": {"cards": [f"card {secrets[1]}"]}}}
    pii_version = SpanMessage.from_row(raw_pii).to_bytes().replace(b'"version":2', b'"version":9')
    assert all(s.encode() in pii_version for s in secrets)
    kafka_broker.produce_raw(str(Topic.SPANS_RAW), good[:10] + [
        (b"k1", b"\x00\x9f garbage, not JSON"),
        (None, None),
        (b"k3", wrong_version),
        (stranger["trace_id"].encode(), SpanMessage.from_row(stranger).to_bytes()),
        (b"k5", pii_version),
        (b"k6", f"\x9f not JSON, mail {secrets[0]}".encode("latin-1")),
    ] + good[10:])
    consumer = consumer_factory().start()
    wait_for(lambda: _counts(project) == (20, 20), 60, "the valid spans around the poison", consumer)

    # The partitions are consumed side by side: the valid spans can all be stored before the last dead
    # letter (now scanned before it is produced) is acknowledged.
    dead = wait_for(lambda: _dead_letters(kafka_broker, 6), 60, "the six dead letters", consumer)
    reasons = {m.key(): dict(m.headers())[HEADER_REASON].decode() for m in dead}
    assert len(dead) == 6
    assert reasons[b"k1"].startswith("contract: not JSON")
    assert reasons[None].startswith("contract: empty message")
    assert reasons[b"k3"].startswith("contract: unsupported version 9")
    assert reasons[stranger["trace_id"].encode()].startswith("unknown_project: project 987654")
    original = next(m for m in dead if m.key() == b"k1")
    assert original.value() == b"\x00\x9f garbage, not JSON"  # the original bytes, for replay
    assert dict(original.headers())["dlq.topic"] == str(Topic.SPANS_RAW).encode()
    by_key = {m.key(): m for m in dead}
    assert by_key[b"k3"].value() == wrong_version and HEADER_REDACTED not in dict(by_key[b"k3"].headers())
    for key in (b"k5", b"k6"):
        letter = by_key[key]
        assert not any(s.encode() in letter.value() for s in secrets), letter.value()
        assert dict(letter.headers())[HEADER_REDACTED] == b"1" and reasons[key].startswith("contract: ")
    redacted = orjson.loads(by_key[b"k5"].value())  # still JSON: the span as it was, less its PII
    assert redacted["span_id"] == "pii-0" and redacted["error_message"].startswith("no account for ")
    assert redacted["metadata"]["customer"]["cards"][0].startswith("card ")

    # ... and goes on with what follows.
    kafka_broker.produce_raw(str(Topic.SPANS_RAW), _encoded(_rows(project, "after", 5)))
    wait_for(lambda: _counts(project) == (25, 25), 30, "spans after the poison", consumer)
    assert _committed(kafka_broker) == 20 + 6 + 5  # good, poison, after


@pytest.mark.e2e
def test_consumer_killed_mid_batch_loses_and_duplicates_nothing(kafka_broker, consumer_factory):
    project = Project.objects.create(name="crash")
    kafka_broker.create_topics()
    total = 12_000
    kafka_broker.produce_raw(str(Topic.SPANS_RAW), _encoded(_rows(project, "crash", total)))

    # Small batches: many store/commit cycles, so the kill lands inside one (stored, not yet committed, ...).
    first = consumer_factory("first").start("--batch-size", "150")
    stored_at_kill = wait_for(lambda: (n := _counts(project)[0]) >= 1500 and n, 90, "a first part stored", first)
    first.kill()  # SIGKILL: no cleanup, no commit
    stored_at_kill = _counts(project)[0]
    assert stored_at_kill < total, "the consumer finished before it could be killed mid-stream"
    # Offsets are never committed past what is stored (what is stored but not committed is re-read, then skipped).
    assert _committed(kafka_broker) <= stored_at_kill

    second = consumer_factory("second").start("--batch-size", "150")
    time.sleep(0.3)
    second.kill()  # once more, while it is still starting or joining
    third = consumer_factory("third").start("--batch-size", "500")
    wait_for(lambda: _counts(project)[0] >= total, 120, "every span stored", third)
    time.sleep(1.0)  # any re-delivered message would show up as an extra row now
    assert _counts(project) == (total, total)
    assert third.terminate() == 0
    assert _committed(kafka_broker) == total


def test_sigterm_finishes_the_batch_commits_and_leaves(kafka_broker, consumer_factory):
    project = Project.objects.create(name="sigterm")
    kafka_broker.create_topics()
    total = 6000
    kafka_broker.produce_raw(str(Topic.SPANS_RAW), _encoded(_rows(project, "term", total)))
    consumer = consumer_factory().start("--batch-size", "200")
    wait_for(lambda: _counts(project)[0] >= 400, 60, "some spans stored", consumer)
    started = time.monotonic()
    assert consumer.terminate() == 0
    assert time.monotonic() - started < 10
    stored = _counts(project)[0]
    # Everything written was committed, and nothing committed is unwritten: the restart starts exactly there.
    assert _committed(kafka_broker) == stored
    restart = ConsumerProcess(kafka_broker, consumer.log_path.with_name("restart.log")).start()
    try:
        wait_for(lambda: _counts(project)[0] >= total, 60, "the rest stored after the restart", restart)
        assert _counts(project) == (total, total)
    finally:
        restart.kill()


@pytest.mark.e2e
def test_a_second_consumer_rebalances_without_losing_or_duplicating(kafka_broker, consumer_factory):
    project = Project.objects.create(name="rebalance")
    kafka_broker.create_topics()
    total = 24_000
    kafka_broker.produce_raw(str(Topic.SPANS_RAW), _encoded(_rows(project, "reb", total)))
    # Small batches keep the first busy long enough for the second to join.
    first = consumer_factory("first").start("--batch-size", "40")
    wait_for(lambda: _counts(project)[0] >= 1, 60, "the first consumer at work", first)
    second = consumer_factory("second").start("--batch-size", "40")
    wait_for(lambda: _counts(project)[0] >= total, 120, "every span stored by the two", second)
    assert "revoked llm.spans.raw" in first.output()  # the group did rebalance
    assert first.terminate() == 0 and second.terminate() == 0
    assert _counts(project) == (total, total)
    assert _committed(kafka_broker) == total


def test_database_down_retries_the_batch_and_commits_only_after_the_write(kafka_mode, monkeypatch):
    """In-process: the store fails twice like a database that went away, then comes back."""
    from workers.consumers import spans as module
    from workers.consumers.spans import SpanConsumer

    project = Project.objects.create(name="dbdown")
    kafka_mode.create_topics()
    kafka_mode.produce_raw(str(Topic.SPANS_RAW), _encoded(_rows(project, "db", 50)))

    consumer = SpanConsumer(batch_size=500, batch_ms=300)
    events: list[str] = []
    real_store = module.spans_store

    def flaky_store(*, rows):
        if events.count("failed") < 2:
            events.append("failed")
            raise OperationalError("connection to server was lost")
        result = real_store(rows=rows)
        events.append(f"stored {result.stored}")
        if _counts(project)[0] >= 50:
            consumer.stop()
        return result

    real_commit = consumer._commit

    def recording_commit(batch):
        events.append(f"commit {len(batch)}")
        real_commit(batch)

    def sample(name):
        return REGISTRY.get_sample_value(name, {"topic": str(Topic.SPANS_RAW)}) or 0

    before = {name: sample(name) for name in ("llm_kafka_store_retries_total", "llm_kafka_spans_stored_total",
                                              "llm_kafka_spans_consumed_total")}
    monkeypatch.setattr(module, "spans_store", flaky_store)
    monkeypatch.setattr(consumer, "_commit", recording_commit)
    watchdog = threading.Timer(60, consumer.stop)
    watchdog.start()
    try:
        consumer.run()
    finally:
        watchdog.cancel()
    assert events[:2] == ["failed", "failed"]
    assert events[2].startswith("stored") and all(not e.startswith("commit") for e in events[:2])
    assert _counts(project) == (50, 50)
    assert _committed(kafka_mode) == 50
    assert sample("llm_kafka_store_retries_total") - before["llm_kafka_store_retries_total"] == 2
    assert sample("llm_kafka_spans_stored_total") - before["llm_kafka_spans_stored_total"] == 50
    assert sample("llm_kafka_spans_consumed_total") - before["llm_kafka_spans_consumed_total"] == 50


assert SESSION_TIMEOUT_MS <= 10_000  # a group join takes half of it on Tansu
