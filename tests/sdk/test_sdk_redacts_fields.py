"""The SDK redacts PII in every user-content field before a span leaves the application or touches disk.

Not only prompt/response: the error message and every string value of the metadata (nested dicts,
lists, JSON documents in strings) are redacted in the POST body, in the Kafka topic and in the WAL
the SDK writes when the appliance or broker is away.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import instrumentation_sdk as sdk
from instrumentation_sdk.scanning import default_scanner
from tests.kafka_broker import kafka_broker, wait_for  # noqa: F401 - fixture
from tests.sdk.sink import wal_rows
from tests.sdk.test_kafka_transport import _kafka_reporter, _no_kafka_env  # noqa: F401 - fixture

SECRETS = ("jane.doe@example.com", "4111 1111 1111 1111", "+44 20 7946 0958")
CLEAN = "the nightly batch of invoices"  # a value without PII: kept exactly as sent


def _span(span_id: str) -> dict:
    email, card, phone = SECRETS
    return {
        "span_id": span_id, "model": "gpt-4o", "status": "error",
        "prompt": "summarise the invoice",
        "error_message": f"lookup failed for {email}: card {card} declined",
        "metadata": {
            "job": CLEAN,
            "customer": {"contact": [{"phone": phone}, {"note": f"write to {email}"}], "tier": "gold"},
            "traceloop.entity.input": json.dumps({"args": [f"charge {card}"], "kwargs": {"to": email}}),
            # Escapes hide words from a scan of the text: the values are read one by one too.
            "tool.arguments": json.dumps({"text": f"line one\nmail {email}\nphone {phone}"}),
            "count": 3,
        },
        # Not a field of a span: the appliance keeps it in the metadata.
        "messages": [{"role": "user", "content": f"my card is {card}"}],
    }


def _detected() -> list[str]:
    found = [s for s in SECRETS if default_scanner().scan(s).pii_detected]
    assert found, "the scanner detects none of the test values: the test would prove nothing"
    return found


def _assert_redacted(span: dict) -> None:
    text = json.dumps(span, ensure_ascii=False)
    for secret in _detected():
        assert secret not in text, f"{secret!r} left raw in {text}"
    assert span["pii_detected"] is True
    meta = span["metadata"]
    assert meta["job"] == CLEAN and meta["count"] == 3 and meta["customer"]["tier"] == "gold"
    assert "lookup failed" in span["error_message"]
    json.loads(meta["traceloop.entity.input"])  # still JSON
    json.loads(meta["tool.arguments"])
    messages = span["messages"] if "messages" in span else meta["messages"]
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith("my card is")


def test_http_post_body_holds_no_raw_pii_in_error_or_metadata(sink, delivered):
    delivered.report(_span("http-1"))
    with pytest.raises(RuntimeError):
        with sdk.llm_span(model="gpt-4o", provider="openai") as span:
            span.set_metadata("customer", {"email": SECRETS[0], "cards": [SECRETS[1]]})
            raise RuntimeError(f"refund to {SECRETS[0]} failed")
    assert delivered.flush(10)
    spans = {s["span_id"]: s for s in sink.spans}
    _assert_redacted(spans["http-1"])
    other = spans[span.span_id]
    assert other["pii_detected"] is True
    for secret in _detected():
        assert secret not in json.dumps(other, ensure_ascii=False)


def test_without_capture_content_error_and_metadata_are_still_redacted(sink):
    """capture_content=False drops prompt and response; what is still sent is scanned all the same."""
    sdk.configure(url=sink.url, api_key=sink.key, flush_interval=0.05, backoff_initial=0.05, backoff_max=0.2,
                  capture_content=False)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    reporter.report(_span("nocapture-1"))
    assert reporter.flush(10)
    span = next(s for s in sink.spans if s["span_id"] == "nocapture-1")
    assert "prompt" not in span or span["prompt"] is None
    text = json.dumps(span, ensure_ascii=False)
    for secret in _detected():
        assert secret not in text, f"{secret!r} left raw in {text}"
    assert span["pii_detected"] is True and "lookup failed" in span["error_message"]


def test_a_span_without_pii_is_sent_unchanged(sink, delivered):
    metadata = {"job": CLEAN, "nested": {"list": ["a", "b", {"c": "d"}]}, "n": 7}
    delivered.report({"span_id": "clean-1", "error_message": "upstream timeout after 30 s", "metadata": metadata})
    assert delivered.flush(10)
    sent = sink.spans[0]
    assert sent["metadata"] == metadata and sent["error_message"] == "upstream timeout after 30 s"
    assert not sent.get("pii_detected")


def test_the_wal_file_holds_no_raw_pii(tmp_path):
    # Nobody listens there: every span waits in the WAL (on disk).
    sdk.configure(url="http://127.0.0.1:1", api_key="k", flush_interval=0.05, backoff_initial=0.05, backoff_max=5)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    reporter.report(_span("wal-1"))
    wal = tmp_path / "wal.sqlite3"
    wait_for(lambda: wal_rows(wal) == 1, 30, "the span in the WAL")
    reporter.close(0.5)
    data = b"".join(p.read_bytes() for p in Path(tmp_path).glob("wal.sqlite3*"))
    assert CLEAN.encode() in data  # the span is there, readable: a raw value would be found
    for secret in _detected():
        assert secret.encode() not in data


def test_the_kafka_topic_holds_no_raw_pii(kafka_broker):  # noqa: F811 - fixture
    from ingest.queues import Topic

    kafka_broker.create_topics()
    reporter = _kafka_reporter(kafka_broker, "llmo_000000000000_any-key")
    reporter.report(_span("kafka-1"))
    assert reporter.flush(30) and reporter.stats["sent"] == 1
    messages = kafka_broker.read_all(str(Topic.SPANS_RAW), expect=1)
    assert len(messages) == 1
    value = messages[0].value()
    for secret in _detected():
        assert secret.encode() not in value
    _assert_redacted(json.loads(value))

