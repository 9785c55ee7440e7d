"""The span message contract shared by the producer (web) and the consumer."""

from __future__ import annotations

import orjson
import pytest

from ingest.contracts import FIELD_NAMES, ContractError, SpanMessage, SpanMessageV1, span_message_from_bytes
from ingest.services.spans import COLUMNS, spans_prepare


def test_contract_carries_exactly_the_stored_columns():
    # A column added to storage without a new contract version would fail in the consumer.
    assert set(FIELD_NAMES) == set(COLUMNS)


@pytest.fixture
def row(project):
    items = [{"span_id": "s-1", "trace_id": "t-1", "model": "gpt-4o", "provider": "openai", "prompt_tokens": 1200,
              "completion_tokens": 30, "latency_ms_total": 812, "prompt": "mail me at jane@example.com",
              "response": "ok", "attempted_models": ["gpt-4o"], "metadata": {"team": "core", "n": 1}}]
    prepared = spans_prepare(project=project, items=items)
    assert not prepared.rejected
    return prepared.rows[0]


def test_roundtrip_of_a_prepared_row(row):
    data = SpanMessage.from_row(row).to_bytes()
    payload = orjson.loads(data)
    assert payload["schema"] == "llm-observe.span" and payload["version"] == 2
    assert "jane@example.com" not in data.decode()  # redacted before it is ever produced
    back = span_message_from_bytes(data).to_row()
    assert back == {name: row[name] for name in COLUMNS}
    assert back["kind"] == "LLM"
    assert isinstance(back["latency_ms_total"], float) and back["timestamp_utc"].tzinfo is not None


def test_version_1_messages_still_in_the_topic_are_read(row):
    # Written by the previous release: no name, kind or response id; the row gets them as None.
    data = SpanMessageV1.from_row(row).to_bytes()
    payload = orjson.loads(data)
    assert payload["version"] == 1 and "kind" not in payload
    back = span_message_from_bytes(data).to_row()
    assert set(back) == set(COLUMNS)
    assert back["kind"] is None and back["name"] is None and back["prompt_tokens"] == 1200


def test_a_version_1_message_with_version_2_fields_is_refused(row):
    payload = orjson.loads(SpanMessageV1.from_row(row).to_bytes())
    payload["kind"] = "LLM"
    with pytest.raises(ContractError, match="unknown fields: kind"):
        span_message_from_bytes(orjson.dumps(payload))


def _payload(row, **changes):
    payload = orjson.loads(SpanMessage.from_row(row).to_bytes())
    payload.update(changes)
    return payload


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: b"", "empty message"),
    (lambda p: b"\x00\xffgarbage", "not JSON"),
    (lambda p: b"[1, 2]", "not a JSON object"),
    (lambda p: {**p, "schema": "other"}, "schema is 'other'"),
    (lambda p: {**p, "version": 3}, "unsupported version 3"),
    (lambda p: {**p, "kind": 5}, "'kind' has the wrong type"),
    (lambda p: {k: v for k, v in p.items() if k != "span_id"}, "missing field 'span_id'"),
    (lambda p: {**p, "span_id": ""}, "must not be empty"),
    (lambda p: {**p, "project_id": "1"}, "'project_id' has the wrong type"),
    (lambda p: {**p, "pii_detected": 1}, "'pii_detected' has the wrong type"),
    (lambda p: {**p, "attempted_models": [1]}, "'attempted_models' has the wrong type"),
    (lambda p: {**p, "timestamp_utc": "yesterday"}, "not an ISO 8601 timestamp"),
    (lambda p: {**p, "timestamp_utc": "2026-01-01T00:00:00"}, "no UTC offset"),
    (lambda p: {**p, "surprise": True}, "unknown fields: surprise"),
])
def test_invalid_messages_raise_a_clear_contract_error(row, mutate, reason):
    value = mutate(_payload(row))
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    with pytest.raises(ContractError, match=reason.replace("(", r"\(")):
        span_message_from_bytes(data)


def test_a_row_missing_a_column_is_a_contract_error(row):
    del row["scan_status"]
    with pytest.raises(ContractError, match="scan_status"):
        SpanMessage.from_row(row)


def test_messages_are_frozen(row):
    message = SpanMessageV1.from_row(row)
    with pytest.raises(AttributeError):
        message.span_id = "other"
