"""Span names and kinds from the SDK: kind=/name= on llm_span and @llm_observe, 1.8.1's span_type,
manual report() dicts, and the auto-instrumentation's LLM / EMBEDDING spans."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

import instrumentation_sdk as sdk
from instrumentation_sdk import llm_observe, llm_span, llm_span_with_tokens, llm_streaming_span, wrap_stream
from instrumentation_sdk._kinds import SPAN_KINDS

HAS_OPENAI = importlib.util.find_spec("openai") is not None


def test_the_kinds_are_the_appliances_ten():
    assert SPAN_KINDS == ("LLM", "CHAIN", "TOOL", "AGENT", "RETRIEVER", "EMBEDDING", "RERANKER", "GUARDRAIL",
                          "EVALUATOR", "UNKNOWN")


# --- llm_span -------------------------------------------------------------------------------


@pytest.mark.parametrize("given, sent", [("tool", "TOOL"), ("Retriever", "RETRIEVER"), (" llm ", "LLM"),
                                         ("EMBEDDING", "EMBEDDING"), ("unknown", "UNKNOWN")])
def test_llm_span_sends_kind_in_canonical_case_and_name(memory, given, sent):
    with llm_span(model="gpt-4o", kind=given, name="lookup_order") as span:
        assert span.kind == sent and span.name == "lookup_order"
    (data,) = memory.spans
    assert data["kind"] == sent and data["name"] == "lookup_order"
    assert "metadata" not in data  # kind and name are span fields, not metadata


def test_async_llm_span_with_kind(memory):
    async def body():
        async with llm_span(kind="agent", name="planner"):
            await asyncio.sleep(0)

    asyncio.run(body())
    assert memory.spans[0]["kind"] == "AGENT" and memory.spans[0]["name"] == "planner"


@pytest.mark.parametrize("bad", ["tools", "", "llm-call", 3, True])
def test_a_bad_kind_raises_at_the_call_not_at_report_time(memory, bad):
    with pytest.raises(ValueError, match="kind must be one of LLM, CHAIN, TOOL"):
        llm_span(model="gpt-4o", kind=bad)
    assert memory.spans == []


def test_a_bad_kind_set_mid_call_raises_and_the_span_keeps_its_kind(memory):
    with llm_span(kind="tool") as span:
        with pytest.raises(ValueError):
            span.set_metadata("kind", "hammer")
    assert memory.spans[0]["kind"] == "TOOL"


def test_kind_and_name_can_be_set_mid_call(memory):
    with llm_span(model="gpt-4o") as span:
        span.set_metadata("kind", "guardrail").set_metadata("name", "pii_filter")
    assert memory.spans[0]["kind"] == "GUARDRAIL" and memory.spans[0]["name"] == "pii_filter"


def test_a_long_name_is_cut_to_500_characters(memory):
    with llm_span(name="n" * 600):
        pass
    assert memory.spans[0]["name"] == "n" * 500


def test_without_kind_the_span_has_none_and_the_appliance_decides(memory):
    with llm_span(model="gpt-4o", user_id="u-42"):
        pass
    assert "kind" not in memory.spans[0] and "name" not in memory.spans[0]


# --- 1.8.1's span_type= ----------------------------------------------------------------------


def test_span_type_naming_a_kind_becomes_the_kind(memory):
    with llm_span(model="gpt-4o", span_type="retriever", team="search"):
        pass
    (data,) = memory.spans
    assert data["kind"] == "RETRIEVER"
    assert data["metadata"] == {"team": "search"}


def test_span_type_naming_no_kind_stays_metadata_as_in_1_8_1(memory):
    with llm_span(model="gpt-4o", span_type="completion") as span:
        span.set_metadata("span_type", "streaming")
    (data,) = memory.spans
    assert "kind" not in data and data["metadata"] == {"span_type": "streaming"}


def test_an_explicit_kind_wins_over_span_type_whatever_the_order(memory):
    with llm_span(span_type="tool", kind="chain") as span:
        span.set_metadata("span_type", "agent")
    (data,) = memory.spans
    assert data["kind"] == "CHAIN" and data["metadata"] == {"span_type": "agent"}


def test_span_type_on_the_token_and_streaming_spans(memory):
    with llm_span_with_tokens(model="gpt-4", provider="openai", prompt="hello world", span_type="llm"):
        pass
    with llm_streaming_span(model="gpt-4", provider="openai", prompt="Say hello", kind="llm",
                            name="stream hello") as ctx:
        for _ in wrap_stream(["Hello", " world"], span_context=ctx, model="gpt-4"):
            pass
    first, second = memory.spans
    assert first["kind"] == "LLM" and first["prompt_tokens"] == 2
    assert second["kind"] == "LLM" and second["name"] == "stream hello" and second["completion_tokens"] >= 2


# --- @llm_observe ----------------------------------------------------------------------------


def test_decorator_sends_kind_and_name(memory):
    @llm_observe(service="search-agent", endpoint="search", kind="Tool", name="web_search")
    def search(q):
        return [q]

    search("x")
    (data,) = memory.spans
    assert data["kind"] == "TOOL" and data["name"] == "web_search" and data["endpoint"] == "search"


def test_decorator_names_the_span_after_the_function_by_default(memory):
    class Bot:
        @llm_observe(service="payment-bot", endpoint="gpt-4o")
        def answer(self, prompt):
            return prompt

    @llm_observe
    def bare():
        return 1

    Bot().answer("hi")
    bare()
    assert [s["name"] for s in memory.spans] == ["Bot.answer", "bare"]
    assert all("kind" not in s for s in memory.spans)


def test_decorator_with_a_bad_kind_raises_when_decorating(memory):
    with pytest.raises(ValueError, match="kind must be one of"):
        @llm_observe(service="s", kind="hammer")
        def f():
            pass


def test_decorator_span_type_metadata(memory):
    @llm_observe(service="s", endpoint="e", span_type="agent", team="a")
    async def agent():
        return 1

    @llm_observe(service="s", endpoint="e2", span_type="workflow")
    def other():
        return 2

    asyncio.run(agent())
    other()
    first, second = memory.spans
    assert first["kind"] == "AGENT" and first["metadata"] == {"team": "a"}
    assert "kind" not in second and second["metadata"] == {"span_type": "workflow"}


# --- report(dict) -----------------------------------------------------------------------------


def test_manual_reports_carry_kind_and_name_to_the_appliance(delivered, sink):
    reporter = sdk.get_reporter()
    reporter.report({"span_id": "k1", "service_name": "svc", "status": "success", "kind": "tool", "name": "n" * 600})
    reporter.report({"span_id": "k2", "service_name": "svc", "status": "success", "span_type": "Chain"})
    reporter.report({"span_id": "k3", "service_name": "svc", "status": "success", "kind": "hammer",
                     "span_type": "retriever", "metadata": {"a": 1}})
    reporter.report({"span_id": "k4", "service_name": "svc", "status": "success", "span_type": "completion"})
    assert reporter.flush(timeout=10)
    spans = {s["span_id"]: s for s in sink.spans}
    assert spans["k1"]["kind"] == "TOOL" and spans["k1"]["name"] == "n" * 500
    assert spans["k2"]["kind"] == "CHAIN" and "span_type" not in spans["k2"]
    # a kind the appliance would refuse is kept as metadata; a valid span_type then decides
    assert spans["k3"]["kind"] == "RETRIEVER" and spans["k3"]["metadata"] == {"a": 1, "unknown_kind": "hammer"}
    assert "kind" not in spans["k4"] and spans["k4"]["metadata"] == {"span_type": "completion"}


def test_sdk_spans_reach_the_sink_with_kind_and_name(delivered, sink):
    with llm_span(model="gpt-4o", kind="evaluator", name="faithfulness"):
        pass
    assert sdk.get_reporter().flush(timeout=10)
    (span,) = sink.spans
    assert span["kind"] == "EVALUATOR" and span["name"] == "faithfulness"


# --- auto-instrumentation --------------------------------------------------------------------


@pytest.fixture
def traced_openai(memory):
    if not HAS_OPENAI:
        pytest.skip("openai is not installed")
    sdk.init_auto_instrumentation()
    yield memory
    sdk.uninstrument_all()


def test_auto_instrumented_chat_is_an_llm_span_named_after_the_operation_and_model(traced_openai, fake):
    import openai

    client = openai.OpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    (span,) = traced_openai.spans
    assert span["kind"] == "LLM" and span["name"] == "chat gpt-4o-mini"


def test_auto_instrumented_embeddings_are_embedding_spans_with_input_tokens_only(traced_openai, fake):
    import openai

    client = openai.OpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)
    result = client.embeddings.create(model="text-embedding-3-small", input=["first text", "second one here"])
    assert len(result.data) == 2
    (span,) = traced_openai.spans
    assert span["kind"] == "EMBEDDING" and span["name"] == "embeddings text-embedding-3-small"
    assert span["endpoint"] == "openai.embeddings" and span["provider"] == "openai"
    assert span["prompt_tokens"] == 5 and span["completion_tokens"] == 0
    assert span["token_count_method"] == "provider" and span["status"] == "success"
    assert span["prompt"] == "first text\nsecond one here" and "response" not in span


def test_auto_instrumented_async_embeddings(traced_openai, fake):
    import openai

    async def call():
        client = openai.AsyncOpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)
        return await client.embeddings.create(model="text-embedding-3-large", input="one")

    asyncio.run(call())
    (span,) = traced_openai.spans
    assert span["kind"] == "EMBEDDING" and span["name"] == "embeddings text-embedding-3-large"
    assert span["prompt_tokens"] == 1


def test_instrument_client_covers_embeddings(memory, fake):
    if not HAS_OPENAI:
        pytest.skip("openai is not installed")
    import openai

    client = openai.OpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)
    sdk.instrument_client(client, "openai")
    client.embeddings.create(model="text-embedding-3-small", input="hello there")
    (span,) = memory.spans
    assert span["kind"] == "EMBEDDING" and span["prompt_tokens"] == 2


# --- against a real appliance ----------------------------------------------------------------


def test_the_sdks_kinds_are_the_appliances():
    from ingest.kinds import SPAN_KINDS as APPLIANCE_KINDS

    assert SPAN_KINDS == APPLIANCE_KINDS


def test_kinds_names_and_embeddings_land_in_the_appliance(appliance, fake):
    import uuid

    if not HAS_OPENAI:
        pytest.skip("openai is not installed")
    import openai

    service = f"sdk-kinds-{uuid.uuid4().hex[:8]}"
    sdk.configure(url=appliance.url, api_key=appliance.key, service_name=service, flush_interval=0.05)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    sdk.init_auto_instrumentation()
    client = openai.OpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)

    @llm_observe(kind="agent", name="support_agent")
    def agent():
        with llm_span(kind="tool", name="lookup_order", span_type="ignored-here"):
            pass
        client.embeddings.create(model="text-embedding-3-small", input="where is my parcel")

    agent()
    with llm_span(model="gpt-4o", span_type="llm", prompt_tokens=10, completion_tokens=5):
        pass
    assert reporter.flush(10)
    items = {i["name"] or i["kind"]: i for i in appliance.wait_for_spans(4, service=service)}
    assert set(items) == {"support_agent", "lookup_order", "embeddings text-embedding-3-small", "LLM"}
    root, tool = items["support_agent"], items["lookup_order"]
    assert root["kind"] == "AGENT" and root["cost_status"] == "not_applicable"
    assert tool["kind"] == "TOOL" and tool["parent_span_id"] == root["span_id"]
    assert tool["cost_status"] == "not_applicable" and tool["metadata"] == {"span_type": "ignored-here"}
    emb = items["embeddings text-embedding-3-small"]
    assert emb["kind"] == "EMBEDDING" and emb["cost_status"] == "priced"
    assert emb["completion_tokens"] == 0 and emb["cost_usd_micro"] == 0  # 4 tokens x $0.02/1M rounds to 0
    assert emb["price_version"] == "2026-12-03"
    assert items["LLM"]["kind"] == "LLM" and items["LLM"]["cost_status"] == "priced"


def test_kind_and_name_cross_the_kafka_transport(delivered):
    """The SDK's Kafka messages are version 1: kind and name ride in metadata, the consumer promotes them."""
    from ingest.contracts import span_message_from_bytes
    from instrumentation_sdk import _kafka
    from instrumentation_sdk._reporter import EXTERNAL
    from workers.consumers.spans import _client_span

    reporter = sdk.get_reporter()
    cfg = sdk.get_config()
    span = {"span_id": "kf-1", "trace_id": "t-kf", "service_name": "svc", "kind": "Tool", "name": "lookup",
            "metadata": {"team": "a"}}
    refused = {"span_id": "kf-2", "trace_id": "t-kf", "kind": "hammer", "span_type": "retriever"}
    rows = []
    for item in (span, refused):
        _, body = reporter._prepare(dict(item), EXTERNAL, cfg)
        _, value = _kafka.encode(body, _kafka.now_iso())
        rows.append(_client_span(span_message_from_bytes(value).to_row()))
    assert rows[0]["kind"] == "TOOL" and rows[0]["name"] == "lookup" and rows[0]["metadata"] == {"team": "a"}
    # a kind the appliance would refuse stays metadata under a key the consumer does not promote
    assert rows[1]["kind"] == "RETRIEVER" and rows[1]["metadata"] == {"unknown_kind": "hammer"}
