"""Span kinds, cost only for model calls, estimated tokens, and one cost per model call."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from django.db.models import Sum

from ingest.models import ModelPrice, Span, SpanRollup
from instrumentation_sdk import count_tokens


def span(**overrides):
    base = {"span_id": str(uuid.uuid4()), "trace_id": "trace-k", "service_name": "bot", "status": "success"}
    base.update(overrides)
    return base


@pytest.fixture
def prices(db):
    ModelPrice.objects.create(provider="openai", model="gpt-4o-mini", input_price_per_1m="0.15",
                              output_price_per_1m="0.60", version="2026-11-01")
    ModelPrice.objects.create(provider="anthropic", model="claude-3-5-haiku", input_price_per_1m="0.80",
                              output_price_per_1m="4.00", version="2026-11-01")


def _read(api, span_id):
    items = api.get("/v1/spans", {"limit": 1000}).json()["items"]
    return next(item for item in items if item["span_id"] == span_id)


@pytest.mark.parametrize("given, stored", [
    ("tool", "TOOL"), ("TOOL", "TOOL"), ("Retriever", "RETRIEVER"), ("retrieval", "RETRIEVER"),
    ("workflow", "CHAIN"), ("embeddings", "EMBEDDING"), ("guardrail", "GUARDRAIL"), ("unknown", "UNKNOWN"),
])
def test_kind_is_stored_in_its_canonical_spelling(api, given, stored):
    sent = span(kind=given, name="lookup_order")
    assert api.post("/v1/spans", sent).status_code == 202
    item = _read(api, sent["span_id"])
    assert item["kind"] == stored and item["name"] == "lookup_order"


def test_an_unknown_kind_is_refused_with_the_list(api):
    response = api.post("/v1/spans", [span(kind="llm"), span(kind="banana")])
    assert response.status_code == 202
    rejected = response.json()["rejected"]
    assert [(r["index"], r["rule"], r["field"]) for r in rejected] == [(1, "invalid_value", "kind")]
    assert "TOOL" in rejected[0]["reason"]


def test_kind_defaults_from_what_the_span_carries(api):
    llm, plain, legacy = span(model="gpt-4o-mini"), span(), span(span_type="tool")
    assert api.post("/v1/spans", [llm, plain, legacy]).status_code == 202
    assert _read(api, llm["span_id"])["kind"] == "LLM"
    assert _read(api, plain["span_id"])["kind"] == "UNKNOWN"
    got = _read(api, legacy["span_id"])  # 1.8.1's span_type names the kind and stays in metadata
    assert got["kind"] == "TOOL" and got["metadata"]["span_type"] == "tool"


def test_a_tool_is_never_priced_and_says_not_applicable(api, prices):
    tool = span(kind="TOOL", name="search", model="gpt-4o-mini", prompt_tokens=100, completion_tokens=10)
    chain = span(kind="CHAIN", name="RunnableSequence")
    unknown_model = span(model="my-finetune", prompt_tokens=10, completion_tokens=5)
    no_tokens = span(model="gpt-4o-mini")
    assert api.post("/v1/spans", [tool, chain, unknown_model, no_tokens]).status_code == 202
    got = _read(api, tool["span_id"])
    assert got["cost_usd_micro"] is None and got["cost_status"] == "not_applicable"
    assert _read(api, chain["span_id"])["cost_status"] == "not_applicable"
    assert _read(api, unknown_model["span_id"])["cost_status"] == "unknown_price"
    assert _read(api, no_tokens["span_id"])["cost_status"] == "no_tokens"


def test_tokens_are_estimated_from_the_text_when_the_provider_sent_none(api, prices):
    prompt, answer = "Summarise the attached invoice in two lines, please.", "Invoice 42: 3 items, 17 EUR."
    sent = span(model="gpt-4o-mini", provider="openai", prompt=prompt, response=answer)
    assert api.post("/v1/spans", sent).status_code == 202
    got = _read(api, sent["span_id"])
    assert got["token_count_method"] == "estimated" and got["cost_status"] == "estimated"
    assert got["prompt_tokens"] == count_tokens(prompt, "gpt-4o-mini")[0] > 5
    assert got["completion_tokens"] == count_tokens(answer, "gpt-4o-mini")[0] > 5
    expected = round(got["prompt_tokens"] * 0.15 + got["completion_tokens"] * 0.60)
    assert got["cost_usd_micro"] == expected


def test_provider_tokens_are_never_labelled_estimated(api, prices):
    sent = span(model="gpt-4o-mini", provider="openai", prompt="hi", response="hello", prompt_tokens=7,
                completion_tokens=3, token_count_method="provider")
    assert api.post("/v1/spans", sent).status_code == 202
    got = _read(api, sent["span_id"])
    assert (got["prompt_tokens"], got["token_count_method"], got["cost_status"]) == (7, "provider", "priced")


def _at(hours_ago: float, ms: int = 0) -> str:
    return (datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
            - timedelta(hours=hours_ago) + timedelta(milliseconds=ms)).isoformat()


def _call_pair(trace="trace-dup", response_id="msg_01", hours_ago=2):
    # The anthropic SDK's own span and an instrumentation's span of the same call.
    native = span(trace_id=trace, name="anthropic.messages.create", model="claude-3-5-haiku-20241022",
                  provider="anthropic", prompt_tokens=31, completion_tokens=19, response_id=response_id,
                  timestamp_utc=_at(hours_ago))
    instrumented = span(trace_id=trace, name="Messages", kind="LLM", model="claude-3-5-haiku-20241022",
                        provider="anthropic", prompt_tokens=31, completion_tokens=19, response_id=response_id,
                        timestamp_utc=_at(hours_ago, ms=2), parent_span_id=native["span_id"])
    return native, instrumented


def _totals(project):
    return SpanRollup.objects.filter(project=project).aggregate(spans=Sum("spans"), cost=Sum("cost_usd_micro"),
                                                               tokens=Sum("prompt_tokens"))


@pytest.mark.parametrize("batches", ["one batch", "two batches"])
def test_two_spans_of_one_call_cost_once(api, prices, project, batches):
    native, instrumented = _call_pair()
    if batches == "one batch":
        assert api.post("/v1/spans", [instrumented, native]).status_code == 202
    else:
        assert api.post("/v1/spans", native).status_code == 202
        assert api.post("/v1/spans", instrumented).status_code == 202
    first, second = _read(api, native["span_id"]), _read(api, instrumented["span_id"])
    assert first["duplicate_of"] is None and first["cost_usd_micro"] == round(31 * 0.8 + 19 * 4)
    assert second["duplicate_of"] == native["span_id"] and second["cost_status"] == "duplicate"
    assert second["cost_usd_micro"] is None and second["prompt_tokens"] is None
    assert second["metadata"]["llm_observe.duplicate_counts"]["prompt_tokens"] == 31
    assert _totals(project) == {"spans": 1, "cost": 101, "tokens": 31}


def test_same_response_id_in_other_traces_or_projects_is_another_call(api, prices, project):
    a, _ = _call_pair(trace="trace-a", hours_ago=5)
    b, _ = _call_pair(trace="trace-b", hours_ago=3)
    assert api.post("/v1/spans", [a, b]).status_code == 202
    assert _read(api, a["span_id"])["duplicate_of"] is None
    assert _read(api, b["span_id"])["duplicate_of"] is None
    assert _totals(project)["spans"] == 2


def test_chains_and_tools_are_not_counted_as_calls(api, prices, project):
    llm = span(model="gpt-4o-mini", provider="openai", prompt_tokens=10, completion_tokens=2)
    assert api.post("/v1/spans", [llm, span(kind="CHAIN", latency_ms_total=9000.0),
                                  span(kind="TOOL", name="search")]).status_code == 202
    assert _totals(project)["spans"] == 1
    assert Span.objects.filter(project=project).count() == 3


def test_spans_list_filters_by_kind(api):
    assert api.post("/v1/spans", [span(kind="TOOL"), span(kind="CHAIN"), span(model="gpt-4o")]).status_code == 202
    kinds = [item["kind"] for item in api.get("/v1/spans", {"kind": "tool"}).json()["items"]]
    assert kinds == ["TOOL"]
    bad = api.get("/v1/spans", {"kind": "banana"})
    assert bad.status_code == 400 and bad.json()["field"] == "kind"


def test_a_failed_call_gets_no_estimated_tokens(api, prices):
    sent = span(model="gpt-4o-mini", provider="openai", status="error", prompt="Summarise this", response=None,
                error_type="BadRequestError")
    assert api.post("/v1/spans", sent).status_code == 202
    got = _read(api, sent["span_id"])
    assert got["prompt_tokens"] is None and got["token_count_method"] is None and got["cost_status"] == "no_tokens"


def test_the_carrier_keeps_what_only_the_duplicate_saw(api, prices):
    native, instrumented = _call_pair(trace="trace-ttft", response_id="msg_ttft")
    native.update(latency_ms_ttft=None)
    instrumented.update(latency_ms_ttft=240.0, finish_reason="end_turn")
    assert api.post("/v1/spans", [native, instrumented]).status_code == 202
    carrier = _read(api, native["span_id"])
    assert carrier["latency_ms_ttft"] == 240.0 and carrier["finish_reason"] == "stop"


@pytest.mark.parametrize("batches", ["one batch", "two batches"])
def test_one_call_in_two_traces_costs_once(api, prices, project, batches):
    # OpenLLMetry's span and the anthropic SDK's own span of one call land in two traces.
    native, instrumented = _call_pair(trace="trace-one", response_id="msg_2traces")
    instrumented["trace_id"] = "trace-two"
    if batches == "one batch":
        assert api.post("/v1/spans", [native, instrumented]).status_code == 202
    else:
        assert api.post("/v1/spans", native).status_code == 202
        assert api.post("/v1/spans", instrumented).status_code == 202
    assert _read(api, instrumented["span_id"])["duplicate_of"] == native["span_id"]
    assert _totals(project)["spans"] == 1


def test_a_cached_answer_hours_later_is_another_call(api, prices, project):
    # A cache in front of the provider may return the same response id again, to another trace.
    first, later = _call_pair(trace="trace-early", response_id="msg_cached", hours_ago=4)
    later.update(trace_id="trace-late", timestamp_utc=_at(1), parent_span_id=None)
    assert api.post("/v1/spans", [first, later]).status_code == 202
    assert _read(api, later["span_id"])["duplicate_of"] is None
    assert _totals(project)["spans"] == 2


def test_sdk_kafka_messages_carry_kind_and_name_as_metadata_the_consumer_promotes():
    from workers.consumers.spans import _client_span

    span = _client_span({"span_id": "s", "trace_id": "t", "metadata": {"kind": "tool", "name": "search", "a": 1}})
    assert (span["kind"], span["name"], span["metadata"]) == ("tool", "search", {"a": 1})
    # A user's own "kind" that names no kind stays metadata: the span must not be refused for it.
    span = _client_span({"span_id": "s", "trace_id": "t", "metadata": {"kind": "summary"}})
    assert "kind" not in span and span["metadata"] == {"kind": "summary"}


@pytest.mark.parametrize("batches", ["one batch", "two batches"])
def test_a_mock_provider_answering_every_call_with_one_id_is_not_one_call(api, prices, project, batches):
    # Calls made one after the other, each answered "chatcmpl-123" (a test double, a cache): not the same call.
    calls = [span(trace_id="trace-mock", model="gpt-4o-mini", provider="openai", prompt_tokens=10,
                  completion_tokens=2, response_id="chatcmpl-123", latency_ms_total=500.0,
                  timestamp_utc=_at(2, ms=3000 * i)) for i in range(3)]
    if batches == "one batch":
        assert api.post("/v1/spans", calls).status_code == 202
    else:
        for call in calls:
            assert api.post("/v1/spans", call).status_code == 202
    assert [_read(api, c["span_id"])["duplicate_of"] for c in calls] == [None, None, None]
    assert _totals(project)["spans"] == 3


def test_the_client_librarys_span_inside_the_instrumentations_is_the_same_call(api, prices, project):
    outer, inner = _call_pair(trace="trace-nested", response_id="msg_nested")
    outer.update(latency_ms_total=900.0)
    inner.update(timestamp_utc=_at(2, ms=150), latency_ms_total=600.0)
    assert api.post("/v1/spans", outer).status_code == 202
    assert api.post("/v1/spans", inner).status_code == 202
    assert _read(api, inner["span_id"])["duplicate_of"] == outer["span_id"]


@pytest.mark.parametrize("order", ["instrumentation first", "client library first", "one batch"])
def test_the_client_librarys_own_span_carries_the_call(api, prices, project, order):
    # OpenLLMetry counts an anthropic stream's output tokens wrong (13); the anthropic SDK's own span,
    # in another trace, has the provider's 12. Whatever arrives first, the call costs what the provider said.
    wrapper, native = _call_pair(trace="trace-openllmetry", response_id="msg_stream")
    wrapper.update(completion_tokens=13, metadata={"otel.scope": "opentelemetry.instrumentation.anthropic"},
                   latency_ms_total=1000.0)
    native.update(trace_id="trace-sdk", parent_span_id=None, completion_tokens=12, latency_ms_total=900.0,
                  latency_ms_ttft=210.0, metadata={"otel.scope": "com.anthropic.sdk.python"})
    batches = {"instrumentation first": [[wrapper], [native]], "client library first": [[native], [wrapper]],
               "one batch": [[wrapper, native]]}[order]
    for batch in batches:
        assert api.post("/v1/spans", batch).status_code == 202
    carried, duplicate = _read(api, native["span_id"]), _read(api, wrapper["span_id"])
    assert carried["duplicate_of"] is None and carried["completion_tokens"] == 12
    assert duplicate["duplicate_of"] == native["span_id"] and duplicate["cost_usd_micro"] is None
    assert duplicate["metadata"]["llm_observe.duplicate_counts"]["completion_tokens"] == 13
    assert _totals(project) == {"spans": 1, "cost": round(31 * 0.8 + 12 * 4), "tokens": 31}


def test_a_first_chunk_after_the_end_is_bounded_by_the_span(api):
    sent = span(model="claude-haiku-4-5", latency_ms_total=1070.35, latency_ms_ttft=1073.36)
    ok = span(model="claude-haiku-4-5", latency_ms_total=1070.35, latency_ms_ttft=240.0)
    assert api.post("/v1/spans", [sent, ok]).status_code == 202
    got = _read(api, sent["span_id"])
    assert got["latency_ms_ttft"] == 1070.35 and got["metadata"]["llm_observe.ttft_reported_ms"] == 1073.36
    assert _read(api, ok["span_id"])["latency_ms_ttft"] == 240.0


def test_a_failed_call_traced_by_an_instrumentation_around_the_client_library_is_one_error(api, project):
    # No response id on a 400: OpenInference's span and, as its child, the anthropic SDK's own.
    outer = span(trace_id="trace-400", name="Messages", kind="LLM", model="claude-haiku-4-5", status="error",
                 error_type="BadRequestError", latency_ms_total=40.0, timestamp_utc=_at(2),
                 metadata={"otel.scope": "openinference.instrumentation.anthropic"})
    inner = span(trace_id="trace-400", name="anthropic.messages.create", model="claude-haiku-4-5", status="error",
                 error_type="BadRequestError", latency_ms_total=35.0, timestamp_utc=_at(2, ms=2),
                 parent_span_id=outer["span_id"], metadata={"otel.scope": "com.anthropic.sdk.python"})
    retry = span(trace_id="trace-400", name="Messages", kind="LLM", model="claude-haiku-4-5", status="error",
                 latency_ms_total=40.0, timestamp_utc=_at(2, ms=5000),
                 metadata={"otel.scope": "openinference.instrumentation.anthropic"})
    assert api.post("/v1/spans", [outer, inner, retry]).status_code == 202
    assert _read(api, outer["span_id"])["duplicate_of"] == inner["span_id"]
    assert _read(api, inner["span_id"])["duplicate_of"] is None
    assert _read(api, retry["span_id"])["duplicate_of"] is None
    totals = SpanRollup.objects.filter(project=project).aggregate(spans=Sum("spans"), errors=Sum("errors"))
    assert totals == {"spans": 2, "errors": 2}
