"""The SDK's Kafka transport against a real Kafka-protocol broker (Tansu) and the real span consumer.

`transaction=True` where the consumer runs: it is another process and must see the
project and key the test committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from django.db import connection

import instrumentation_sdk as sdk
from instrumentation_sdk import _config, _kafka
from tests.kafka_broker import ConsumerProcess, kafka_broker, wait_for  # noqa: F401 - fixture
from tests.sdk.sink import wal_rows
from ingest.queues import Topic

ROOT = Path(__file__).resolve().parents[2]
KAFKA_ENV = ("LLM_OBSERVE_TRANSPORT", "LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS", "LLM_OBSERVE_KAFKA_TOPIC",
             "LLM_OBSERVE_KAFKA_SECURITY_PROTOCOL", "LLM_OBSERVE_KAFKA_SASL_MECHANISM",
             "LLM_OBSERVE_KAFKA_SASL_USERNAME", "LLM_OBSERVE_KAFKA_SASL_PASSWORD")
PII_PROMPT = "Mail the refund to jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111"


@pytest.fixture(autouse=True)
def _no_kafka_env(monkeypatch):
    for name in KAFKA_ENV:
        monkeypatch.delenv(name, raising=False)
    _config.reset_config()


def _stored(project) -> tuple[int, int]:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT span_id) FROM ingest_span WHERE project_id = %s", [project.id])
        return cur.fetchone()


def _kafka_reporter(broker, api_key: str, **options) -> sdk.SpanReporter:
    sdk.configure(transport="kafka", kafka_bootstrap_servers=broker.bootstrap, api_key=api_key, flush_interval=0.05,
                  backoff_initial=0.05, backoff_max=0.5, timeout=3)
    reporter = sdk.SpanReporter(**options)
    sdk.set_reporter(reporter)
    return reporter


@pytest.fixture
def consumers(kafka_broker, tmp_path):
    started: list[ConsumerProcess] = []

    def start(name: str = "consumer") -> ConsumerProcess:
        process = ConsumerProcess(kafka_broker, tmp_path / f"{name}.log").start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


# --- configuration and the wire format (no broker) -------------------------------------------------


def test_http_stays_the_default_and_kafka_is_chosen_by_configuration(monkeypatch):
    assert not _config.config_from_env().kafka
    monkeypatch.setenv("LLM_OBSERVE_URL", "http://appliance:8000")
    monkeypatch.setenv("LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("LLM_OBSERVE_KAFKA_SASL_USERNAME", "sdk")
    cfg = _config.config_from_env()
    assert cfg.kafka and cfg.destination == "kafka://k1:9092,k2:9092/llm.spans.raw"
    assert cfg.kafka_config == {"sasl.username": "sdk"}
    monkeypatch.setenv("LLM_OBSERVE_TRANSPORT", "http")
    cfg = _config.config_from_env()
    assert not cfg.kafka and cfg.destination == "http://appliance:8000"
    _config.reset_config()
    assert sdk.configure(transport="kafka").kafka
    with pytest.raises(ValueError):
        sdk.configure(transport="carrier-pigeon")


def test_messages_follow_the_consumers_frozen_contract():
    from ingest import contracts
    from ingest.contracts import SpanMessageV1, span_message_from_bytes

    # The SDK writes version 1 (its spans' name and kind travel as metadata keys, which the consumer promotes).
    assert _kafka.FIELD_NAMES == tuple(SpanMessageV1._fields())
    assert (_kafka.SPAN_SCHEMA, _kafka.SPAN_VERSION) == (SpanMessageV1.SCHEMA, SpanMessageV1.VERSION)
    assert (_kafka.HEADER_ORIGIN, _kafka.HEADER_KEY, _kafka.PROJECT_FROM_KEY) == (
        contracts.HEADER_ORIGIN, contracts.HEADER_KEY, contracts.PROJECT_FROM_KEY)

    body = orjson.dumps({"span_id": "s1", "trace_id": "t1", "model": "gpt-4o", "prompt_tokens": 12,
                         "latency_ms_total": 80, "timestamp_utc": "2025-01-02T03:04:05.000006Z", "text": "hello",
                         "metadata": {"a": 1}, "customer": "acme", "cost_usd_micro": 5})
    key, value = _kafka.encode(body, "2025-01-02T03:04:06+00:00")
    message = span_message_from_bytes(value)
    assert key == b"t1"
    assert message.project_id == 0 and message.prompt == "hello" and message.latency_ms_total == 80.0
    assert message.timestamp_utc == datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    # Unknown keys (and the ones the appliance derives itself) are metadata, as over HTTP.
    assert message.metadata == {"a": 1, "customer": "acme", "cost_usd_micro": 5}
    assert message.cost_usd_micro is None
    # The appliance's own encoding of the same message is byte for byte the same.
    assert SpanMessageV1.from_row(message.to_row()).to_bytes() == value

    with pytest.raises(_kafka.InvalidSpan):
        _kafka.encode(orjson.dumps({"span_id": "s", "trace_id": "t", "timestamp_utc": "yesterday"}), "x")
    with pytest.raises(ValueError):
        _kafka.key_header("not-a-key")
    prefix, digest = _kafka.key_header("llmo_abc123_secret").decode().split(":")
    from ingest.services.api_keys import hash_key

    assert prefix == "abc123" and digest == hash_key("llmo_abc123_secret")


@pytest.mark.django_db
def test_the_consumer_prepares_an_sdk_span_exactly_like_the_http_api(project):
    """What a client's message becomes at the consumer equals what the same span POSTed becomes."""
    from ingest.contracts import span_message_from_bytes
    from ingest.services.spans import spans_prepare
    from workers.consumers.spans import _client_span

    now = datetime.now(timezone.utc)
    span = {"span_id": "same", "trace_id": "tr", "model": "gpt-4o", "provider": "openai", "prompt": PII_PROMPT,
            "response": "ok", "prompt_tokens": 40, "completion_tokens": 2, "customer": "acme",
            "timestamp_utc": (now - timedelta(minutes=1)).isoformat()}
    over_http = spans_prepare(project=project, items=[dict(span)], received_at=now).rows[0]
    _, value = _kafka.encode(orjson.dumps(span), now.isoformat())
    over_kafka = spans_prepare(project=project, items=[_client_span(span_message_from_bytes(value).to_row())],
                               received_at=now).rows[0]
    assert over_kafka == over_http
    assert over_kafka["pii_detected"] and "jane.doe" not in over_kafka["prompt"]


def test_without_an_api_key_spans_wait_in_the_wal(tmp_path):
    # The project comes from the key: without one nothing is produced, and nothing is lost.
    sdk.configure(transport="kafka", kafka_bootstrap_servers="127.0.0.1:1", flush_interval=0.05, backoff_max=5)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    for i in range(5):
        reporter.report({"span_id": f"nokey-{i}"})
    assert not reporter.flush(1)  # undelivered, but safe:
    assert wal_rows(tmp_path / "wal.sqlite3") == 5 and reporter.stats["sent"] == 0


# --- against the broker and the consumer ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_spans_are_consumed_stored_once_redacted_and_priced(kafka_broker, consumers, project, api_key, tmp_path):
    from ingest.contracts import span_message_from_bytes
    from ingest.models import ModelPrice, Span

    ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m=Decimal("2.5"),
                              output_price_per_1m=Decimal("10"), version="test-1")
    kafka_broker.create_topics()
    consumer = consumers()
    reporter = _kafka_reporter(kafka_broker, api_key, service_name="billing")
    ids = [reporter.report({"span_id": f"k-{i}", "model": "gpt-4o", "provider": "openai", "prompt_tokens": 1000,
                            "completion_tokens": 100, "prompt": "summarise the invoice"}) for i in range(200)]
    with sdk.llm_span(model="gpt-4o", provider="openai") as span:
        span.set_metadata("prompt", PII_PROMPT)
        span.set_metadata("response", "sure")
    assert reporter.flush(30)
    assert reporter.stats["sent"] == 201 and reporter.stats["rejected"] == 0
    assert wal_rows(tmp_path / "wal.sqlite3") == 0

    wait_for(lambda: _stored(project) == (201, 201), 60, "201 spans stored", consumer)
    time.sleep(1.0)  # a re-delivered message would show up as an extra row now
    assert _stored(project) == (201, 201)
    stored = Span.objects.get(span_id="k-7")
    assert stored.service_name == "billing" and stored.project_id == project.id
    assert stored.cost_usd_micro == 3500 and stored.price_version == "test-1"  # priced by the appliance
    assert stored.scan_status == "ok"
    assert set(ids) <= set(Span.objects.values_list("span_id", flat=True))

    pii = Span.objects.get(span_id=span.span_id)
    assert pii.pii_detected is True
    for secret in ("jane.doe@example.com", "7946 0958", "4111 1111 1111 1111"):
        assert secret not in pii.prompt
    # ... and it was already redacted on the topic: the broker's disk never saw it.
    messages = kafka_broker.read_all(str(Topic.SPANS_RAW), expect=201)
    assert not any(b"jane.doe" in m.value() for m in messages)
    one = messages[0]
    assert one.key() == span_message_from_bytes(one.value()).trace_id.encode()
    assert dict(one.headers())[_kafka.HEADER_ORIGIN].startswith(b"instrumentation-sdk/")
    assert consumer.terminate() == 0


@pytest.mark.django_db(transaction=True)
def test_broker_down_spans_go_to_the_wal_and_arrive_exactly_once_when_it_is_back(kafka_broker, consumers, project,
                                                                                  api_key, tmp_path):
    wal = tmp_path / "wal.sqlite3"
    kafka_broker.create_topics()
    first = consumers("first")
    reporter = _kafka_reporter(kafka_broker, api_key)
    for i in range(20):
        reporter.report({"span_id": f"before-{i}", "model": "gpt-4o"})
    assert reporter.flush(30)
    wait_for(lambda: _stored(project) == (20, 20), 60, "the first spans stored", first)
    first.kill()

    kafka_broker.stop()
    started = time.perf_counter()
    for i in range(300):
        reporter.report({"span_id": f"during-{i}", "model": "gpt-4o", "trace_id": f"trace-{i % 7}"})
    assert time.perf_counter() - started < 0.5  # report() never waits for the broker
    wait_for(lambda: wal_rows(wal) == 300, 30, "the spans in the WAL while the broker is away")
    assert reporter.stats["failed_posts"] >= 1

    # Back on the same port (memory storage: empty, topics recreated); the WAL is replayed.
    kafka_broker.restart()
    wait_for(lambda: wal_rows(wal) == 0, 60, "the WAL replayed")
    assert reporter.stats["wal_replayed"] == 300
    second = consumers("second")
    wait_for(lambda: _stored(project) == (320, 320), 60, "every span stored", second)
    time.sleep(1.0)
    assert _stored(project) == (320, 320)
    assert second.terminate() == 0


@pytest.mark.django_db(transaction=True)
def test_the_consumer_dead_letters_unknown_keys_and_invalid_spans(kafka_broker, consumers, project, api_key):
    from ingest.services.api_keys import api_key_create, api_key_revoke
    from workers.consumers.base import HEADER_REASON

    revoked, revoked_raw = api_key_create(project=project, name="old")
    api_key_revoke(api_key=revoked)
    kafka_broker.create_topics()
    consumer = consumers()
    good = _kafka_reporter(kafka_broker, api_key)
    future = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    good.report({"span_id": "fine"})
    good.report({"span_id": "from-the-future", "timestamp_utc": future})
    good.report({"span_id": "tokens", "prompt_tokens": 10**12})
    stranger = sdk.SpanReporter(api_key="llmo_000000000000_not-a-real-key")
    stranger.report({"span_id": "stranger"})
    old = sdk.SpanReporter(api_key=revoked_raw)
    old.report({"span_id": "revoked"})
    for reporter in (good, stranger, old):
        assert reporter.flush(30)
        assert reporter.stats["sent"] >= 1
    stranger.close(1)
    old.close(1)

    wait_for(lambda: _stored(project) == (1, 1), 60, "the valid span stored", consumer)
    dead = kafka_broker.read_all(str(Topic.SPANS_DLQ), expect=4)
    reasons = {orjson.loads(m.value())["span_id"]: dict(m.headers())[HEADER_REASON].decode() for m in dead}
    assert set(reasons) == {"from-the-future", "tokens", "stranger", "revoked"}
    assert reasons["from-the-future"].startswith("invalid: timestamp_in_future")
    assert reasons["tokens"].startswith("invalid: out_of_range (prompt_tokens)")
    assert reasons["stranger"].startswith("unauthenticated")
    assert reasons["revoked"].startswith("revoked_key")
    assert consumer.terminate() == 0


def run_script(body: str, env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    script = "import sys; sys.path.insert(0, %r)\n" % str(ROOT) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_fork_and_exit_flush_deliver_every_span_once_to_the_topic(kafka_broker, tmp_path):
    kafka_broker.create_topics()
    out = run_script("""
        import os
        from instrumentation_sdk import get_reporter
        r = get_reporter()
        for i in range(50):
            r.report({"span_id": f"parent-{i}"})
        assert r.flush(20)  # the parent's producer exists before the fork
        pid = os.fork()
        if pid == 0:
            for i in range(10):
                r.report({"span_id": f"child-{i}"})
            ok = r.flush(20)
            os._exit(0 if ok and r.stats["sent"] == 10 else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        for i in range(100):
            r.report({"span_id": f"late-{i}"})  # no flush: the exit handler delivers them
    """, {"LLM_OBSERVE_TRANSPORT": "kafka", "LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
          "LLM_OBSERVE_API_KEY": "llmo_abc123_secret", "LLM_OBSERVE_WAL_PATH": str(tmp_path / "w.db"),
          "LLM_OBSERVE_FLUSH_INTERVAL": "5", "LLM_OBSERVE_EXIT_FLUSH_TIMEOUT": "10"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", out.stderr
    assert wal_rows(tmp_path / "w.db") == 0
    ids = [orjson.loads(m.value())["span_id"] for m in kafka_broker.read_all(str(Topic.SPANS_RAW), expect=160)]
    assert len(ids) == 160 and len(set(ids)) == 160


def test_exit_with_the_broker_down_is_bounded_and_keeps_everything(tmp_path):
    from tests.kafka_broker import free_port

    started = time.monotonic()
    out = run_script("""
        from instrumentation_sdk import get_reporter
        for i in range(250):
            get_reporter().report({"span_id": f"down-{i}"})
    """, {"LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "LLM_OBSERVE_API_KEY": "llmo_abc123_s",
          "LLM_OBSERVE_WAL_PATH": str(tmp_path / "w.db"), "LLM_OBSERVE_EXIT_FLUSH_TIMEOUT": "2"})
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 15
    assert wal_rows(tmp_path / "w.db") == 250
    assert "Connection refused" not in out.stderr  # librdkafka's reconnect chatter stays at DEBUG


def test_cli_check_in_kafka_mode_checks_the_broker_and_its_topic(kafka_broker):
    from tests.kafka_broker import free_port

    def check(bootstrap, key="llmo_test"):
        env = {**os.environ, "LLM_OBSERVE_TRANSPORT": "kafka", "LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
               "LLM_OBSERVE_API_KEY": key, "LLM_OBSERVE_URL": ""}
        return subprocess.run([sys.executable, "-m", "instrumentation_sdk.cli", "check", "--timeout", "3"],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)

    out = check(kafka_broker.bootstrap)
    assert out.returncode == 1 and "has no topic 'llm.spans.raw'" in out.stderr, out.stderr
    kafka_broker.create_topics(partitions=3)
    out = check(kafka_broker.bootstrap)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"OK: Kafka {kafka_broker.bootstrap} has the topic llm.spans.raw (3 partitions)"
    out = check(kafka_broker.bootstrap, key="")
    assert out.returncode == 1 and "no API key" in out.stderr
    nobody = f"127.0.0.1:{free_port()}"
    out = check(nobody)
    assert out.returncode == 1 and f"cannot reach Kafka {nobody}" in out.stderr, out.stderr
