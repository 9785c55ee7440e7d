"""OTLP traces in, span dicts of the SpanIn shape out.

Decodes an OTLP/HTTP ExportTraceServiceRequest (protobuf or the OTLP JSON
encoding) and maps each span onto our fields, reading the OpenTelemetry GenAI
semantic conventions (current and older names, the OpenLLMetry flattened
prompt/completion attributes) and the OpenInference conventions. LLM calls
become LLM spans (model, provider, tokens, prompt, response); every other span
of the trace (HTTP handler, agent, chain, tool, retriever) is kept with model
null so the trace tree stays whole. Attributes that carry prompt or response
text are moved into `prompt` / `response` (what the console shows as one); the
ingest service scans those and every string value left in `metadata` for PII
before storage.

The result goes through `spans_ingest` like any /v1/spans batch.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ingest.schemas import FINISH_REASON_ALIASES, FINISH_REASONS, SpanIn

PROTOBUF = "protobuf"
JSON = "json"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_STATUS_ERROR = 2
_KINDS = {0: None, 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

# Span kinds (the lead's ingest/kinds.py holds the server's copy): model calls are the priced ones.
SPAN_KINDS = ("LLM", "CHAIN", "TOOL", "AGENT", "RETRIEVER", "EMBEDDING", "RERANKER", "GUARDRAIL", "EVALUATOR",
              "UNKNOWN")
MODEL_CALL_KINDS = frozenset({"LLM", "EMBEDDING", "RERANKER"})
# openinference.span.kind: ours plus PROMPT (a template rendering step, part of a chain).
_OI_KINDS = {**{k: k for k in SPAN_KINDS}, "PROMPT": "CHAIN"}
# gen_ai.operation.name (the GenAI conventions, plus the values openlit and OpenLLMetry send).
_GENAI_OPERATION_KINDS = {
    "chat": "LLM", "generate_content": "LLM", "text_completion": "LLM", "completion": "LLM",
    "model_request": "LLM",
    "embeddings": "EMBEDDING", "embedding": "EMBEDDING",
    "execute_tool": "TOOL",
    "invoke_agent": "AGENT", "create_agent": "AGENT", "agent": "AGENT",
    "invoke_workflow": "CHAIN", "execute_task": "CHAIN", "task": "CHAIN", "workflow": "CHAIN",
    "retrieval": "RETRIEVER", "retrieve": "RETRIEVER",
    "rerank": "RERANKER",
}
# OpenLLMetry: traceloop.span.kind on decorated functions, llm.request.type on its model call spans.
_TRACELOOP_KINDS = {"workflow": "CHAIN", "task": "CHAIN", "agent": "AGENT", "tool": "TOOL"}
_LLM_REQUEST_TYPES = {"chat": "LLM", "completion": "LLM", "embedding": "EMBEDDING", "rerank": "RERANKER"}
# metadata["otel.span_type"], the label the OTLP metrics count by (ingest/metrics.py _BOUNDED_SPAN_TYPES).
_SPAN_TYPES = {"LLM": "llm", "UNKNOWN": "other"}

# Provider names of the GenAI conventions that the price table knows under another spelling.
_PROVIDERS = {
    "azure.ai.openai": "azure_openai",
    "gcp.gen_ai": "google",
    "gcp.gemini": "google",
    "aws": "aws.bedrock",  # OpenInference's llm.provider for Bedrock
    "mistralai": "mistral",
}

_INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt",
                 "llm.usage.prompt_tokens")
_OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion",
                  "llm.usage.completion_tokens")
# gen_ai.usage.details.*: pydantic-ai's usage details (its cache_read_tokens repeats cache_read.input_tokens).
_CACHE_READ = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
               "llm.token_count.prompt_details.cache_read", "gen_ai.usage.details.cache_read_tokens")
# cache_write.input_tokens: the anthropic SDK's own instrumentation (2.x).
_CACHE_WRITE = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_write.input_tokens",
                "gen_ai.usage.cache_creation_input_tokens",
                "llm.token_count.prompt_details.cache_write", "gen_ai.usage.details.cache_write_tokens")
_REASONING = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens",
              "llm.token_count.completion_details.reasoning", "gen_ai.usage.details.reasoning_tokens")
_MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name", "llm.response.model_name",
               "llm.request.model_name", "llm.response.model", "llm.request.model", "embedding.model_name",
               "reranker.model_name")
# OpenInference's JSON request parameters: the model's last resort, and whether the call streamed.
_INVOCATION_KEYS = ("llm.invocation_parameters", "embedding.invocation_parameters")
_RESPONSE_ID_KEYS = ("gen_ai.response.id", "llm.response.id", "anthropic.message.id", "openai.response.id")
_FINISH_REASON_KEYS = ("gen_ai.response.finish_reasons", "gen_ai.response.finish_reason", "llm.finish_reason",
                       "llm.response.finish_reason", "gen_ai.response.stop_reason", "llm.response.stop_reason",
                       "anthropic.message.stop_reason")
# Whether the call streamed: OTel GenAI / openlit, OpenLLMetry (new and old name).
_STREAM_KEYS = ("gen_ai.request.stream", "gen_ai.request.is_stream", "gen_ai.is_streaming", "llm.is_streaming")
_TOOL_NAME_KEYS = ("gen_ai.tool.name", "tool.name", "tool_call.function.name")
# The instrumentation's scope names the provider when a span does not (its last dotted part).
_SCOPE_PROVIDERS = {"openai": "openai", "openai_v2": "openai", "anthropic": "anthropic", "mistralai": "mistral",
                    "groq": "groq", "cohere": "cohere", "bedrock": "aws.bedrock"}
_PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
_USER_KEYS = ("user.id", "enduser.id", "gen_ai.user.id")
_SESSION_KEYS = ("session.id", "gen_ai.conversation.id", "conversation.id")
# In seconds. openlit's gen_ai.server.time_to_first_token is also set on calls that did not stream;
# pydantic-ai's gen_ai.client.operation.time_to_first_chunk only on streamed requests.
_TTFT_SECONDS = ("gen_ai.response.time_to_first_chunk", "gen_ai.response.time_to_first_token",
                 "gen_ai.server.time_to_first_token", "gen_ai.client.operation.time_to_first_chunk")
# Events at the first chunk: OpenInference's openai instrumentation ("First Token Stream Event"); OpenLLMetry
# adds one chunk event per chunk (the earliest counts); the rest are spellings seen in hand-made spans.
_FIRST_CHUNK_EVENTS = frozenset({"First Token Stream Event", "gen_ai.content.completion.chunk",
                                 "llm.content.completion.chunk", "gen_ai.first_chunk", "gen_ai.response.first_chunk",
                                 "first_token", "gen_ai.first_token", "llm.first_token", "first_chunk"})
# A TTFT reported for a call known not to have streamed (openlit sets its attribute on every call): not a
# time to first token, so never latency_ms_ttft; kept here, in milliseconds.
TTFT_UNSTREAMED_KEY = "llm_observe.ttft_unstreamed_ms"
# error.type as the library sent it, when error_type keeps only the class name ("openai.BadRequestError").
ERROR_TYPE_QUALIFIED_KEY = "error.type.qualified"
# The anthropic SDK's own spans (2.x, scope com.anthropic.sdk.python) say error.type in the API's words (the
# error envelope's type, else the status code); every other library names the exception class. The SDK raises
# by status code (anthropic._error_classes.ERROR_CLASSES), so the status, when the span has it, says which.
_ANTHROPIC_STATUS_ERRORS = {
    400: "BadRequestError", 401: "AuthenticationError", 402: "PaymentRequiredError", 403: "PermissionDeniedError",
    404: "NotFoundError", 408: "RequestTimeoutError", 409: "ConflictError", 412: "PreconditionFailedError",
    413: "ContentTooLargeError", 422: "UnprocessableEntityError", 429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError", 499: "ClientClosedRequestError", 501: "HTTPNotImplementedError",
    503: "ServiceUnavailableError", 504: "GatewayTimeoutError", 529: "OverloadedError",
}
# The API's error types (anthropic.types.shared.ErrorType, and request_too_large) by the status they come with;
# 2.x names the 413 class ContentTooLargeError (RequestTooLargeError is its deprecated alias).
_ANTHROPIC_API_ERRORS = {
    "invalid_request_error": "BadRequestError", "authentication_error": "AuthenticationError",
    "billing_error": "PaymentRequiredError", "permission_error": "PermissionDeniedError",
    "not_found_error": "NotFoundError", "request_too_large": "ContentTooLargeError",
    "rate_limit_error": "RateLimitError", "timeout_error": "GatewayTimeoutError", "api_error": "InternalServerError",
    "overloaded_error": "OverloadedError", "conflict_error": "ConflictError",
    # the SDK's own words for failures without a response
    "client_timeout_error": "APITimeoutError", "connection_error": "APIConnectionError",
}
# Finish reasons of the GenAI conventions that schemas.FINISH_REASON_ALIASES does not spell (pydantic-ai).
_FINISH_REASON_EXTRA_ALIASES = {"tool_call": "tool_calls"}
# A GenAI span's name is "{gen_ai.operation.name} {gen_ai.request.model}". openlit (1.45) sends a failed
# anthropic call's span with no attributes at all: its name and its scope are all that say what it was.
_SPAN_NAME_OPERATION = re.compile(r"^(chat|text_completion|generate_content|embeddings) (\S{1,200})$")
SPAN_NAME_RECOVERED_KEY = "llm_observe.recovered_from_span_name"
# openlit's anthropic instrumentation sends Anthropic's own input_tokens, which leave the cache reads and writes
# out (its utils.py says so); the conventions count them in. Its openai instrumentation counts a stream without
# usage itself (general_tokens) and sends that as gen_ai.usage.* as if the provider had said it.
_OPENLIT_ANTHROPIC_SCOPE = "openlit.instrumentation.anthropic"
_OPENLIT_OPENAI_SCOPE = "openlit.instrumentation.openai"
LIBRARY_TOKEN_ESTIMATE_KEY = "llm_observe.library_token_estimate"
_RETRIEVED_DOCUMENTS_LIMIT = 20
_RETRIEVED_DOCUMENT_CHARS = 2000

# Attributes that hold prompt/response text or vectors: read, then never copied into metadata.
_CONTENT_KEYS = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.prompt",
    "gen_ai.completion", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.retrieval.query.text",
    "gen_ai.retrieval.documents", "input.value", "output.value", "llm.prompts", "llm.prompt", "llm.response",
    "llm.text", "input.mime_type", "output.mime_type", "tool.parameters", "llm.prompt_template.variables",
    "traceloop.entity.input", "traceloop.entity.output", "tool_call.function.arguments", "reranker.query",
    "llm.function_call", "gen_ai.tool.input", "gen_ai.tool.output", "gen_ai.tool.args", "input.documents",
    "output.documents", "traceloop.prompt.template_variables", "gen_ai.content.prompt", "gen_ai.content.completion",
    # pydantic-ai's agent run span: the run's whole conversation and its output.
    "pydantic_ai.all_messages", "final_result",
})
_CONTENT_PREFIXES = ("llm.input_messages.", "llm.output_messages.", "gen_ai.prompt.", "gen_ai.completion.",
                     "retrieval.documents.", "reranker.input_documents.", "reranker.output_documents.",
                     "embedding.embeddings.", "llm.prompts.", "llm.choices.")
# OpenInference puts these as JSON strings; kept as objects they can be filtered on.
_JSON_OBJECT_KEYS = frozenset({"metadata", *_INVOCATION_KEYS})
_FLAT_PREFIXES = ("llm.input_messages.", "llm.output_messages.", "gen_ai.prompt.", "gen_ai.completion.")
_FLAT_MESSAGE = re.compile(r"^(llm\.(input|output)_messages|gen_ai\.(prompt|completion))\.(\d+)\.(.+)$")

# Our own OTel form (`llm.<field>`, seed-api.md): copied onto the field of the same name.
_OWN_FIELDS = {
    name: name for name in SpanIn.model_fields
    if name not in ("schema_version", "metadata", "text", "span_id", "trace_id", "parent_span_id", "timestamp_utc")
}
_LLM_ONLY_FIELDS = frozenset({"model", "provider", "prompt_tokens", "completion_tokens", "cached_tokens",
                              "reasoning_tokens", "latency_ms_ttft", "finish_reason", "token_count_method",
                              "response_id"})
_OWN_FIELDS_ANY_SPAN = {k: v for k, v in _OWN_FIELDS.items() if k not in _LLM_ONLY_FIELDS}
_INT_FIELDS = frozenset({"prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "retry_count"})
_FLOAT_FIELDS = frozenset({"latency_ms_ttft", "latency_ms_total"})
_BOOL_FIELDS = frozenset({"is_sampled", "pii_detected", "injection_attempt"})
# name and response_id: the limits of the fields the lead adds to SpanIn, until they are there.
_MAX_LEN = {"name": 500, "response_id": 200, **{
    name: getattr(meta, "max_length", None) for name, f in SpanIn.model_fields.items()
    for meta in f.metadata if getattr(meta, "max_length", None)}}

_META_STRING_LIMIT = 2000
_META_LIST_LIMIT = 50
_META_KEYS_LIMIT = 128
_EVENTS_LIMIT = 20
_TEXT_LIMIT = 1_000_000


class OtlpDecodeError(Exception):
    """The body is not an ExportTraceServiceRequest in the declared encoding."""


@dataclass(frozen=True)
class MappedRejection:
    span_id: str | None
    reason: str


@dataclass
class Mapped:
    spans: list[dict]
    rejected: list[MappedRejection]


# --- decoding -------------------------------------------------------------------
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_CLASS_REPR = re.compile(r"^<class '([^']+)'>$")
# module.Class, also of a class defined in a function (its qualname has a `<locals>` part).
_DOTTED_NAME = re.compile(r"^[A-Za-z_][\w<>]*(\.[\w<>]+)*\.[A-Za-z_]\w*$")
_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _ids_to_base64(node: dict) -> None:
    # OTLP/JSON spells ids as hex; protobuf's JSON mapping expects base64 for bytes.
    for key in _ID_KEYS:
        value = node.get(key)
        if isinstance(value, str) and value and len(value) % 2 == 0 and _HEX.match(value):
            node[key] = base64.b64encode(bytes.fromhex(value)).decode()


def _each(node: Any, *keys: str) -> list:
    for key in keys:
        value = node.get(key) if isinstance(node, dict) else None
        if value is not None:
            if not isinstance(value, list):
                raise OtlpDecodeError(f"{key} must be an array")
            return value
    return []


def _items(payload: dict, levels: tuple[tuple[str, ...], ...]) -> list:
    nodes = [payload]
    for keys in levels:
        nodes = [child for node in nodes for child in _each(node, *keys)]
    return nodes


def decode_export(data: bytes, encoding: str, message: Message, *, levels: tuple[tuple[str, ...], ...],
                  fix: Callable[[dict], None] = _ids_to_base64) -> Message:
    """An OTLP export request (protobuf, or OTLP JSON: hex ids in the items `levels` leads to) into `message`."""
    what = type(message).__name__
    if encoding == PROTOBUF:
        try:
            message.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise OtlpDecodeError(f"body is not a protobuf {what}: {exc}") from None
        return message
    if not data.strip():
        return message
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise OtlpDecodeError(f"body must be a JSON object ({what})")
    for item in _items(payload, levels):
        if not isinstance(item, dict):
            raise OtlpDecodeError(f"each {levels[-1][0].removesuffix('s')} must be an object")
        fix(item)
    try:
        json_format.ParseDict(payload, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise OtlpDecodeError(f"body is not an OTLP JSON {what}: {exc}") from None
    return message


def _span_ids_to_base64(span: dict) -> None:
    _ids_to_base64(span)
    for link in _each(span, "links"):
        if isinstance(link, dict):
            _ids_to_base64(link)


def decode_request(data: bytes, encoding: str) -> ExportTraceServiceRequest:
    return decode_export(data, encoding, ExportTraceServiceRequest(), fix=_span_ids_to_base64,
                         levels=(("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"), ("spans",)))


def encode_response(*, rejected: int, message: str, encoding: str) -> bytes:
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    if encoding == PROTOBUF:
        return response.SerializeToString()
    return json_format.MessageToJson(response, indent=None).encode()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_status(*, code: int, message: str, encoding: str) -> bytes:
    """A google.rpc.Status, the body OTLP/HTTP expects on 4xx/5xx (hand-encoded: two fields)."""
    if encoding == PROTOBUF:
        text = message.encode("utf-8")
        return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
    return orjson.dumps({"code": code, "message": message})


# --- values -----------------------------------------------------------------------
def _value(value) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind)


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


def _bounded(value: Any, depth: int = 0) -> Any:
    """A metadata value of bounded size."""
    if isinstance(value, str):
        return value if len(value) <= _META_STRING_LIMIT else value[:_META_STRING_LIMIT] + "…"
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)  # jsonb has no NaN / Infinity
    if isinstance(value, list):
        return [_bounded(v, depth + 1) for v in value[:_META_LIST_LIMIT]] if depth < 4 else str(value)[:200]
    if isinstance(value, dict):
        return ({k: _bounded(v, depth + 1) for k, v in list(value.items())[:_META_LIST_LIMIT]}
                if depth < 4 else str(value)[:200])
    return value


def _first(attrs: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value) if value == value and abs(value) < 1e18 else None
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except (ValueError, OverflowError):
            return None
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value and abs(value) < 1e18 else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if number == number and abs(number) < 1e18 else None
    return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int):
        return bool(value)
    return None


def _clip(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    limit = _MAX_LEN.get(name)
    return value[:limit] if limit and len(value) > limit else value


def _finish_reason(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v), None)
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    lowered = FINISH_REASON_ALIASES.get(lowered, _FINISH_REASON_EXTRA_ALIASES.get(lowered, lowered))
    return lowered if lowered in FINISH_REASONS else None


# --- messages -----------------------------------------------------------------------
def _json_or_value(value: Any) -> Any:
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped[:1] in ("[", "{"):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError:
                return value
    return value


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind in ("tool_call", "function_call"):
        args = part.get("arguments")
        args = args if isinstance(args, str) else orjson.dumps(args).decode() if args is not None else ""
        return f"[tool_call {part.get('name') or ''}({args})]"
    if kind in ("tool_call_response", "tool_result"):
        result = part.get("response", part.get("result", part.get("content")))
        result = result if isinstance(result, str) else orjson.dumps(result).decode() if result is not None else ""
        return f"[tool_result {result}]"
    for key in ("content", "text"):
        text = part.get(key)
        if isinstance(text, str):
            return text
    return None


def _message_text(message: Any) -> tuple[str | None, str | None]:
    """(role, text) of one message in the GenAI (parts), OpenAI (content) or plain form."""
    if isinstance(message, str):
        return None, message
    if not isinstance(message, dict):
        return None, None
    role = message.get("role") if isinstance(message.get("role"), str) else None
    pieces: list[str] = []
    for key in ("parts", "content", "contents"):
        body = message.get(key)
        if isinstance(body, str):
            pieces.append(body)
        elif isinstance(body, list):
            pieces += [t for t in (_part_text(p) for p in body) if t]
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            function = call.get("function") if isinstance(call.get("function"), dict) else call
            pieces.append(_part_text({"type": "tool_call", "name": function.get("name"),
                                      "arguments": function.get("arguments")}) or "")
    text = "\n".join(p for p in pieces if p)
    return role, text or None


def _render(messages: list, system: Any = None) -> str | None:
    rendered: list[tuple[str | None, str]] = []
    system_texts: set[str] = set()
    if system is not None:
        system = _json_or_value(system)
        parts = [t for t in (_part_text(p) for p in (system if isinstance(system, list) else [system])) if t]
        if parts:
            rendered.append(("system", "\n".join(parts)))
            system_texts = {t.strip() for t in (*parts, rendered[0][1])}
    for message in messages:
        role, text = _message_text(message)
        # openlit sends each system message twice: in gen_ai.system_instructions and among the messages.
        if text and not (role in ("system", "developer") and text.strip() in system_texts):
            rendered.append((role, text))
    if not rendered:
        return None
    if len(rendered) == 1:
        return rendered[0][1]
    return "\n".join(f"{role}: {text}" if role else text for role, text in rendered)


def _flat_messages(attrs: dict) -> dict[str, list[dict]]:
    """OpenInference `llm.input_messages.0.message.content` and OpenLLMetry `gen_ai.prompt.0.content`."""
    found: dict[str, dict[int, dict]] = {}
    for key, value in attrs.items():
        if not key.startswith(_FLAT_PREFIXES):
            continue
        match = _FLAT_MESSAGE.match(key)
        if not match:
            continue
        direction = "input" if (match.group(2) == "input" or match.group(3) == "prompt") else "output"
        index, rest = int(match.group(4)), match.group(5)
        message = found.setdefault(direction, {}).setdefault(index, {"contents": {}, "tool_calls": {}})
        if rest.startswith("message."):
            rest = rest[len("message."):]
        if rest == "role":
            message["role"] = value
        elif rest == "content":
            message["content"] = value
        elif rest == "finish_reason":
            message["finish_reason"] = value
        elif rest.startswith("contents."):
            sub = rest.split(".", 2)
            if len(sub) == 3 and sub[2] in ("message_content.text", "text"):
                message["contents"][int(sub[1]) if sub[1].isdigit() else 0] = value
        elif rest.startswith("tool_calls."):
            sub = rest.split(".", 2)
            if len(sub) == 3 and sub[1].isdigit():
                call = message["tool_calls"].setdefault(int(sub[1]), {})
                leaf = sub[2].rsplit(".", 1)[-1]
                if leaf in ("name", "arguments"):
                    call[leaf] = value
    out: dict[str, list[dict]] = {}
    for direction, by_index in found.items():
        messages = []
        for index in sorted(by_index):
            raw = by_index[index]
            message = {"role": raw.get("role"), "finish_reason": raw.get("finish_reason")}
            pieces = [raw["content"]] if isinstance(raw.get("content"), str) else []
            pieces += [raw["contents"][i] for i in sorted(raw["contents"]) if isinstance(raw["contents"][i], str)]
            message["content"] = "\n".join(pieces)
            message["tool_calls"] = [{"name": c.get("name"), "arguments": c.get("arguments")}
                                     for _, c in sorted(raw["tool_calls"].items())]
            messages.append(message)
        out[direction] = messages
    return out


def _as_messages(value: Any) -> list | None:
    value = _json_or_value(value)
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        # OpenAI-style request bodies as input.value: {"messages": [...]}
        if isinstance(value.get("messages"), list):
            return value["messages"]
        return [value]
    if isinstance(value, str):
        return [value]
    return None


# --- one span -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Resource:
    service_name: str | None
    environment: str | None
    metadata: dict | None


def _resource(resource) -> _Resource:
    attrs = _attributes(resource.attributes)
    service = attrs.pop("service.name", None)
    env = attrs.pop("deployment.environment.name", None) or attrs.pop("deployment.environment", None)
    kept = {k: _bounded(v) for k, v in attrs.items()
            if not k.startswith("telemetry.sdk.") and k not in ("process.command_args", "process.command_line")}
    return _Resource(
        service_name=_clip("service_name", str(service)) if service is not None else None,
        environment=_clip("environment", str(env)) if env is not None else None,
        metadata=kept or None,
    )


def _hex_id(raw: bytes) -> str | None:
    return raw.hex() if raw and any(raw) else None


def _ns_to_datetime(ns: int) -> datetime | None:
    if ns <= 0:
        return None
    try:
        return _EPOCH + timedelta(microseconds=ns // 1000)
    except OverflowError:
        return None


def _invocation(attrs: dict) -> dict:
    """OpenInference's request parameters (a JSON string) as a dict, {} when absent or not an object."""
    for key in _INVOCATION_KEYS:
        value = _json_or_value(attrs.get(key))
        if isinstance(value, dict):
            return value
    return {}


def _has_model(attrs: dict, invocation: dict) -> bool:
    return _first(attrs, _MODEL_KEYS) is not None or attrs.get("llm.model") is not None \
        or isinstance(invocation.get("model"), str)


def _span_kind(attrs: dict, invocation: dict) -> str:
    """The span's kind, from the first convention that names one (OpenInference, GenAI, OpenLLMetry)."""
    own = attrs.get("llm.kind")  # our SDK's OTel form
    if isinstance(own, str) and own.strip().upper() in SPAN_KINDS:
        return own.strip().upper()
    sources = (("openinference.span.kind", _OI_KINDS, str.upper),
               ("gen_ai.operation.name", _GENAI_OPERATION_KINDS, str.lower),
               ("traceloop.span.kind", _TRACELOOP_KINDS, str.lower),
               ("llm.request.type", _LLM_REQUEST_TYPES, str.lower))
    for key, table, fold in sources:
        value = attrs.get(key)
        if isinstance(value, str) and fold(value.strip()) in table:
            return table[fold(value.strip())]
    return "LLM" if _has_model(attrs, invocation) else "UNKNOWN"


def _streamed(attrs: dict, invocation: dict, first_chunk_ms: float | None) -> bool | None:
    """True or False when the span says whether the call streamed, None when it does not say."""
    if first_chunk_ms is not None:
        return True
    for key in _STREAM_KEYS:
        flag = _bool(attrs.get(key))
        if flag is not None:
            return flag
    return _bool(invocation.get("stream"))


def _error_type(raw: Any) -> tuple[str, str | None]:
    """(class name, the original when it was longer): "<class 'openai.BadRequestError'>" -> BadRequestError."""
    text = str(raw).strip()
    match = _CLASS_REPR.match(text)
    name = match.group(1) if match else text
    if _DOTTED_NAME.match(name):
        name = name.rsplit(".", 1)[1]
    return name, (text if name != text else None)


def _unwrap_entity(value: Any) -> Any:
    """The payload of OpenLLMetry's traceloop.entity.input/output: its decorators wrap a call as
    {"args": [...], "kwargs": {...}}, its LangChain callbacks as {"inputs": ...} / {"outputs": ...}."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)  # any JSON value: a function returning a string gives '"text"'
        except orjson.JSONDecodeError:
            return value
    if not isinstance(value, dict):
        return value
    for key in ("inputs", "outputs"):
        if key in value:
            return value[key]
    if set(value) <= {"args", "kwargs"}:
        args, kwargs = value.get("args") or [], value.get("kwargs") or {}
        if isinstance(args, list) and len(args) == 1 and not kwargs:
            return args[0]
        if not args and kwargs:
            return kwargs
    return value


def _content_text(value: Any) -> str | None:
    """Text of a content attribute: strings as they are, messages rendered, anything else as JSON."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        return _render(value["messages"])
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return _render(value)
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _documents_text(attrs: dict, prefix: str) -> str | None:
    """Retrieved (or reranked) documents' content, `<prefix>.N.document.content`, bounded."""
    found: dict[int, str] = {}
    for key, value in attrs.items():
        if key.startswith(prefix) and key.endswith(".document.content") and isinstance(value, str):
            index = key[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                found[int(index)] = value
    if not found and prefix == "retrieval.documents.":
        docs = _json_or_value(attrs.get("gen_ai.retrieval.documents"))
        for i, doc in enumerate(docs if isinstance(docs, list) else ()):
            text = doc.get("content") if isinstance(doc, dict) else doc
            if isinstance(text, str):
                found[i] = text
    texts = [found[i][:_RETRIEVED_DOCUMENT_CHARS] for i in sorted(found)[:_RETRIEVED_DOCUMENTS_LIMIT]]
    return "\n\n".join(texts) if texts else None


def _embedding_texts(attrs: dict) -> str | None:
    texts = [v for k, v in sorted(attrs.items()) if k.startswith("embedding.embeddings.")
             and k.endswith(".embedding.text") and isinstance(v, str)]
    return "\n".join(texts) if texts else None


def _response_id(attrs: dict) -> str | None:
    found = _first(attrs, _RESPONSE_ID_KEYS)
    for key in _RESPONSE_ID_KEYS:
        attrs.pop(key, None)
    if found is not None:
        return str(found)
    # OpenInference sends no id attribute; its output.value is the provider's JSON answer, which has one.
    body = _json_or_value(attrs.get("output.value")) if attrs.get("output.mime_type") == "application/json" else None
    if isinstance(body, dict) and isinstance(body.get("id"), str) and ("object" in body or "type" in body):
        return body["id"]
    answer = _langchain_answer_metadata(body)
    return answer["id"] if isinstance(answer.get("id"), str) else None


def _answered_model(attrs: dict) -> str | None:
    if attrs.get("output.mime_type") != "application/json":
        return None
    name = _langchain_answer_metadata(_json_or_value(attrs.get("output.value"))).get("model_name")
    return name if isinstance(name, str) and name else None


def _langchain_answer_metadata(body: Any) -> dict:
    """The provider's answer metadata inside a LangChain LLMResult (OpenInference's output.value of a
    LangChain chat model): generations[0][0].message.kwargs.response_metadata (id, model_name)."""
    try:
        metadata = body["generations"][0][0]["message"]["kwargs"]["response_metadata"]
    except (KeyError, IndexError, TypeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _recover_from_span_name(attrs: dict, name: str, scope_name: str | None, invocation: dict) -> bool:
    """A model call's span that says nothing but its name ("chat claude-haiku-4-5") in a provider's
    instrumentation scope: its operation and model from the name. True when recovered."""
    if not scope_name or _SCOPE_PROVIDERS.get(scope_name.rsplit(".", 1)[-1].lower()) is None:
        return False
    if _span_kind(attrs, invocation) != "UNKNOWN":
        return False
    match = _SPAN_NAME_OPERATION.match(name)
    if not match:
        return False
    attrs["gen_ai.operation.name"], attrs["gen_ai.request.model"] = match.group(1), match.group(2)
    return True


def map_span(span, resource: _Resource, scope_name: str | None) -> dict:
    attrs = _attributes(span.attributes)
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    invocation = _invocation(attrs)
    recovered = _recover_from_span_name(attrs, span.name, scope_name, invocation)
    kind = _span_kind(attrs, invocation)
    if recovered:
        attrs.pop("gen_ai.operation.name")  # not sent: the span's name said it
    is_model_call = kind in MODEL_CALL_KINDS
    out: dict[str, Any] = {
        "span_id": span.span_id.hex(),
        "trace_id": span.trace_id.hex(),
        "parent_span_id": _hex_id(span.parent_span_id),
        "timestamp_utc": _ns_to_datetime(start),
        "service_name": resource.service_name,
        "environment": resource.environment,
        "name": _clip("name", span.name) or None,
        "kind": kind,
        # The span name, as before `name` existed: consoles and queries still read it.
        "endpoint": _clip("endpoint", span.name) or None,
    }
    if start and end >= start:
        out["latency_ms_total"] = (end - start) / 1e6
    meta: dict[str, Any] = {"otel.span_type": _SPAN_TYPES.get(kind, kind.lower())}
    otel_kind = _KINDS.get(span.kind)
    if otel_kind:
        meta["otel.kind"] = otel_kind
    if scope_name:
        meta["otel.scope"] = scope_name
    if recovered:
        meta[SPAN_NAME_RECOVERED_KEY] = True

    # Who and where: any span.
    user = _first(attrs, _USER_KEYS)
    if user is not None:
        out["user_id"] = _clip("user_id", str(user))
    session = _first(attrs, _SESSION_KEYS)
    if session is not None:
        out["session_id"] = _clip("session_id", str(session))

    flat = _flat_messages(attrs)
    first_chunk_ms = _span_events(span, start, out, meta)
    if is_model_call:
        _map_llm(attrs, out, meta, flat, invocation, scope_name)
        _map_ttft(attrs, out, meta, _streamed(attrs, invocation, first_chunk_ms), first_chunk_ms)
    _map_text(attrs, out, flat, kind)
    if kind == "TOOL":
        tool = _first(attrs, _TOOL_NAME_KEYS) or (attrs.get("traceloop.entity.name")
                                                   if attrs.get("traceloop.span.kind") == "tool" else None)
        if tool is not None:
            meta["tool.name"] = _bounded(str(tool))
    _map_error(span, attrs, out, meta, is_model_call, scope_name)

    # Our own OTel form wins: it is exactly our field. Model call fields only on model calls.
    own = _OWN_FIELDS if is_model_call else _OWN_FIELDS_ANY_SPAN
    for key in [k for k in attrs if k.startswith("llm.") and k[4:] in own and k != "llm.kind"]:
        _own_field(out, key[4:], attrs.pop(key), meta)

    if span.links:
        meta["otel.links"] = [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                              for link in list(span.links)[:_EVENTS_LIMIT]]
    if span.status.code == 1:
        meta["otel.status"] = "ok"
    for key in ("openinference.span.kind", "error.type", "llm.kind"):
        attrs.pop(key, None)
    _drop_instructions(attrs)
    for key, value in attrs.items():
        if key in _CONTENT_KEYS or key.startswith(_CONTENT_PREFIXES) or len(meta) >= _META_KEYS_LIMIT:
            continue
        if key in _JSON_OBJECT_KEYS:
            value = _json_or_value(value)
        meta[key] = _bounded(value)
    if resource.metadata:
        meta["otel.resource"] = resource.metadata
    out["metadata"] = meta
    return out


def _span_events(span, start: int, out: dict, meta: dict) -> float | None:
    """Exception, first-chunk and content events onto the span; the rest kept in metadata.
    Returns the first chunk's offset in ms (None: no first-chunk event)."""
    first_chunk_ms = None
    events = []
    for event in span.events:
        event_attrs = _attributes(event.attributes)
        offset = (event.time_unix_nano - start) / 1e6 if start and event.time_unix_nano >= start else None
        if event.name == "exception":
            # Handed to _map_error, which pops it: the first exception's type, the last one's text.
            previous = out.get("_exception")
            out["_exception"] = (previous[0] if previous and previous[0] else event_attrs.get("exception.type"),
                                 event_attrs.get("exception.message"), event_attrs.get("exception.stacktrace"))
        elif event.name in _FIRST_CHUNK_EVENTS:
            if offset is not None and (first_chunk_ms is None or offset < first_chunk_ms):
                first_chunk_ms = offset
        elif event.name in ("gen_ai.content.prompt", "gen_ai.user.message", "gen_ai.system.message"):
            if "prompt" not in out:
                text = _render(_as_messages(event_attrs.get("gen_ai.prompt", event_attrs.get("content"))) or [])
                if text:
                    out["prompt"] = text[:_TEXT_LIMIT]
        elif event.name in ("gen_ai.content.completion", "gen_ai.choice", "gen_ai.assistant.message"):
            if "response" not in out:
                text = _render(_as_messages(event_attrs.get("gen_ai.completion", event_attrs.get("message",
                                                            event_attrs.get("content")))) or [])
                if text:
                    out["response"] = text[:_TEXT_LIMIT]
        elif len(events) < _EVENTS_LIMIT:
            events.append({"name": event.name, "offset_ms": offset,
                           **({"attributes": _bounded({k: v for k, v in event_attrs.items()
                                                       if k not in _CONTENT_KEYS})} if event_attrs else {})})
    if events:
        meta["otel.events"] = events
    return first_chunk_ms


def _map_error(span, attrs: dict, out: dict, meta: dict, is_model_call: bool, scope_name: str | None = None) -> None:
    """The OTel status, error.type and the exception event."""
    status = span.status
    event_type, text, trace = out.pop("_exception", None) or (None, None, None)
    error_message = (status.message or None) if status.code == _STATUS_ERROR else None
    if text or trace:
        # The status message says it shortest; the exception event adds the stack trace.
        error_message = "\n".join(str(t) for t in (error_message or text, trace) if t)
    if status.code == _STATUS_ERROR:
        out["status"] = "error"
        if is_model_call and out.get("finish_reason") is None:
            out["finish_reason"] = "error"
    raw_type = attrs.get("error.type") or event_type
    if raw_type is not None:
        name, qualified = _error_type(raw_type)
        if out.get("provider") == "anthropic" or (scope_name or "").startswith("com.anthropic."):
            sdk_name = _anthropic_error_class(name, attrs.get("http.response.status_code"))
            if sdk_name is not None and sdk_name != name:
                name, qualified = sdk_name, qualified or str(raw_type)
        out["error_type"] = _clip("error_type", name)
        if qualified is not None:
            meta[ERROR_TYPE_QUALIFIED_KEY] = _bounded(qualified)
    if error_message:
        out["error_message"] = _clip("error_message", str(error_message))


def _anthropic_error_class(error_type: str, status: Any) -> str | None:
    """The anthropic SDK's exception class for an error.type in the API's words ("invalid_request_error")
    or a bare status ("500"); None when error_type is neither (already a class name)."""
    status_code = _int(status)
    if error_type.isdigit():
        status_code = int(error_type)
    elif error_type not in _ANTHROPIC_API_ERRORS:
        return None
    if status_code is not None and status_code in _ANTHROPIC_STATUS_ERRORS:
        return _ANTHROPIC_STATUS_ERRORS[status_code]
    if error_type in _ANTHROPIC_API_ERRORS:
        return _ANTHROPIC_API_ERRORS[error_type]
    if status_code is not None and status_code >= 500:
        return "InternalServerError"
    return None


def _drop_instructions(attrs: dict) -> None:
    """pydantic-ai's model_request_parameters (kept for metadata: tools, output mode) repeats the request's
    instructions, which are prompt text (gen_ai.system_instructions, scanned in `prompt`): never in metadata."""
    params = _json_or_value(attrs.get("model_request_parameters"))
    if isinstance(params, dict):
        attrs["model_request_parameters"] = orjson.dumps(
            {k: v for k, v in params.items() if k != "instruction_parts"}, default=str).decode()
    elif isinstance(params, str) and "instruction_parts" in params:
        del attrs["model_request_parameters"]  # not JSON: cannot be cleaned


def _map_ttft(attrs: dict, out: dict, meta: dict, streamed: bool | None, first_chunk_ms: float | None) -> None:
    ttft_seconds = _float(_first(attrs, _TTFT_SECONDS))
    for key in _TTFT_SECONDS:
        attrs.pop(key, None)
    ttft_ms = ttft_seconds * 1000.0 if ttft_seconds is not None and ttft_seconds >= 0 else first_chunk_ms
    if ttft_ms is None:
        return
    if streamed is False:
        meta[TTFT_UNSTREAMED_KEY] = ttft_ms
    else:
        out["latency_ms_ttft"] = ttft_ms


def _map_text(attrs: dict, out: dict, flat: dict, kind: str) -> None:
    """Prompt and response of any span: an LLM call's messages, a chain's, agent's or tool's input and output,
    a retriever's documents. Content attributes land here, where they are scanned, never in metadata."""
    prompt = _text_of(attrs, "input", flat, kind)
    response = _text_of(attrs, "output", flat, kind)
    if prompt is not None:
        out["prompt"] = prompt[:_TEXT_LIMIT]
    if response is not None:
        out["response"] = response[:_TEXT_LIMIT]


def _own_field(out: dict, name: str, value: Any, meta: dict) -> None:
    if name in _INT_FIELDS:
        coerced = _int(value)
    elif name in _FLOAT_FIELDS:
        coerced = _float(value)
    elif name in _BOOL_FIELDS:
        coerced = _bool(value)
    elif name == "finish_reason":
        coerced = _finish_reason(value)
    elif name == "attempted_models":
        coerced = [str(v) for v in value][:100] if isinstance(value, list) else None
    elif name == "status":
        coerced = value if value in ("success", "error") else None
    elif name == "token_count_method":
        coerced = value if value in ("provider", "tiktoken", "estimated", "unspecified") else None
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        coerced = _clip(name, str(value))
    else:
        coerced = None
    if coerced is None:
        meta[f"llm.{name}"] = _bounded(value)
    else:
        out[name] = coerced


# Where each kind's text comes from when it has no messages, most specific first.
_INPUT_KEYS = ("gen_ai.prompt", "llm.prompts", "gen_ai.tool.call.arguments", "tool_call.function.arguments",
               "gen_ai.tool.args", "gen_ai.tool.input", "gen_ai.retrieval.query.text", "reranker.query",
               "input.value", "traceloop.entity.input", "tool.parameters")
_OUTPUT_KEYS = ("gen_ai.completion", "gen_ai.tool.call.result", "gen_ai.tool.output", "output.value",
                "traceloop.entity.output")
_RAW_TEXT_KEYS = frozenset({"input.value", "output.value", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result",
                            "tool_call.function.arguments", "gen_ai.tool.args", "gen_ai.tool.input",
                            "gen_ai.tool.output", "reranker.query", "tool.parameters"})


def _text_of(attrs: dict, direction: str, flat: dict, kind: str = "UNKNOWN") -> str | None:
    """Prompt (direction input) or response text of a span, from the most readable source first."""
    if direction == "input":
        messages = _as_messages(attrs.get("gen_ai.input.messages")) or _run_messages(attrs)[0]
        system = attrs.get("gen_ai.system_instructions")
        if messages or system is not None:
            return _render(messages or [], system)
        if kind == "EMBEDDING" and (texts := _embedding_texts(attrs)):
            return texts
    else:
        messages = _as_messages(attrs.get("gen_ai.output.messages"))
        if messages:
            return _render(messages)
        final = attrs.get("final_result")  # pydantic-ai's agent run: its output (text, or JSON of an object)
        if final is not None and final != "":
            return final if isinstance(final, str) else orjson.dumps(final, default=str).decode()
        if messages := _run_messages(attrs)[1]:
            return _render(messages)
        if kind in ("RETRIEVER", "RERANKER"):
            docs = _documents_text(attrs, "reranker.output_documents." if kind == "RERANKER"
                                   else "retrieval.documents.")
            if docs:
                return docs
    if flat.get(direction):
        return _render(flat[direction])
    if kind == "EMBEDDING" and direction == "output":
        return None  # the vectors (OpenInference's output.value): not text anyone reads or scans
    for key in _INPUT_KEYS if direction == "input" else _OUTPUT_KEYS:
        value = attrs.get(key)
        if value is None or value == "":
            continue
        if key in _RAW_TEXT_KEYS:
            return value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        if key.startswith("traceloop.entity."):
            return _content_text(_unwrap_entity(value))
        return _render(_as_messages(value) or [])
    return None


def _run_messages(attrs: dict) -> tuple[list, list]:
    """pydantic-ai's agent run span: its input and output messages from pydantic_ai.all_messages, the whole
    conversation of the run. The output is the last assistant message; the input, everything before it."""
    messages = _as_messages(attrs.get("pydantic_ai.all_messages"))
    if not messages or not all(isinstance(m, dict) for m in messages):
        return [], []
    if messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1:]
    return messages, []  # the run failed before an answer


def _map_llm(attrs: dict, out: dict, meta: dict, flat: dict, invocation: dict, scope_name: str | None) -> None:
    model = _first(attrs, _MODEL_KEYS) or (invocation.get("model") if isinstance(invocation.get("model"), str)
                                           else None)
    answered = _answered_model(attrs)
    if answered is not None and (model is None or (isinstance(model, str) and answered.startswith(model))):
        model = answered  # the snapshot that answered (a LangChain stream's span names only the alias asked for)
    if model is not None:
        out["model"] = _clip("model", str(model))
        request_model = attrs.get("gen_ai.request.model")
        if request_model is not None and request_model != model:
            meta["gen_ai.request.model"] = _bounded(request_model)
    for key in _MODEL_KEYS:
        attrs.pop(key, None)
    provider = _first(attrs, _PROVIDER_KEYS)
    if provider is None and scope_name:
        provider = _SCOPE_PROVIDERS.get(scope_name.rsplit(".", 1)[-1].lower())
    if provider is not None:
        provider = str(provider).strip().lower()
        out["provider"] = _clip("provider", _PROVIDERS.get(provider, provider))
    for key in _PROVIDER_KEYS:
        attrs.pop(key, None)
    response_id = _response_id(attrs)
    if response_id:
        out["response_id"] = _clip("response_id", response_id)
    _map_tokens(attrs, out, meta, scope_name)
    _map_finish_reason(attrs, out, meta, flat)


def _map_tokens(attrs: dict, out: dict, meta: dict, scope_name: str | None = None) -> None:
    if _openlit_estimated(attrs, scope_name):
        # Not the provider's count but openlit's own, from its rough tokenizer: kept aside, and the span
        # left without tokens like any stream without usage, for the server to count from the text.
        meta[LIBRARY_TOKEN_ESTIMATE_KEY] = {
            "input_tokens": _int(_first(attrs, _INPUT_TOKENS)), "output_tokens": _int(_first(attrs, _OUTPUT_TOKENS))}
        for key in (*_INPUT_TOKENS, *_OUTPUT_TOKENS, "gen_ai.client.token.usage"):
            attrs.pop(key, None)
    prompt_tokens = _int(_first(attrs, _INPUT_TOKENS))
    completion_tokens = _int(_first(attrs, _OUTPUT_TOKENS))
    cache_read = _int(_first(attrs, _CACHE_READ))
    cache_write = _int(_first(attrs, _CACHE_WRITE))
    reasoning = _int(_first(attrs, _REASONING))
    for key in (*_INPUT_TOKENS, *_OUTPUT_TOKENS, *_CACHE_READ, *_REASONING):
        attrs.pop(key, None)
    cache = (cache_read or 0) + (cache_write or 0)
    # openlit's anthropic spans carry Anthropic's uncached input_tokens (see _OPENLIT_ANTHROPIC_SCOPE).
    uncached_input = scope_name == _OPENLIT_ANTHROPIC_SCOPE and out.get("provider") == "anthropic"
    if prompt_tokens is not None and cache and (uncached_input or cache > prompt_tokens):
        # The conventions count cached input inside input_tokens; an instrumentation that reports
        # Anthropic's uncached `input_tokens` alone shows itself by a cache larger than the input.
        prompt_tokens += cache
        meta["llm_observe.input_tokens_adjusted"] = True
    if cache_write is not None:
        meta["gen_ai.usage.cache_creation.input_tokens"] = cache_write
    for key in _CACHE_WRITE:
        attrs.pop(key, None)
    if prompt_tokens is None and cache_read:
        prompt_tokens = cache_read
    out["prompt_tokens"] = prompt_tokens
    out["completion_tokens"] = completion_tokens
    out["cached_tokens"] = cache_read
    out["reasoning_tokens"] = reasoning
    if prompt_tokens is not None or completion_tokens is not None:
        out["token_count_method"] = "provider"


def _openlit_estimated(attrs: dict, scope_name: str | None) -> bool:
    """openlit's openai span of a stream whose chunks had no usage: openlit counted the tokens itself. It sets
    the cache attributes only from a usage the provider sent, so a stream without them had none."""
    return (scope_name == _OPENLIT_OPENAI_SCOPE and _bool(attrs.get("gen_ai.request.stream")) is True
            and _first(attrs, _INPUT_TOKENS + _OUTPUT_TOKENS) is not None
            and not any(key in attrs for key in (*_CACHE_READ, *_CACHE_WRITE)))


def _map_finish_reason(attrs: dict, out: dict, meta: dict, flat: dict) -> None:
    raw = {key: attrs.pop(key) for key in _FINISH_REASON_KEYS if attrs.get(key) not in (None, "", [])}
    reason = next((r for r in map(_finish_reason, raw.values()) if r is not None), None)
    if reason is None:
        outputs = _as_messages(attrs.get("gen_ai.output.messages")) or flat.get("output") or []
        reason = next((_finish_reason(m.get("finish_reason")) for m in outputs
                       if isinstance(m, dict) and m.get("finish_reason")), None)
    if reason is not None:
        out["finish_reason"] = reason
    else:
        meta.update({key: _bounded(value) for key, value in raw.items()})


# --- a whole request ------------------------------------------------------------------
def map_request(request: ExportTraceServiceRequest) -> Mapped:
    """Every span of the request as a SpanIn-shaped dict; spans without valid ids are rejected here."""
    spans: list[dict] = []
    rejected: list[MappedRejection] = []
    for resource_spans in request.resource_spans:
        resource = _resource(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name or None
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or not any(span.trace_id):
                    rejected.append(MappedRejection(span.span_id.hex() or None, "trace_id must be 16 non-zero bytes"))
                    continue
                if len(span.span_id) != 8 or not any(span.span_id):
                    rejected.append(MappedRejection(span.span_id.hex() or None, "span_id must be 8 non-zero bytes"))
                    continue
                try:
                    spans.append(map_span(span, resource, scope_name))
                except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                    rejected.append(MappedRejection(span.span_id.hex(), f"span could not be mapped: {exc}"))
    _ttft_from_inner_spans(spans)
    return Mapped(spans, rejected)


def _ttft_from_inner_spans(spans: list[dict]) -> None:
    """A model call traced twice, one span inside the other (OpenInference's anthropic span around the anthropic
    SDK's own, the same response id): the outer one, which has no first-chunk time, gets the inner one's,
    measured from its own start."""
    by_id = {span["span_id"]: span for span in spans}
    for inner in spans:
        outer = by_id.get(inner.get("parent_span_id"))
        if (outer is None or inner.get("latency_ms_ttft") is None or outer.get("latency_ms_ttft") is not None
                or not inner.get("response_id") or inner.get("response_id") != outer.get("response_id")
                or outer.get("trace_id") != inner.get("trace_id") or outer.get("kind") != inner.get("kind")
                or TTFT_UNSTREAMED_KEY in outer["metadata"]
                or not (outer.get("timestamp_utc") and inner.get("timestamp_utc"))):
            continue
        ttft = inner["latency_ms_ttft"] + (inner["timestamp_utc"] - outer["timestamp_utc"]).total_seconds() * 1000.0
        if 0 <= ttft <= (outer.get("latency_ms_total") or ttft):
            outer["latency_ms_ttft"] = ttft
            outer["metadata"]["llm_observe.ttft_from_span"] = inner["span_id"]

