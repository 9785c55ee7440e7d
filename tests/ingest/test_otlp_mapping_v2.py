"""ingest.otlp.map_request on its own (no database): kind, name, TTFT of streamed calls only, model and
response id of every model call, finish reasons and error types of every convention, content into
prompt/response (never metadata)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from ingest.otlp import (ERROR_TYPE_QUALIFIED_KEY, JSON, LIBRARY_TOKEN_ESTIMATE_KEY, PROTOBUF,
                         SPAN_NAME_RECOVERED_KEY, TTFT_UNSTREAMED_KEY, decode_request, map_request)
from tests.interop.otel_helpers import Recorder, genai_chat_attributes


def mapped(rec: Recorder, encoding: str = PROTOBUF) -> dict[str, dict]:
    body = rec.protobuf() if encoding == PROTOBUF else rec.json()
    result = map_request(decode_request(body, encoding))
    assert not result.rejected
    return {span["name"]: span for span in result.spans}


def one(attributes: dict, *, name: str = "span", events: list | None = None, error: Exception | None = None,
        encoding: str = PROTOBUF) -> dict:
    rec = Recorder()
    with rec.span(name, end_ms=2000, attributes=attributes, events=events, error=error):
        pass
    return mapped(rec, encoding)[name]


# --- 1. name and kind ---------------------------------------------------------------------
@pytest.mark.parametrize("attributes, kind", [
    ({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o"}, "LLM"),
    ({"openinference.span.kind": "chain"}, "CHAIN"),
    ({"openinference.span.kind": "PROMPT"}, "CHAIN"),
    ({"openinference.span.kind": "TOOL"}, "TOOL"),
    ({"openinference.span.kind": "AGENT", "llm.model_name": "gpt-4o"}, "AGENT"),
    ({"openinference.span.kind": "RETRIEVER"}, "RETRIEVER"),
    ({"openinference.span.kind": "EMBEDDING"}, "EMBEDDING"),
    ({"openinference.span.kind": "RERANKER"}, "RERANKER"),
    ({"openinference.span.kind": "GUARDRAIL"}, "GUARDRAIL"),
    ({"openinference.span.kind": "EVALUATOR"}, "EVALUATOR"),
    ({"openinference.span.kind": "UNKNOWN"}, "UNKNOWN"),
    ({"gen_ai.operation.name": "chat"}, "LLM"),
    ({"gen_ai.operation.name": "generate_content"}, "LLM"),
    ({"gen_ai.operation.name": "text_completion"}, "LLM"),
    ({"gen_ai.operation.name": "embeddings"}, "EMBEDDING"),
    ({"gen_ai.operation.name": "execute_tool"}, "TOOL"),
    ({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o"}, "AGENT"),
    ({"gen_ai.operation.name": "create_agent"}, "AGENT"),
    ({"gen_ai.operation.name": "invoke_workflow"}, "CHAIN"),
    ({"gen_ai.operation.name": "retrieval"}, "RETRIEVER"),
    ({"gen_ai.operation.name": "rerank"}, "RERANKER"),
    ({"traceloop.span.kind": "workflow"}, "CHAIN"),
    ({"traceloop.span.kind": "task"}, "CHAIN"),
    ({"traceloop.span.kind": "agent"}, "AGENT"),
    ({"traceloop.span.kind": "tool"}, "TOOL"),
    ({"llm.request.type": "chat", "gen_ai.request.model": "gpt-4o"}, "LLM"),
    ({"llm.request.type": "embedding"}, "EMBEDDING"),
    ({"gen_ai.request.model": "gpt-4o"}, "LLM"),
    ({"llm.invocation_parameters": '{"model": "gpt-4o"}'}, "LLM"),
    ({"http.route": "/chat"}, "UNKNOWN"),
    # OpenInference first, then GenAI, then OpenLLMetry
    ({"openinference.span.kind": "TOOL", "gen_ai.operation.name": "chat"}, "TOOL"),
    ({"gen_ai.operation.name": "execute_tool", "traceloop.span.kind": "task"}, "TOOL"),
    ({"openinference.span.kind": "DECISION", "gen_ai.operation.name": "chat"}, "LLM"),
])
def test_kind_from_each_convention_in_order(attributes, kind):
    span = one(attributes)
    assert span["kind"] == kind
    assert span["metadata"]["otel.span_type"] == {"LLM": "llm", "UNKNOWN": "other"}.get(kind, kind.lower())


def test_name_is_the_span_name_and_endpoint_stays():
    span = one({"gen_ai.operation.name": "chat"}, name="chat gpt-4o")
    assert span["name"] == span["endpoint"] == "chat gpt-4o"
    rec = Recorder()
    with rec.span("x" * 900):
        pass
    (long,) = map_request(decode_request(rec.protobuf(), PROTOBUF)).spans
    assert len(long["name"]) == 500


def test_only_model_calls_get_model_fields():
    agent = one({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o",
                 "gen_ai.usage.input_tokens": 5000, "gen_ai.response.id": "resp-1"})
    assert agent.get("model") is None and agent.get("prompt_tokens") is None and "response_id" not in agent
    assert agent["metadata"]["gen_ai.request.model"] == "gpt-4o"
    assert agent["metadata"]["gen_ai.response.id"] == "resp-1"


# --- 2. TTFT only for streamed calls ------------------------------------------------------
def test_openinference_first_token_event_is_ttft():
    span = one({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o",
                "llm.invocation_parameters": '{"stream": true}'}, events=[("First Token Stream Event", 321, {})])
    assert span["latency_ms_ttft"] == pytest.approx(321)


def test_openllmetry_earliest_chunk_event_is_ttft():
    events = [("gen_ai.content.completion.chunk", at, {}) for at in (150, 90, 400)]
    span = one({"gen_ai.request.model": "gpt-4o", "llm.request.type": "chat", "gen_ai.is_streaming": True},
               events=events)
    assert span["latency_ms_ttft"] == pytest.approx(90)
    assert "otel.events" not in span["metadata"]  # one event per chunk: not kept
    old = one({"gen_ai.request.model": "gpt-4o", "llm.is_streaming": True},
              events=[("llm.content.completion.chunk", 77, {})])
    assert old["latency_ms_ttft"] == pytest.approx(77)


@pytest.mark.parametrize("flag", [{"gen_ai.request.stream": False}, {"gen_ai.request.is_stream": False},
                                  {"llm.is_streaming": False}, {"gen_ai.is_streaming": False},
                                  {"llm.invocation_parameters": '{"stream": false}'}])
def test_ttft_of_a_call_known_not_streamed_is_kept_aside(flag):
    # openlit reports gen_ai.server.time_to_first_token on every call: without streaming it is the whole call.
    span = one({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.server.time_to_first_token": 1.9, **flag})
    assert span.get("latency_ms_ttft") is None
    assert span["metadata"][TTFT_UNSTREAMED_KEY] == pytest.approx(1900)


@pytest.mark.parametrize("flag", [{"gen_ai.request.stream": True}, {"gen_ai.request.is_stream": True}, {}])
def test_ttft_attribute_of_a_streamed_or_unsaid_call(flag):
    span = one({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.time_to_first_chunk": 0.25, **flag})
    assert span["latency_ms_ttft"] == pytest.approx(250)


def test_no_ttft_on_spans_that_are_not_model_calls():
    span = one({"openinference.span.kind": "CHAIN"}, events=[("First Token Stream Event", 10, {})])
    assert span.get("latency_ms_ttft") is None


# --- 3. model everywhere, provider of embeddings ---------------------------------------------
def test_openinference_embedding_span_has_model_provider_and_its_texts_as_prompt():
    span = one({"openinference.span.kind": "EMBEDDING", "embedding.model_name": "text-embedding-3-small",
                "llm.provider": "openai", "llm.system": "openai",
                "embedding.invocation_parameters": '{"model": "text-embedding-3-small", "encoding_format": "base64"}',
                "embedding.embeddings.0.embedding.text": "first text",
                "embedding.embeddings.1.embedding.text": "second text",
                "embedding.embeddings.0.embedding.vector": [0.1, 0.2]})
    assert (span["kind"], span["model"], span["provider"]) == ("EMBEDDING", "text-embedding-3-small", "openai")
    assert span["prompt"] == "first text\nsecond text"
    assert not any(k.startswith("embedding.embeddings") for k in span["metadata"])
    assert span["metadata"]["embedding.invocation_parameters"]["encoding_format"] == "base64"


def test_model_from_invocation_parameters_and_provider_from_the_scope():
    rec = Recorder()
    rec.tracer = rec.provider.get_tracer("openinference.instrumentation.openai", "0.1.66")
    with rec.span("ChatCompletion", attributes={"openinference.span.kind": "LLM",
                                                "llm.invocation_parameters": '{"model": "gpt-4o-mini"}'}):
        pass
    span = mapped(rec)["ChatCompletion"]
    assert (span["model"], span["provider"]) == ("gpt-4o-mini", "openai")


def test_error_span_keeps_the_requested_model():
    span = one({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                "error.type": "APIConnectionError"}, error=RuntimeError("connection reset"))
    assert span["model"] == "gpt-4o" and span["status"] == "error" and span["finish_reason"] == "error"


def test_reranker_span_is_a_model_call_with_documents_out():
    span = one({"openinference.span.kind": "RERANKER", "reranker.model_name": "rerank-english-v3.0",
                "reranker.query": "refund policy",
                "reranker.input_documents.0.document.content": "A",
                "reranker.output_documents.0.document.content": "Refunds within 30 days."})
    assert span["model"] == "rerank-english-v3.0"
    assert span["prompt"] == "refund policy" and span["response"] == "Refunds within 30 days."
    assert not any(k.startswith("reranker.") for k in span["metadata"])


# --- 4. response id ---------------------------------------------------------------------------
def test_response_id_from_genai_and_from_openinference_output_json():
    assert one(genai_chat_attributes())["response_id"] == "chatcmpl-123"
    assert "gen_ai.response.id" not in one(genai_chat_attributes())["metadata"]
    oi = one({"openinference.span.kind": "LLM", "llm.model_name": "claude-sonnet-4", "output.mime_type":
              "application/json", "output.value": '{"id": "msg_01X", "type": "message", "content": []}'})
    assert oi["response_id"] == "msg_01X"
    text = one({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o", "output.value": "plain answer"})
    assert "response_id" not in text


# --- 5. finish reasons ------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, reason", [
    ("gen_ai.response.finish_reasons", ["tool_calls"], "tool_calls"),
    ("gen_ai.response.finish_reason", "length", "length"),
    ("llm.finish_reason", "end_turn", "stop"),
    ("llm.response.finish_reason", "stop", "stop"),
    ("llm.response.stop_reason", "max_tokens", "length"),
    ("gen_ai.response.stop_reason", "tool_use", "tool_calls"),
    ("anthropic.message.stop_reason", "stop_sequence", "stop"),
])
def test_finish_reason_from_every_convention(key, value, reason):
    span = one({"gen_ai.request.model": "claude-sonnet-4", key: value})
    assert span["finish_reason"] == reason
    assert key not in span["metadata"]


def test_unknown_finish_reason_stays_in_metadata():
    span = one({"gen_ai.request.model": "gpt-4o", "gen_ai.response.finish_reason": "pause_turn"})
    assert span.get("finish_reason") is None and span["metadata"]["gen_ai.response.finish_reason"] == "pause_turn"


# --- 6. error types ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, short, qualified", [
    ("<class 'openai.BadRequestError'>", "BadRequestError", "<class 'openai.BadRequestError'>"),
    ("openai.BadRequestError", "BadRequestError", "openai.BadRequestError"),
    ("anthropic._exceptions.RateLimitError", "RateLimitError", "anthropic._exceptions.RateLimitError"),
    ("RateLimitError", "RateLimitError", None),
    ("400", "400", None),
    ("_OTHER", "_OTHER", None),
])
def test_error_type_is_the_class_name(raw, short, qualified):
    span = one({"gen_ai.request.model": "gpt-4o", "error.type": raw}, error=ValueError("bad"))
    assert span["error_type"] == short
    assert span["metadata"].get(ERROR_TYPE_QUALIFIED_KEY) == qualified


def test_error_type_from_the_exception_event_of_the_sdk():
    class BadRequestError(Exception):
        pass

    BadRequestError.__module__, BadRequestError.__qualname__ = "openai", "BadRequestError"
    span = one({"gen_ai.request.model": "gpt-4o"}, error=BadRequestError("Error code: 400"))
    assert span["error_type"] == "BadRequestError"
    assert span["metadata"][ERROR_TYPE_QUALIFIED_KEY] == "openai.BadRequestError"
    assert span["error_message"].startswith("Error code: 400")


# --- 7. system message once -----------------------------------------------------------------
def test_system_message_sent_twice_is_stored_once():
    system = "You are a billing assistant."
    span = one(genai_chat_attributes(**{
        "gen_ai.system_instructions": orjson.dumps([{"type": "text", "content": system}]).decode(),
        "gen_ai.input.messages": orjson.dumps([
            {"role": "system", "parts": [{"type": "text", "content": system}]},
            {"role": "user", "parts": [{"type": "text", "content": "Hi"}]}]).decode()}))
    assert span["prompt"] == f"system: {system}\nuser: Hi"
    other = one(genai_chat_attributes(**{
        "gen_ai.system_instructions": system,
        "gen_ai.input.messages": orjson.dumps([{"role": "system", "content": "Another rule."},
                                               {"role": "user", "content": "Hi"}]).decode()}))
    assert other["prompt"] == f"system: {system}\nsystem: Another rule.\nuser: Hi"
    two = one(genai_chat_attributes(**{  # openlit: one instruction part per system message
        "gen_ai.system_instructions": orjson.dumps([{"type": "text", "content": "Rule 1."},
                                                    {"type": "text", "content": "Rule 2."}]).decode(),
        "gen_ai.input.messages": orjson.dumps([{"role": "system", "content": "Rule 1."},
                                               {"role": "system", "content": "Rule 2."},
                                               {"role": "user", "content": "Hi"}]).decode()}))
    assert two["prompt"] == "system: Rule 1.\nRule 2.\nuser: Hi"


# --- 8. OpenLLMetry entity input/output and other content attributes ---------------------------
def test_traceloop_entity_input_output_become_prompt_and_response():
    rec = Recorder()
    with rec.span("answer.workflow", end_ms=3000, attributes={
            "traceloop.span.kind": "workflow", "traceloop.entity.name": "answer",
            "traceloop.entity.input": orjson.dumps({"args": ["mail jane@example.com"], "kwargs": {}}).decode(),
            "traceloop.entity.output": orjson.dumps("Sent.").decode()}):
        with rec.span("RunnableSequence.task", attributes={
                "traceloop.span.kind": "task",
                "traceloop.entity.input": orjson.dumps({"inputs": {"question": "why?"}, "tags": [],
                                                        "metadata": {}, "kwargs": {"name": "x"}}).decode(),
                "traceloop.entity.output": orjson.dumps({"outputs": "because", "kwargs": {}}).decode()}):
            pass
    spans = mapped(rec)
    workflow, task = spans["answer.workflow"], spans["RunnableSequence.task"]
    assert workflow["kind"] == "CHAIN" and workflow["prompt"] == "mail jane@example.com"
    assert workflow["response"] == "Sent."
    assert task["prompt"] == '{"question":"why?"}' and task["response"] == "because"
    for span in spans.values():
        assert not any(k.startswith("traceloop.entity.input") or k.startswith("traceloop.entity.output")
                       for k in span["metadata"])
        assert "jane@example.com" not in orjson.dumps(span["metadata"]).decode()
    assert workflow["metadata"]["traceloop.entity.name"] == "answer"


def test_openllmetry_kwargs_entity_input():
    span = one({"traceloop.span.kind": "tool", "traceloop.entity.name": "get_invoice",
                "traceloop.entity.input": '{"args": [], "kwargs": {"invoice_id": 7}}',
                "traceloop.entity.output": '{"total": 42}'})
    assert span["kind"] == "TOOL" and span["metadata"]["tool.name"] == "get_invoice"
    assert span["prompt"] == '{"invoice_id":7}' and span["response"] == '{"total":42}'


# --- 9. tools and retrievers --------------------------------------------------------------------
def test_genai_tool_span():
    span = one({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_invoice",
                "gen_ai.tool.call.id": "call_1", "gen_ai.tool.call.arguments": '{"id": 7}',
                "gen_ai.tool.call.result": '{"total": 42}'})
    assert span["kind"] == "TOOL" and span["metadata"]["tool.name"] == "get_invoice"
    assert span["prompt"] == '{"id": 7}' and span["response"] == '{"total": 42}'
    assert "gen_ai.tool.call.arguments" not in span["metadata"]


def test_openinference_tool_span():
    span = one({"openinference.span.kind": "TOOL", "tool.name": "search", "tool.description": "web search",
                "tool.parameters": '{"type": "object"}', "input.value": '{"q": "weather"}',
                "output.value": "sunny"})
    assert span["metadata"]["tool.name"] == "search"
    assert span["prompt"] == '{"q": "weather"}' and span["response"] == "sunny"
    assert "tool.parameters" not in span["metadata"] and "input.value" not in span["metadata"]


def test_retriever_documents_are_the_response_bounded():
    attrs = {"openinference.span.kind": "RETRIEVER", "input.value": "refund policy"}
    for i in range(30):
        attrs[f"retrieval.documents.{i}.document.id"] = f"doc-{i}"
        attrs[f"retrieval.documents.{i}.document.content"] = f"doc{i} " + "x" * 3000
    span = one(attrs)
    assert span["prompt"] == "refund policy"
    docs = span["response"].split("\n\n")
    assert len(docs) == 20 and docs[0].startswith("doc0 ") and docs[10].startswith("doc10 ")
    assert all(len(d) <= 2000 for d in docs)
    assert not any(k.startswith("retrieval.documents") for k in span["metadata"])


def test_genai_retrieval_documents():
    span = one({"gen_ai.operation.name": "retrieval", "gen_ai.retrieval.query.text": "refunds",
                "gen_ai.retrieval.documents": '[{"id": "d1", "score": 0.9, "content": "30 days."}]'})
    assert span["kind"] == "RETRIEVER" and span["prompt"] == "refunds" and span["response"] == "30 days."


@pytest.mark.parametrize("encoding", [PROTOBUF, JSON])
def test_both_encodings_map_alike(encoding):
    span = one(genai_chat_attributes(), name="chat gpt-4o", encoding=encoding)
    assert (span["kind"], span["name"], span["response_id"]) == ("LLM", "chat gpt-4o", "chatcmpl-123")


# --- captured exports of the real libraries (tests/interop/fixtures, trimmed) -----------------
FIXTURES = Path(__file__).resolve().parent.parent / "interop" / "fixtures"


def fixture_spans(name: str) -> list[dict]:
    result = map_request(decode_request((FIXTURES / name).read_bytes(), JSON))
    assert not result.rejected
    return result.spans


def test_openinference_openai_0_1_66_capture():
    # openai SDK against the fake provider: a plain call, a streamed one, a 400 and an embedding.
    plain, streamed, failed, embedding = fixture_spans("openinference_openai_0.1.66.json")
    assert (plain["kind"], plain["name"], plain["model"], plain["provider"]) == \
        ("LLM", "ChatCompletion", "gpt-4o-mini-2024-07-18", "openai")
    assert (plain["prompt_tokens"], plain["completion_tokens"], plain["cached_tokens"], plain["reasoning_tokens"]) \
        == (21, 12, 5, 3)
    assert plain["finish_reason"] == "stop" and plain["response_id"].startswith("chatcmpl-")
    assert plain.get("latency_ms_ttft") is None  # not streamed
    assert plain["prompt"] == "system: You are a terse assistant.\nuser: Say hello (plain call)"

    assert 0 < streamed["latency_ms_ttft"] < streamed["latency_ms_total"]  # "First Token Stream Event"
    assert streamed["response_id"].startswith("chatcmpl-") and streamed["response_id"] != plain["response_id"]
    assert streamed["prompt_tokens"] is None  # the stream had no usage: the server estimates

    assert (failed["status"], failed["finish_reason"], failed["error_type"]) == ("error", "error", "BadRequestError")
    assert failed["metadata"][ERROR_TYPE_QUALIFIED_KEY] == "openai.BadRequestError"
    assert failed["model"] == "gpt-4o-mini-error-400"  # from llm.invocation_parameters: no response
    assert failed["error_message"].startswith("BadRequestError: Error code: 400")

    assert (embedding["kind"], embedding["model"], embedding["provider"]) == \
        ("EMBEDDING", "text-embedding-3-small", "openai")
    assert embedding["prompt"] == "Embed this sentence" and embedding.get("response") is None
    assert embedding["prompt_tokens"] == 3 and "response_id" not in embedding
    for span in (plain, streamed, failed, embedding):
        assert not any(k.startswith(("input.", "output.", "llm.input_messages", "embedding.embeddings"))
                       for k in span["metadata"])


def test_openinference_anthropic_3_1_0_over_the_anthropic_sdks_own_spans():
    # anthropic 2.x traces itself (scope com.anthropic.sdk.python, GenAI attributes) under OpenInference's span:
    # every call arrives twice, and the two spans share the response id the server links them by.
    spans = fixture_spans("openinference_anthropic_3.1.0_sdk_2.16.json")
    sdk = [s for s in spans if s["metadata"]["otel.scope"] == "com.anthropic.sdk.python"]
    oi = [s for s in spans if s["metadata"]["otel.scope"] == "openinference.instrumentation.anthropic"]
    assert len(sdk) == len(oi) == 3
    assert all(s["kind"] == "LLM" and s["provider"] == "anthropic" for s in spans)
    for mine, theirs in zip(sdk[:2], oi[:2]):
        assert mine["response_id"] == theirs["response_id"] and mine["response_id"].startswith("msg_")
        assert mine["parent_span_id"] == theirs["span_id"]
        assert mine["finish_reason"] == theirs["finish_reason"] == "stop"  # anthropic.message.stop_reason, end_turn
        assert (mine["prompt_tokens"], mine["completion_tokens"], mine["cached_tokens"]) == \
            (theirs["prompt_tokens"], theirs["completion_tokens"], theirs["cached_tokens"]) == (21, 12, 5)
        assert mine["metadata"]["gen_ai.usage.cache_creation.input_tokens"] == 0
    plain, streamed = sdk[:2]
    assert plain.get("latency_ms_ttft") is None
    assert 0 < streamed["latency_ms_ttft"] <= streamed["latency_ms_total"]  # gen_ai.response.time_to_first_chunk
    assert oi[1]["prompt"] == "system: You are a terse assistant.\nuser: Say hello (streamed call)"
    # OpenInference's span has no first-chunk event: the SDK's span inside it (same response id) says it
    assert streamed["latency_ms_ttft"] < oi[1]["latency_ms_ttft"] < oi[1]["latency_ms_total"]
    assert oi[1]["metadata"]["llm_observe.ttft_from_span"] == streamed["span_id"]
    assert oi[0].get("latency_ms_ttft") is None  # not streamed
    failed_sdk, failed_oi = sdk[2], oi[2]
    # the SDK's span says error.type invalid_request_error (the API's words): stored as the class it raised
    assert failed_sdk["error_type"] == "BadRequestError" and "response_id" not in failed_sdk
    assert failed_sdk["metadata"][ERROR_TYPE_QUALIFIED_KEY] == "invalid_request_error"
    assert failed_oi["error_type"] == "BadRequestError"
    assert failed_oi["metadata"][ERROR_TYPE_QUALIFIED_KEY] == "anthropic.BadRequestError"
    assert failed_sdk["model"] == failed_oi["model"] == "claude-haiku-4-5-error-400"


# --- the interop matrix's findings (captures of .data-captures, trimmed into tests/interop/fixtures) -----------
def scoped(scope: str, name: str, attributes: dict, **kwargs) -> dict:
    rec = Recorder()
    rec.tracer = rec.provider.get_tracer(scope, "1.0")
    with rec.span(name, end_ms=2000, attributes=attributes, **kwargs):
        pass
    return mapped(rec)[name]


@pytest.mark.parametrize("raw, status, sdk_class", [
    ("invalid_request_error", 400, "BadRequestError"),
    ("authentication_error", 401, "AuthenticationError"),
    ("billing_error", 402, "PaymentRequiredError"),
    ("permission_error", 403, "PermissionDeniedError"),
    ("not_found_error", 404, "NotFoundError"),
    ("request_too_large", 413, "ContentTooLargeError"),  # 2.x's name; RequestTooLargeError is its alias
    ("rate_limit_error", 429, "RateLimitError"),
    ("api_error", 500, "InternalServerError"),
    ("overloaded_error", 529, "OverloadedError"),
    ("timeout_error", 504, "GatewayTimeoutError"),
    ("api_error", None, "InternalServerError"),  # no status on the span: the API's type alone
    ("overloaded_error", None, "OverloadedError"),
    ("request_too_large", None, "ContentTooLargeError"),
    ("503", 503, "ServiceUnavailableError"),  # no error envelope: the SDK says the status
    ("client_timeout_error", None, "APITimeoutError"),
    ("connection_error", None, "APIConnectionError"),
])
def test_anthropic_sdk_api_error_types_become_its_exception_classes(raw, status, sdk_class):
    attributes = {"gen_ai.provider.name": "anthropic", "gen_ai.operation.name": "chat",
                  "gen_ai.request.model": "claude-haiku-4-5", "error.type": raw,
                  **({"http.response.status_code": status} if status else {})}
    span = scoped("com.anthropic.sdk.python", "anthropic.messages.create", attributes, error=ValueError("x"))
    assert span["error_type"] == sdk_class
    assert span["metadata"][ERROR_TYPE_QUALIFIED_KEY] == raw


def test_api_error_words_of_other_providers_and_class_names_stay():
    # OpenAI's envelope says invalid_request_error too, but nothing here says the anthropic SDK raised it.
    openai = one({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                  "error.type": "invalid_request_error"}, error=ValueError("x"))
    assert openai["error_type"] == "invalid_request_error"
    anthropic_class = one({"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-haiku-4-5",
                           "error.type": "anthropic.RateLimitError", "http.response.status_code": 400},
                          error=ValueError("x"))
    assert anthropic_class["error_type"] == "RateLimitError"


def test_openlit_1_45_anthropic_capture():
    spans = fixture_spans("openlit_1.45.0_anthropic_0.125.json")
    chats = {(s["metadata"]["otel.scope"], s["metadata"].get("gen_ai.request.stream"), s.get("status", "success")): s
             for s in spans if s["name"] != "POST"}
    plain = chats["openlit.instrumentation.anthropic", False, "success"]
    streamed = chats["openlit.instrumentation.anthropic", True, "success"]
    openai_stream = chats["openlit.instrumentation.openai", True, "success"]
    failed = next(s for s in spans if s["name"] == "chat claude-haiku-4-5-error-400")
    # Anthropic's input_tokens (16) leave the 5 cache reads out; openlit passes them on as they are.
    assert (plain["prompt_tokens"], plain["completion_tokens"], plain["cached_tokens"]) == (21, 12, 5)
    assert plain["metadata"]["llm_observe.input_tokens_adjusted"] is True
    # openlit's stream span says 0 cache reads (a gap of the library): nothing to add.
    assert (streamed["prompt_tokens"], streamed["cached_tokens"]) == (16, 0)
    assert "llm_observe.input_tokens_adjusted" not in streamed["metadata"]
    # The failed call's span has no attributes: its name and the scope say what it was.
    assert (failed["kind"], failed["model"], failed["provider"]) == ("LLM", "claude-haiku-4-5-error-400", "anthropic")
    assert (failed["status"], failed["finish_reason"], failed["error_type"]) == ("error", "error", "BadRequestError")
    assert failed.get("prompt_tokens") is None and failed["metadata"][SPAN_NAME_RECOVERED_KEY] is True
    assert "gen_ai.operation.name" not in failed["metadata"]
    # An openai stream without usage: openlit counted 33 + 24 tokens itself. Left for the server to count.
    assert openai_stream["prompt_tokens"] is None and openai_stream["completion_tokens"] is None
    assert openai_stream.get("token_count_method") is None
    assert openai_stream["metadata"][LIBRARY_TOKEN_ESTIMATE_KEY] == {"input_tokens": 33, "output_tokens": 24}
    assert 0 < openai_stream["latency_ms_ttft"] < openai_stream["latency_ms_total"]
    http = [s for s in spans if s["name"] == "POST"]
    assert http and all(s["kind"] == "UNKNOWN" and s.get("model") is None for s in http)


def test_span_name_recovery_needs_a_provider_scope_and_a_bare_span():
    # the same name in an application's own scope, or a span that says its kind: as before
    assert one({}, name="chat claude-haiku-4-5")["kind"] == "UNKNOWN"
    tool = scoped("openlit.instrumentation.anthropic", "chat helper", {"gen_ai.operation.name": "execute_tool"})
    assert tool["kind"] == "TOOL" and tool.get("model") is None
    other = scoped("openlit.instrumentation.anthropic", "messages.stream", {})
    assert other["kind"] == "UNKNOWN"


def test_cache_reads_added_only_to_openlits_anthropic_input():
    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-haiku-4-5", "gen_ai.usage.input_tokens": 21,
            "gen_ai.usage.output_tokens": 12, "gen_ai.usage.cache_read.input_tokens": 5}
    # the anthropic SDK's own span and the GenAI convention: 21 already counts the 5
    assert scoped("com.anthropic.sdk.python", "anthropic.messages.create", base)["prompt_tokens"] == 21
    assert scoped("opentelemetry.instrumentation.anthropic", "anthropic.chat", base)["prompt_tokens"] == 21
    openlit = scoped("openlit.instrumentation.anthropic", "chat claude-haiku-4-5",
                     {**base, "gen_ai.usage.input_tokens": 16, "gen_ai.usage.cache_creation.input_tokens": 2})
    assert openlit["prompt_tokens"] == 23 and openlit["cached_tokens"] == 5
    # a cache larger than the input still shows an uncached input, whoever sent it
    bigger = scoped("tests.other", "chat", {**base, "gen_ai.usage.input_tokens": 3})
    assert bigger["prompt_tokens"] == 8


def test_openlit_openai_stream_with_usage_keeps_the_providers_tokens():
    span = scoped("openlit.instrumentation.openai", "chat gpt-4o-mini", {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.request.stream": True,
        "gen_ai.usage.input_tokens": 21, "gen_ai.usage.output_tokens": 12,
        "gen_ai.usage.cache_read.input_tokens": 0})
    assert (span["prompt_tokens"], span["token_count_method"]) == (21, "provider")
    assert LIBRARY_TOKEN_ESTIMATE_KEY not in span["metadata"]


def test_pydantic_ai_2_68_capture():
    spans = fixture_spans("pydantic_ai_2.68.0.json")
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    plain, streamed, failed = sorted(by_trace.values(), key=len, reverse=True)[0], *[
        t for t in by_trace.values() if len(t) == 2]
    if any(s.get("status") == "error" for s in streamed):
        streamed, failed = failed, streamed
    agent = next(s for s in plain if s["kind"] == "AGENT")
    chat1, chat2 = [s for s in plain if s["kind"] == "LLM"]
    # the agent run: its conversation in, its final result out (pydantic_ai.all_messages, final_result)
    assert agent["prompt"].startswith("system: You answer weather questions.\nuser: What is the weather in Paris?")
    assert agent["prompt"].count("You answer weather questions.") == 1
    assert agent["response"] == "Hello from the fake provider, nice to meet you."
    assert agent.get("prompt_tokens") is None and agent.get("model") is None  # the aggregated usage: not again
    assert chat1["finish_reason"] == "tool_calls" and chat2["finish_reason"] == "stop"  # GenAI's "tool_call"
    for chat in (chat1, chat2):
        assert (chat["prompt_tokens"], chat["completion_tokens"], chat["cached_tokens"], chat["reasoning_tokens"]) \
            == (21, 12, 5, 3)  # gen_ai.usage.details.reasoning_tokens
        assert chat.get("latency_ms_ttft") is None
        assert "gen_ai.usage.details.reasoning_tokens" not in chat["metadata"]
        assert "gen_ai.usage.details.cache_read_tokens" not in chat["metadata"]
    stream_chat = next(s for s in streamed if s["kind"] == "LLM")
    stream_agent = next(s for s in streamed if s["kind"] == "AGENT")
    # gen_ai.client.operation.time_to_first_chunk
    assert 0 < stream_chat["latency_ms_ttft"] < stream_chat["latency_ms_total"]
    assert stream_agent["prompt"] == "system: You answer weather questions.\nuser: Say hello (streamed call)"
    failed_agent = next(s for s in failed if s["kind"] == "AGENT")
    assert failed_agent["prompt"].endswith("user: Say hello (failing call)") and not failed_agent.get("response")
    for span in spans:  # the conversation and the instructions only in prompt / response
        text = orjson.dumps(span["metadata"]).decode()
        assert "Paris?" not in text and "Say hello" not in text and "Hello from the fake" not in text
        assert "You answer weather questions." not in text
    assert chat1["metadata"]["model_request_parameters"].startswith('{"function_tools":[{"name":"get_weather"')


def test_pydantic_ai_agent_run_without_final_result_answers_with_its_last_message():
    span = one({"gen_ai.operation.name": "invoke_agent", "pydantic_ai.all_messages": orjson.dumps([
        {"role": "user", "parts": [{"type": "text", "content": "Hi"}]},
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello"}], "finish_reason": "stop"}]).decode()})
    assert (span["kind"], span["prompt"], span["response"]) == ("AGENT", "Hi", "Hello")
    assert "pydantic_ai.all_messages" not in span["metadata"]


def test_ttft_of_an_inner_span_of_the_same_call_only():
    rec = Recorder()
    with rec.span("outer", start_ms=0, end_ms=900, attributes={"openinference.span.kind": "LLM",
                                                                "llm.model_name": "m", "llm.response.id": "r1"}):
        with rec.span("inner", start_ms=100, end_ms=800, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.response.id": "r1",
                "gen_ai.response.time_to_first_chunk": 0.2}):
            pass
    with rec.span("other-outer", start_ms=0, end_ms=900, attributes={"openinference.span.kind": "LLM",
                                                                      "llm.model_name": "m", "llm.response.id": "r2"}):
        with rec.span("other-inner", start_ms=100, end_ms=800, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.response.id": "r3",
                "gen_ai.response.time_to_first_chunk": 0.2}):
            pass
    spans = mapped(rec)
    assert spans["inner"]["latency_ms_ttft"] == pytest.approx(200.0)
    assert spans["outer"]["latency_ms_ttft"] == pytest.approx(300.0)
    assert spans["other-outer"].get("latency_ms_ttft") is None  # another response: another call


def test_a_langchain_chat_models_answer_names_the_response_id_and_the_snapshot():
    # OpenInference's LangChain span of a stream: llm.model_name is the alias asked for; the LLMResult
    # in output.value carries what the provider answered.
    import json as _json

    from ingest.otlp import _langchain_answer_metadata, _response_id

    result = {"generations": [[{"text": "Hi", "message": {"kwargs": {"content": "Hi", "response_metadata": {
        "model_name": "gpt-4o-mini-2024-07-18", "id": "chatcmpl-328295d69db5", "finish_reason": "stop"}}}}]],
        "llm_output": None}
    attrs = {"output.value": _json.dumps(result), "output.mime_type": "application/json"}
    assert _response_id(dict(attrs)) == "chatcmpl-328295d69db5"
    span = one({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini", "llm.provider": "openai",
                **attrs}, name="ChatOpenAI")
    assert (span["model"], span["response_id"]) == ("gpt-4o-mini-2024-07-18", "chatcmpl-328295d69db5")
    # Another model than the one asked for is not taken for a snapshot of it.
    other = {"generations": [[{"message": {"kwargs": {"response_metadata": {"model_name": "gpt-4.1"}}}}]]}
    span = one({"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini", "output.value":
                _json.dumps(other), "output.mime_type": "application/json"}, name="ChatOpenAI")
    assert span["model"] == "gpt-4o-mini"
    assert _langchain_answer_metadata({"generations": []}) == {}
    assert _langchain_answer_metadata("not json") == {}
