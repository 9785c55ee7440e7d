"""OTLP logs in, the prompt and response text of spans out; OTLP metrics counted.

GenAI instrumentations send a call's messages as log records ("events") beside its
span rather than as span attributes: opentelemetry-instrumentation-openai-v2 in its
default mode emits one `gen_ai.{system,user,assistant,tool}.message` record per
request message (body `{"content": ...}`, or `{"tool_calls": [...]}`, or `{"id": ...,
"content": ...}` for a tool result) and one `gen_ai.choice` per choice (body `{"index",
"finish_reason", "message": {"role", "content", "tool_calls"}}`), each carrying the
trace and span id of its call. Newer ones send one
`gen_ai.client.inference.operation.details` record with `gen_ai.input.messages`,
`gen_ai.system_instructions` and `gen_ai.output.messages` attributes; OpenLLMetry sends
`gen_ai.content.prompt` / `gen_ai.content.completion` with the text in the body or in
`gen_ai.prompt` / `gen_ai.completion`. The event name is the LogRecord's `event_name`
(newer protos) or its `event.name` attribute (older SDKs).

Each span's records become one SpanContent: the prompt (system, user, assistant and
tool messages in the order they were emitted) and the response (the choices by index),
rendered like the /v1/traces mapping renders messages, and the first choice's finish reason
(normalised as the /v1/traces mapping does), for a span that has none (a stream's span
often carries none). services.span_content scans, redacts and stores it. Records that are
not GenAI events are counted, not kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from ingest.otlp import (
    _TEXT_LIMIT,
    PROTOBUF,
    _as_messages,
    _attributes,
    _finish_reason,
    _json_or_value,
    _render,
    _value,
    decode_export,
)

MESSAGE_EVENTS = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
CHOICE_EVENT = "gen_ai.choice"
DETAILS_EVENT = "gen_ai.client.inference.operation.details"
PROMPT_EVENT = "gen_ai.content.prompt"
COMPLETION_EVENT = "gen_ai.content.completion"
_DETAILS_KEYS = ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions")
GENAI_EVENTS = frozenset({*MESSAGE_EVENTS, CHOICE_EVENT, DETAILS_EVENT, PROMPT_EVENT, COMPLETION_EVENT})


@dataclass
class SpanContent:
    """The GenAI text of one span found in one request, not yet scanned."""

    trace_id: str
    span_id: str
    events: int = 0
    prompt: list = field(default_factory=list)  # messages, in the order they were emitted
    system: list = field(default_factory=list)  # gen_ai.system_instructions parts
    choices: list = field(default_factory=list)  # (index, order, message)
    finish_reasons: list = field(default_factory=list)  # (index, order, normalised reason)

    def prompt_text(self) -> str | None:
        text = _render(self.prompt, self.system or None)
        return text[:_TEXT_LIMIT] if text else None

    def response_text(self) -> str | None:
        text = _render([message for _, _, message in sorted(self.choices, key=lambda c: (c[0], c[1]))])
        return text[:_TEXT_LIMIT] if text else None

    def finish_reason(self) -> str | None:
        """The first choice's finish reason, in the appliance's words (as ingest.otlp maps a span's)."""
        # The lowest choice index; of one choice's, the first emitted (an explicit finish_reasons first).
        return min(self.finish_reasons, key=lambda r: (r[0], r[1]))[2] if self.finish_reasons else None

    def add_finish_reason(self, value: Any, index: int, order: int) -> None:
        reason = _finish_reason(_json_or_value(value))
        if reason is not None:
            self.finish_reasons.append((index, order, reason))


@dataclass
class MappedLogs:
    contents: list[SpanContent]
    genai_records: int  # GenAI events (with or without content)
    other_records: int  # not GenAI events: not kept
    unjoinable: int  # GenAI events without a valid trace and span id: nothing to join them to


# --- decoding -------------------------------------------------------------------
def decode_logs_request(data: bytes, encoding: str) -> ExportLogsServiceRequest:
    return decode_export(data, encoding, ExportLogsServiceRequest(), levels=(
        ("resourceLogs", "resource_logs"), ("scopeLogs", "scope_logs"), ("logRecords", "log_records")))


def decode_metrics_request(data: bytes, encoding: str) -> ExportMetricsServiceRequest:
    # Only counted and passed on: the hex ids of exemplars, deeper down, are left as they are.
    return decode_export(data, encoding, ExportMetricsServiceRequest(), fix=lambda metric: None, levels=(
        ("resourceMetrics", "resource_metrics"), ("scopeMetrics", "scope_metrics"), ("metrics",)))


def _answer(response: Message, rejected_field: str, rejected: int, message: str, encoding: str) -> bytes:
    if rejected or message:
        setattr(response.partial_success, rejected_field, rejected)
        response.partial_success.error_message = message
    if encoding == PROTOBUF:
        return response.SerializeToString()
    return json_format.MessageToJson(response, indent=None).encode()


def encode_logs_response(*, rejected: int, message: str, encoding: str) -> bytes:
    return _answer(ExportLogsServiceResponse(), "rejected_log_records", rejected, message, encoding)


def encode_metrics_response(*, rejected: int, message: str, encoding: str) -> bytes:
    return _answer(ExportMetricsServiceResponse(), "rejected_data_points", rejected, message, encoding)


def count_data_points(request: ExportMetricsServiceRequest) -> int:
    total = 0
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind is not None:
                    total += len(getattr(metric, kind).data_points)
    return total


# --- one record -----------------------------------------------------------------
def _message(role: str | None, body: Any) -> dict | None:
    """A message of the shape ingest.otlp renders, from an event body (kvlist, string or parts)."""
    body = _json_or_value(body)
    if body is None:
        return None
    if not isinstance(body, dict):
        body = {"content": body}
    content = body.get("content")
    if content is not None and not isinstance(content, (str, list)):
        content = orjson.dumps(content, default=str).decode()
    message = {"role": body.get("role") if isinstance(body.get("role"), str) else role, "content": content}
    if isinstance(body.get("parts"), list):
        message["parts"] = body["parts"]
    calls = body.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = [_json_or_value(call) for call in calls]
    return message


def _add_record(content: SpanContent, name: str, attrs: dict, body: Any, order: int) -> None:
    if name in MESSAGE_EVENTS:
        message = _message(MESSAGE_EVENTS[name], body if body is not None else attrs.get("content"))
        if message:
            content.prompt.append(message)
    elif name == CHOICE_EVENT:
        body = _json_or_value(body)
        if isinstance(body, dict):
            index = body.get("index") if isinstance(body.get("index"), int) else 0
            message = _message("assistant", body.get("message") if "message" in body else body)
            if message:
                content.choices.append((index, order, message))
            content.add_finish_reason(body.get("finish_reason"), index, order)
    elif name == PROMPT_EVENT:
        content.prompt += _as_messages(attrs.get("gen_ai.prompt", body)) or []
    elif name == COMPLETION_EVENT:
        for message in _as_messages(attrs.get("gen_ai.completion", body)) or []:
            content.choices.append((0, order, message))
            if isinstance(message, dict):
                content.add_finish_reason(message.get("finish_reason"), 0, order)
    elif name == DETAILS_EVENT:
        # The conventions put the messages in attributes; a body of the same keys is read as well.
        source = attrs if any(key in attrs for key in _DETAILS_KEYS) else body if isinstance(body, dict) else {}
        system = _json_or_value(source.get("gen_ai.system_instructions"))
        if system is not None:
            content.system += system if isinstance(system, list) else [system]
        content.prompt += _as_messages(source.get("gen_ai.input.messages")) or []
        reasons = attrs.get("gen_ai.response.finish_reasons", source.get("gen_ai.response.finish_reasons"))
        content.add_finish_reason(reasons, 0, order)
        for message in _as_messages(source.get("gen_ai.output.messages")) or []:
            content.choices.append((0, order, message))
            if isinstance(message, dict):
                content.add_finish_reason(message.get("finish_reason"), 0, order)


def map_logs_request(request: ExportLogsServiceRequest) -> MappedLogs:
    """The GenAI text of the request, one SpanContent per span, in the order the spans first appear."""
    by_span: dict[tuple[str, str], SpanContent] = {}
    genai = other = unjoinable = order = 0
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                attrs = _attributes(record.attributes)
                name = record.event_name or attrs.pop("event.name", None)
                if name not in GENAI_EVENTS:
                    other += 1
                    continue
                genai += 1
                if len(record.trace_id) != 16 or not any(record.trace_id) or len(record.span_id) != 8 \
                        or not any(record.span_id):
                    unjoinable += 1
                    continue
                key = (record.trace_id.hex(), record.span_id.hex())
                content = by_span.get(key)
                if content is None:
                    content = by_span[key] = SpanContent(trace_id=key[0], span_id=key[1])
                content.events += 1
                order += 1
                body = _value(record.body) if record.HasField("body") else None
                _add_record(content, name, attrs, body, order)
    return MappedLogs(list(by_span.values()), genai, other, unjoinable)
