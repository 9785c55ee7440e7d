"""Real OpenTelemetry SDK spans (in-memory exporter) and their OTLP protobuf / JSON encodings."""

from __future__ import annotations

import base64
import time
from contextlib import contextmanager

import orjson
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

MS = 1_000_000  # ns


class Recorder:
    """A tracer provider whose finished spans are kept in memory."""

    def __init__(self, service: str = "support-bot", **resource) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service, **resource}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests.interop", "1.0")
        self.t0 = time.time_ns() - 60_000 * MS

    @contextmanager
    def span(self, name: str, *, start_ms: float = 0, end_ms: float = 1000, attributes: dict | None = None,
             kind=trace.SpanKind.INTERNAL, error: Exception | None = None, events: list | None = None):
        span = self.tracer.start_span(name, kind=kind, attributes=attributes or {},
                                      start_time=self.t0 + int(start_ms * MS))
        with trace.use_span(span, end_on_exit=False):
            yield span
        for event_name, at_ms, attrs in events or ():
            span.add_event(event_name, attrs or {}, timestamp=self.t0 + int(at_ms * MS))
        if error is not None:
            span.record_exception(error, timestamp=self.t0 + int(end_ms * MS))
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end(end_time=self.t0 + int(end_ms * MS))

    def finished(self):
        return self.exporter.get_finished_spans()

    def protobuf(self) -> bytes:
        return encode_spans(self.finished()).SerializeToString()

    def json(self) -> bytes:
        return otlp_json(encode_spans(self.finished()))


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def otlp_json(request) -> bytes:
    """The OTLP/JSON encoding of a request: protobuf JSON mapping, ids as hex (the spec's one difference)."""
    data = json_format.MessageToDict(request)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = _hex(span[key])
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        if link.get(key):
                            link[key] = _hex(link[key])
    return orjson.dumps(data)


def hex_id(span, attr: str = "span_id") -> str:
    ctx = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return format(getattr(ctx, attr), "032x" if attr == "trace_id" else "016x")


def genai_chat_attributes(**overrides) -> dict:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.response.id": "chatcmpl-123",
        "gen_ai.usage.input_tokens": 812,
        "gen_ai.usage.cache_read.input_tokens": 512,
        "gen_ai.usage.output_tokens": 164,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.response.time_to_first_chunk": 0.412,
        "gen_ai.conversation.id": "conv-7",
        "gen_ai.system_instructions": orjson.dumps([{"type": "text",
                                                     "content": "You are a billing assistant."}]).decode(),
        "gen_ai.input.messages": orjson.dumps([
            {"role": "user", "parts": [{"type": "text", "content": "Summarise my last invoice"}]},
        ]).decode(),
        "gen_ai.output.messages": orjson.dumps([
            {"role": "assistant", "parts": [{"type": "text", "content": "Your last invoice was 42 EUR."}],
             "finish_reason": "stop"},
        ]).decode(),
        "server.address": "api.openai.com",
    }
    attrs.update(overrides)
    return {k: v for k, v in attrs.items() if v is not None}


# gpt-4o test price: 2.50 in, 10.00 out, 1.25 cached input per 1M tokens (micro-USD per token).
# 300 uncached x 2.5 + 512 cached x 1.25 + 164 x 10 = 750 + 640 + 1640
GENAI_CHAT_COST = 3030
