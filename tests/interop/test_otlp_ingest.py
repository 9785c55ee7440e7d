"""POST /v1/traces through Django's test client: decoding, GenAI / OpenInference mapping, OTLP answers."""

from __future__ import annotations

import gzip
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.trace import SpanKind

from ingest.models import ModelPrice, Span
from tests.interop.otel_helpers import GENAI_CHAT_COST, Recorder, genai_chat_attributes, hex_id

PB = "application/x-protobuf"
JS = "application/json"


@pytest.fixture
def prices(db):
    ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                              output_price_per_1m="10.00", cached_input_price_per_1m="1.25", version="test-1")
    ModelPrice.objects.create(provider="anthropic", model="claude-sonnet-4", input_price_per_1m="3.00",
                              output_price_per_1m="15.00", cached_input_price_per_1m="0.30", version="test-1")


@pytest.fixture
def otlp(client, api_key):
    def post(body: bytes, content_type: str = PB, headers: dict | None = None):
        # CONTENT_TYPE as well: the test client drops the header of an empty body.
        return client.post("/v1/traces", body, content_type=content_type, CONTENT_TYPE=content_type,
                           headers={"Authorization": f"Bearer {api_key}", **(headers or {})})

    return post


def decoded(response) -> ExportTraceServiceResponse:
    message = ExportTraceServiceResponse()
    message.ParseFromString(response.content)
    return message


def stored(api, **params) -> dict[str, dict]:
    return {item["span_id"]: item for item in api.get("/v1/spans", {"limit": 1000, **params}).json()["items"]}


def chat_trace(rec: Recorder, **chat_overrides):
    with rec.span("POST /chat", end_ms=2000, kind=SpanKind.SERVER,
                  attributes={"http.request.method": "POST", "http.route": "/chat", "user.id": "u-42"}) as root:
        with rec.span("chat gpt-4o", start_ms=100, end_ms=1912, kind=SpanKind.CLIENT,
                      attributes=genai_chat_attributes(**chat_overrides)) as llm:
            pass
    return root, llm


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_genai_chat_under_an_http_span_is_stored_with_model_tokens_and_cost(api, otlp, prices, encoding):
    rec = Recorder(service="billing-bot", **{"deployment.environment.name": "staging", "host.name": "web-1"})
    root, llm = chat_trace(rec)
    body, ctype = (rec.protobuf(), PB) if encoding == "protobuf" else (rec.json(), JS)
    response = otlp(body, ctype)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == ctype
    if encoding == "protobuf":
        assert not decoded(response).HasField("partial_success")
    else:
        assert response.json() == {}

    spans = stored(api)
    assert len(spans) == 2
    got = spans[hex_id(llm)]
    assert got["trace_id"] == hex_id(llm, "trace_id")
    assert got["parent_span_id"] == hex_id(root)
    assert got["model"] == "gpt-4o-2024-08-06" and got["provider"] == "openai"
    assert got["service_name"] == "billing-bot" and got["environment"] == "staging"
    assert (got["prompt_tokens"], got["completion_tokens"], got["cached_tokens"]) == (812, 164, 512)
    assert got["token_count_method"] == "provider"
    # cached input priced once, at the cached rate: not also at the full input rate
    assert got["cost_usd_micro"] == GENAI_CHAT_COST and got["price_version"] == "test-1"
    assert got["latency_ms_total"] == pytest.approx(1812, abs=0.01)
    assert got["latency_ms_ttft"] == pytest.approx(412)
    assert got["finish_reason"] == "stop" and got["status"] == "success"
    assert got["session_id"] == "conv-7"
    assert got["prompt"] == "system: You are a billing assistant.\nuser: Summarise my last invoice"
    assert got["response"] == "Your last invoice was 42 EUR."
    assert got["endpoint"] == "chat gpt-4o"
    meta = got["metadata"]
    assert meta["gen_ai.request.temperature"] == 0.2 and got["response_id"] == "chatcmpl-123"
    assert "gen_ai.response.id" not in meta and (got["name"], got["kind"]) == ("chat gpt-4o", "LLM")
    assert meta["gen_ai.request.model"] == "gpt-4o" and meta["otel.kind"] == "client"
    assert meta["otel.span_type"] == "llm" and meta["otel.scope"] == "tests.interop"
    assert meta["otel.resource"]["host.name"] == "web-1"
    assert not any(k.startswith("telemetry.sdk") for k in meta["otel.resource"])
    assert "gen_ai.input.messages" not in meta and "gen_ai.output.messages" not in meta

    parent = spans[hex_id(root)]
    assert parent["model"] is None and parent["provider"] is None and parent["cost_usd_micro"] is None
    assert parent["prompt_tokens"] is None and parent["parent_span_id"] is None
    assert parent["status"] == "success" and parent["user_id"] == "u-42"
    assert parent["metadata"]["http.route"] == "/chat" and parent["metadata"]["otel.span_type"] == "other"

    trace = api.get(f"/v1/traces/{got['trace_id']}").json()
    assert trace["span_count"] == 2
    assert [c["span_id"] for c in trace["roots"][0]["children"]] == [hex_id(llm)]


def test_protobuf_and_json_of_the_same_spans_store_the_same_rows(api, otlp, prices, client, project):
    from ingest.services.api_keys import api_key_create
    from ingest.models import Project

    rec = Recorder()
    chat_trace(rec)
    assert otlp(rec.protobuf()).status_code == 200
    other = Project.objects.create(name="json-twin")
    _, key = api_key_create(project=other)
    assert client.post("/v1/traces", rec.json(), content_type=JS,
                       headers={"X-API-Key": key}).status_code == 200
    as_pb = stored(api)
    api.key = key
    as_json = stored(api)
    drop = {"received_at", "is_sampled", "prompt_hash"}
    assert {k: {f: v for f, v in s.items() if f not in drop} for k, s in as_pb.items()} == \
        {k: {f: v for f, v in s.items() if f not in drop} for k, s in as_json.items()}


def test_gzip_bodies_and_resending_does_not_duplicate(api, otlp, prices):
    rec = Recorder()
    chat_trace(rec)
    body = gzip.compress(rec.protobuf())
    assert otlp(body, headers={"Content-Encoding": "gzip"}).status_code == 200
    assert otlp(body, headers={"Content-Encoding": "gzip"}).status_code == 200  # an exporter's retry
    assert Span.objects.count() == 2
    assert otlp(gzip.compress(rec.json()), JS, headers={"Content-Encoding": "gzip"}).status_code == 200
    assert Span.objects.count() == 2


def test_older_genai_names_and_openllmetry_flattened_prompts(api, otlp, prices):
    rec = Recorder()
    attrs = {
        "gen_ai.system": "Anthropic",
        "gen_ai.request.model": "claude-sonnet-4-20250514",
        "gen_ai.usage.prompt_tokens": 1000,
        "gen_ai.usage.completion_tokens": 100,
        "llm.request.type": "chat",
        "gen_ai.prompt.0.role": "system",
        "gen_ai.prompt.0.content": "Be brief.",
        "gen_ai.prompt.1.role": "user",
        "gen_ai.prompt.1.content": "Hello?",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": "Hi.",
        "gen_ai.completion.0.finish_reason": "end_turn",
    }
    with rec.span("anthropic.chat", attributes=attrs) as span:
        pass
    assert otlp(rec.protobuf()).status_code == 200
    got = stored(api)[hex_id(span)]
    assert got["model"] == "claude-sonnet-4-20250514" and got["provider"] == "anthropic"
    assert (got["prompt_tokens"], got["completion_tokens"], got["cached_tokens"]) == (1000, 100, None)
    assert got["cost_usd_micro"] == 1000 * 3 + 100 * 15
    assert got["prompt"] == "system: Be brief.\nuser: Hello?" and got["response"] == "Hi."
    assert got["finish_reason"] == "stop"
    assert not any(k.startswith(("gen_ai.prompt", "gen_ai.completion")) for k in got["metadata"])


def test_cache_tokens_reported_outside_input_tokens_are_added_once(api, otlp, prices):
    # An instrumentation passing Anthropic's usage through: input_tokens excludes cache reads and writes.
    rec = Recorder()
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
             "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": 100,
             "gen_ai.usage.cache_read.input_tokens": 2000, "gen_ai.usage.cache_creation.input_tokens": 50,
             "gen_ai.usage.output_tokens": 10, "gen_ai.usage.reasoning.output_tokens": 4}
    with rec.span("chat claude-sonnet-4", attributes=attrs) as span:
        pass
    otlp(rec.protobuf())
    got = stored(api)[hex_id(span)]
    assert (got["prompt_tokens"], got["cached_tokens"], got["reasoning_tokens"]) == (2150, 2000, 4)
    # 150 uncached (incl. 50 cache writes) x 3.00 + 2000 cached x 0.30 + 10 x 15.00
    assert got["cost_usd_micro"] == 150 * 3 + 600 + 150
    assert got["metadata"]["gen_ai.usage.cache_creation.input_tokens"] == 50


def test_openinference_llm_span_under_a_chain(api, otlp, prices):
    rec = Recorder(service="rag-app")
    with rec.span("RetrievalQA", end_ms=3000, attributes={
            "openinference.span.kind": "CHAIN", "input.value": "What is our refund policy?",
            "output.value": "30 days, no questions asked.", "session.id": "s-1", "metadata": '{"tenant": "t1"}',
    }) as chain:
        with rec.span("ChatOpenAI", start_ms=500, end_ms=2500, attributes={
                "openinference.span.kind": "LLM",
                "llm.model_name": "gpt-4o-mini-2024-07-18",
                "llm.provider": "openai",
                "llm.system": "openai",
                "llm.token_count.prompt": 1200,
                "llm.token_count.completion": 80,
                "llm.token_count.total": 1280,
                "llm.token_count.prompt_details.cache_read": 1024,
                "llm.input_messages.0.message.role": "system",
                "llm.input_messages.0.message.content": "Answer from the context.",
                "llm.input_messages.1.message.role": "user",
                "llm.input_messages.1.message.contents.0.message_content.type": "text",
                "llm.input_messages.1.message.contents.0.message_content.text": "What is our refund policy?",
                "llm.output_messages.0.message.role": "assistant",
                "llm.output_messages.0.message.content": "30 days, no questions asked.",
                "llm.invocation_parameters": '{"temperature": 0}',
                "input.value": '{"messages": [{"role": "user", "content": "What is our refund policy?"}]}',
                "input.mime_type": "application/json",
                "user.id": "u-9",
                "session.id": "s-1",
        }) as llm:
            pass
        with rec.span("retrieve", start_ms=100, end_ms=400, attributes={
                "openinference.span.kind": "RETRIEVER", "input.value": "refund policy",
                "retrieval.documents.0.document.content": "Refunds within 30 days.",
                "retrieval.documents.0.document.id": "doc-1",
        }) as retriever:
            pass
    assert otlp(rec.protobuf()).status_code == 200
    spans = stored(api)
    got = spans[hex_id(llm)]
    assert got["model"] == "gpt-4o-mini-2024-07-18" and got["provider"] == "openai"
    assert (got["prompt_tokens"], got["completion_tokens"], got["cached_tokens"]) == (1200, 80, 1024)
    assert got["user_id"] == "u-9" and got["session_id"] == "s-1"
    assert got["prompt"] == "system: Answer from the context.\nuser: What is our refund policy?"
    assert got["response"] == "30 days, no questions asked."
    assert got["parent_span_id"] == hex_id(chain)
    assert got["metadata"]["llm.invocation_parameters"] == {"temperature": 0}
    assert not any(k.startswith(("llm.input_messages", "llm.output_messages", "input.")) for k in got["metadata"])

    parent = spans[hex_id(chain)]
    assert parent["model"] is None and parent["prompt_tokens"] is None
    assert parent["prompt"] == "What is our refund policy?" and parent["response"] == "30 days, no questions asked."
    assert parent["metadata"]["otel.span_type"] == "chain" and parent["session_id"] == "s-1"
    assert parent["metadata"]["metadata"] == {"tenant": "t1"}
    docs = spans[hex_id(retriever)]
    assert docs["metadata"]["otel.span_type"] == "retriever" and docs["prompt"] == "refund policy"
    assert not any(k.startswith("retrieval.documents") for k in docs["metadata"])  # content never in metadata


def test_error_span_with_exception_event(api, otlp, prices):
    rec = Recorder()
    with rec.span("chat gpt-4o", attributes=genai_chat_attributes(**{
            "gen_ai.usage.output_tokens": None, "gen_ai.response.finish_reasons": None,
            "gen_ai.output.messages": None, "error.type": "RateLimitError"}),
            error=RuntimeError("429 Too Many Requests")) as span:
        pass
    otlp(rec.protobuf())
    got = stored(api)[hex_id(span)]
    assert got["status"] == "error" and got["finish_reason"] == "error"
    assert got["error_type"] == "RateLimitError"
    assert got["error_message"].startswith("429 Too Many Requests") and "Traceback" not in got["error_message"][:30]


def test_pii_in_genai_messages_is_redacted_before_storage(api, otlp, prices):
    rec = Recorder()
    messages = orjson.dumps([{"role": "user", "parts": [
        {"type": "text", "content": "Mail the invoice to jane.doe@example.com please"}]}]).decode()
    with rec.span("chat gpt-4o", attributes=genai_chat_attributes(**{"gen_ai.input.messages": messages,
                                                                     "gen_ai.system_instructions": None})) as span:
        pass
    otlp(rec.protobuf())
    got = stored(api)[hex_id(span)]
    assert got["pii_detected"] is True
    assert "jane.doe@example.com" not in orjson.dumps(Span.objects.values().get(span_id=got["span_id"]),
                                                      default=str).decode()


def test_streaming_ttft_from_a_first_chunk_event_and_own_llm_attributes(api, otlp, prices):
    rec = Recorder()
    with rec.span("stream", end_ms=3000, attributes={"llm.model": "gpt-4o", "llm.provider": "openai",
                                                     "llm.prompt_tokens": 10, "llm.completion_tokens": 20,
                                                     "llm.pii_detected": False, "llm.endpoint": "/assist",
                                                     "llm.retry_count": 2},
                  events=[("gen_ai.first_chunk", 250, {})]) as span:
        pass
    otlp(rec.protobuf())
    got = stored(api)[hex_id(span)]
    assert got["latency_ms_ttft"] == pytest.approx(250)
    assert (got["model"], got["prompt_tokens"], got["completion_tokens"]) == ("gpt-4o", 10, 20)
    assert got["endpoint"] == "/assist" and got["retry_count"] == 2
    assert got["cost_usd_micro"] == 10 * 2.5 + 20 * 10


def test_agent_and_tool_spans_are_not_priced(api, otlp, prices):
    rec = Recorder()
    with rec.span("invoke_agent billing", end_ms=5000, attributes={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "billing",
            "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5000}) as agent:
        with rec.span("execute_tool get_invoice", start_ms=10, end_ms=40, attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_invoice",
                "gen_ai.tool.call.arguments": '{"id": 7}', "gen_ai.tool.call.result": '{"total": 42}'}) as tool:
            pass
    otlp(rec.protobuf())
    spans = stored(api)
    for span in (agent, tool):
        got = spans[hex_id(span)]
        assert got["model"] is None and got["cost_usd_micro"] is None and got["prompt_tokens"] is None
    assert spans[hex_id(agent)]["metadata"]["gen_ai.request.model"] == "gpt-4o"  # kept, not priced twice
    assert spans[hex_id(tool)]["prompt"] == '{"id": 7}' and spans[hex_id(tool)]["response"] == '{"total": 42}'
    assert spans[hex_id(tool)]["metadata"]["otel.span_type"] == "tool" and spans[hex_id(tool)]["kind"] == "TOOL"


def test_rejected_spans_give_partial_success(api, otlp, prices):
    rec = Recorder()
    rec.t0 = int((datetime.now(timezone.utc) - timedelta(days=400)).timestamp() * 1e9)
    with rec.span("old chat", attributes=genai_chat_attributes()):
        pass
    rec.t0 = int(datetime.now(timezone.utc).timestamp() * 1e9) - 10 ** 10
    with rec.span("fresh chat", attributes=genai_chat_attributes(**{"gen_ai.usage.output_tokens": -3})):
        pass
    with rec.span("fine", attributes=genai_chat_attributes()) as fine:
        pass
    request = ExportTraceServiceRequest()
    request.ParseFromString(rec.protobuf())
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.name, bad.trace_id, bad.span_id = "no ids", b"\x00" * 16, b"\x01" * 8
    response = otlp(request.SerializeToString())
    assert response.status_code == 200
    partial = decoded(response).partial_success
    assert partial.rejected_spans == 3
    assert "timestamp_too_old" in partial.error_message and "out_of_range" in partial.error_message
    assert "trace_id" in partial.error_message
    assert list(stored(api)) == [hex_id(fine)]

    # JSON encoding of the same answer
    response = otlp(rec.json(), JS)
    assert response.json()["partialSuccess"]["rejectedSpans"] == "2"


@pytest.mark.parametrize("body, ctype, status", [
    (b"\xff\xff\xff garbage", PB, 400),
    (b"{not json", JS, 400),
    (b"[1, 2]", JS, 400),
    (b'{"resourceSpans": {"a": 1}}', JS, 400),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 5}]}]}]}', JS, 400),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": ["x"]}]}]}', JS, 400),
    (b"hello", "text/plain", 415),
    (b"hello", "application/grpc", 415),
])
def test_bad_bodies_are_4xx_in_the_request_encoding(otlp, body, ctype, status):
    response = otlp(body, ctype)
    assert response.status_code == status, response.content
    if ctype == JS:
        assert response.json()["message"] and response.json()["code"] == 3
    elif ctype == PB:
        assert response["Content-Type"] == PB and b"protobuf" in response.content


def test_empty_requests_are_fine(otlp):
    assert otlp(b"").status_code == 200
    assert otlp(b"{}", JS).status_code == 200
    assert otlp(b'{"resourceSpans": []}', JS).status_code == 200


def test_body_limits_and_encoding(otlp, settings):
    assert otlp(b"x", PB, headers={"Content-Encoding": "br"}).status_code == 415
    assert otlp(b"not gzip", PB, headers={"Content-Encoding": "gzip"}).status_code == 400
    bomb = gzip.compress(b"\x00" * (settings.INGEST_MAX_BYTES + 10))
    assert otlp(bomb, PB, headers={"Content-Encoding": "gzip"}).status_code == 413


def test_auth_is_required(client, db):
    assert client.post("/v1/traces", b"", content_type=PB).status_code == 401
    assert client.post("/v1/traces", b"", content_type=PB,
                       headers={"Authorization": "Bearer llmo_nope_x"}).status_code == 401


def test_batches_larger_than_the_span_limit_are_stored_in_slices(api, otlp, settings, prices):
    settings.INGEST_MAX_SPANS = 7
    rec = Recorder()
    for i in range(20):
        with rec.span(f"chat {i}", attributes=genai_chat_attributes()):
            pass
    assert otlp(rec.protobuf()).status_code == 200
    assert Span.objects.count() == 20
