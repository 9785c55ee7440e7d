"""OTLP/HTTP receiver: POST /v1/traces, /v1/logs and /v1/metrics, as any OpenTelemetry exporter sends them.

Answers follow the OTLP/HTTP specification: 200 with an ExportTraceServiceResponse
(partial_success when some spans were rejected), 400 for a body that does not
decode, 415 for a content type other than protobuf or JSON, each in the encoding
of the request. The spans go through spans_ingest like /v1/spans: same
validation, scanning, sampling, pricing and storage. Logs carry GenAI events (a call's
messages) that fill their span's prompt and response (services.span_content); metrics
go on to Prometheus when PROMETHEUS_OTLP_URL is set (services.metrics_forward).
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse
from ninja import Router

from ingest.auth import API_KEY_AUTH
from ingest.bodies import BodyError, read_body
from ingest.metrics import metrics_record_log_events, metrics_record_otlp
from ingest.otlp import JSON, PROTOBUF, OtlpDecodeError, decode_request, encode_response, encode_status, map_request
from ingest.otlp_logs import (
    count_data_points,
    decode_logs_request,
    decode_metrics_request,
    encode_logs_response,
    encode_metrics_response,
    map_logs_request,
)
from ingest.services.metrics_forward import forward_url, metrics_forward
from ingest.services.span_content import content_ingest
from ingest.services.spans import spans_ingest

router = Router(tags=["otlp"], auth=API_KEY_AUTH)

CONTENT_TYPES = {
    "application/x-protobuf": PROTOBUF,
    "application/protobuf": PROTOBUF,
    "application/json": JSON,
}
_MEDIA = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}
# google.rpc.Code values for the Status body of errors.
_RPC_CODES = {400: 3, 413: 8, 415: 3, 503: 14}
_REJECTION_DETAILS = 5

_EXAMPLE = {
    "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "support-bot"}}]},
        "scopeSpans": [{
            "scope": {"name": "opentelemetry.instrumentation.openai_v2"},
            "spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174",
                "parentSpanId": "eee19b7ec3c1b173",
                "name": "chat gpt-4o",
                "kind": 3,
                "startTimeUnixNano": "1795682400000000000",
                "endTimeUnixNano": "1795682401812000000",
                "attributes": [
                    {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                    {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                    {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
                    {"key": "gen_ai.response.model", "value": {"stringValue": "gpt-4o-2024-08-06"}},
                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "812"}},
                    {"key": "gen_ai.usage.cache_read.input_tokens", "value": {"intValue": "512"}},
                    {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "164"}},
                    {"key": "gen_ai.response.finish_reasons", "value": {"arrayValue": {"values": [
                        {"stringValue": "stop"}]}}},
                    {"key": "gen_ai.input.messages", "value": {"stringValue":
                        '[{"role":"user","parts":[{"type":"text","content":"Summarise my last invoice"}]}]'}},
                ],
                "status": {"code": 1},
            }],
        }],
    }],
}

def _openapi(*, message: str, example: dict, accepted: str, partial: dict, extra: dict | None = None) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-protobuf": {"schema": {"type": "string", "format": "binary", "description": message}},
                "application/json": {
                    "schema": {"type": "object", "description": f"{message.rsplit('.', 1)[-1]} in the OTLP JSON "
                               "encoding (hex trace/span ids, lowerCamelCase keys)", "additionalProperties": True},
                    "example": example,
                },
            },
        },
        "responses": {
            "200": {
                "description": accepted,
                "content": {
                    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {
                        "schema": {"type": "object", "additionalProperties": True},
                        "examples": {"all accepted": {"value": {}}, "partial": {"value": {"partialSuccess": partial}}},
                    },
                },
            },
            "400": {"description": "The body does not decode (google.rpc.Status in the request's encoding)",
                    "content": {"application/json": {"example": {"code": 3, "message": "body is not valid JSON"}}}},
            "413": {"description": "Body over INGEST_MAX_BYTES (after gzip)"},
            "415": {"description": "Content-Type is neither application/x-protobuf nor application/json"},
            **(extra or {}),
        },
    }


_OPENAPI = _openapi(
    message="opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest",
    example=_EXAMPLE,
    accepted="Accepted. `partialSuccess` counts the spans that were rejected and says why.",
    partial={"rejectedSpans": "1", "errorMessage": "1 of 3 spans rejected: eee19b7ec3c1b174: timestamp_too_old "
                                                   "(older than the retention of 30 days)"},
)


def _answer(status: int, body: bytes, media: str) -> HttpResponse:
    # "The server MUST use the same Content-Type in the response as it received in the request."
    return HttpResponse(body, status=status, content_type=media)


def _error(status: int, message: str, encoding: str, media: str) -> HttpResponse:
    metrics_record_otlp(encoding=encoding, code=status)
    body = encode_status(code=_RPC_CODES.get(status, 2), message=message, encoding=encoding)
    return _answer(status, body, media)


def _read(request, decode) -> tuple[str, str, bytes, object] | HttpResponse:
    """(encoding, media type, body, decoded request), or the OTLP error answer."""
    media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoding = CONTENT_TYPES.get(media)
    if encoding is None:
        return _error(415, f"Content-Type {media or '(none)'!r} is not supported; send application/x-protobuf "
                      "or application/json", JSON, _MEDIA[JSON])
    try:
        data = read_body(request)
        return encoding, media, data, decode(data, encoding)
    except BodyError as exc:
        return _error(exc.status, exc.message, encoding, media)
    except OtlpDecodeError as exc:
        return _error(400, str(exc), encoding, media)


@router.post(
    "/traces",
    openapi_extra=_OPENAPI,
    summary="OTLP/HTTP trace export (protobuf or JSON, gzip)",
    description="Point any OpenTelemetry OTLP/HTTP exporter here: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="
    "http://<host>:8000/v1/traces`, `OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<key>`. GenAI semantic "
    "conventions and OpenInference attributes become span fields (model, provider, tokens, prompt, response, "
    "TTFT); other spans of the trace are kept with model null so the trace tree is whole.",
)
def post_traces(request):
    read = _read(request, decode_request)
    if isinstance(read, HttpResponse):
        return read
    encoding, media, _, export = read

    mapped = map_request(export)
    reasons = [f"{r.span_id or '?'}: {r.reason}" for r in mapped.rejected]
    rejected = len(mapped.rejected)
    project = request.auth.project
    # A collector may batch more than /v1/spans takes in one request: stored in slices.
    size = settings.INGEST_MAX_SPANS
    for offset in range(0, len(mapped.spans), size):
        chunk = mapped.spans[offset:offset + size]
        result = spans_ingest(project=project, items=chunk)
        rejected += len(result.rejected)
        reasons += [f"{r.span_id or '?'}: {r.rule} ({r.field + ': ' if r.field else ''}{r.reason})"
                    for r in result.rejected[:_REJECTION_DETAILS]]
    message = ""
    if rejected:
        total = len(mapped.spans) + len(mapped.rejected)
        message = f"{rejected} of {total} spans rejected: " + "; ".join(reasons[:_REJECTION_DETAILS])
    metrics_record_otlp(encoding=encoding, code=200,
                        span_types=[s["metadata"]["otel.span_type"] for s in mapped.spans])
    return _answer(200, encode_response(rejected=rejected, message=message, encoding=encoding), media)


_LOGS_EXAMPLE = {
    "resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "support-bot"}}]},
        "scopeLogs": [{
            "scope": {"name": "opentelemetry.instrumentation.openai_v2"},
            "logRecords": [
                {"timeUnixNano": "1795682400000000000", "eventName": "gen_ai.user.message",
                 "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                 "attributes": [{"key": "gen_ai.system", "value": {"stringValue": "openai"}}],
                 "body": {"kvlistValue": {"values": [
                     {"key": "content", "value": {"stringValue": "Summarise my last invoice"}}]}}},
                {"timeUnixNano": "1795682401812000000", "eventName": "gen_ai.choice",
                 "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                 "attributes": [{"key": "gen_ai.system", "value": {"stringValue": "openai"}}],
                 "body": {"kvlistValue": {"values": [
                     {"key": "index", "value": {"intValue": "0"}},
                     {"key": "finish_reason", "value": {"stringValue": "stop"}},
                     {"key": "message", "value": {"kvlistValue": {"values": [
                         {"key": "role", "value": {"stringValue": "assistant"}},
                         {"key": "content", "value": {"stringValue": "Your last invoice was 42 EUR."}}]}}}]}}},
            ],
        }],
    }],
}


@router.post(
    "/logs",
    openapi_extra=_openapi(
        message="opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest",
        example=_LOGS_EXAMPLE,
        accepted="Accepted. `partialSuccess` counts the log records that were not kept (not GenAI events, or "
        "without a trace and span id) and says why.",
        partial={"rejectedLogRecords": "2", "errorMessage": "2 of 5 log records not kept: 2 are not GenAI "
                 "events (only gen_ai.* message, choice and inference events are stored)"},
    ),
    summary="OTLP/HTTP log export: GenAI events become their span's prompt and response",
    description="Point an OTLP/HTTP log exporter here (`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=http://<host>:8000/v1/logs`, "
    "same key header as /v1/traces). GenAI events (`gen_ai.system.message`, `gen_ai.user.message`, "
    "`gen_ai.assistant.message`, `gen_ai.tool.message`, `gen_ai.choice`, `gen_ai.client.inference.operation.details`, "
    "OpenLLMetry's `gen_ai.content.prompt` / `gen_ai.content.completion`; the name in the record's `event_name` or "
    "its `event.name` attribute) are joined to their span by trace and span id and fill its prompt (system, user, "
    "assistant and tool messages, in order) and response (the choices) when the span has none, scanned for PII and "
    "injection like any prompt. The span may arrive before or after its events: events wait up to "
    "OTLP_LOG_PENDING_SECONDS for it. Other log records are counted in `partialSuccess` and not kept.",
)
def post_logs(request):
    read = _read(request, decode_logs_request)
    if isinstance(read, HttpResponse):
        return read
    encoding, media, _, export = read
    mapped = map_logs_request(export)
    result = content_ingest(project=request.auth.project, items=mapped.contents)
    rejected = mapped.other_records + mapped.unjoinable + result.unmatched
    metrics_record_log_events(outcome="rejected", count=mapped.other_records + mapped.unjoinable)
    reasons = []
    if mapped.other_records:
        reasons.append(f"{mapped.other_records} are not GenAI events (only gen_ai.* message, choice and inference "
                       "events are stored, as their span's prompt and response)")
    if mapped.unjoinable:
        reasons.append(f"{mapped.unjoinable} GenAI events have no valid trace and span id to join them to a span")
    if result.unmatched:
        reasons.append(f"{result.unmatched} GenAI events name a span id stored under another trace id")
    message = ""
    if rejected:
        total = mapped.other_records + mapped.genai_records
        message = f"{rejected} of {total} log records not kept: " + "; ".join(reasons)
    metrics_record_otlp(encoding=encoding, code=200)
    return _answer(200, encode_logs_response(rejected=rejected, message=message, encoding=encoding), media)


_METRICS_EXAMPLE = {
    "resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "support-bot"}}]},
        "scopeMetrics": [{
            "scope": {"name": "opentelemetry.instrumentation.openai_v2"},
            "metrics": [{
                "name": "gen_ai.client.token.usage", "unit": "{token}",
                "histogram": {"aggregationTemporality": 2, "dataPoints": [{
                    "startTimeUnixNano": "1795682400000000000", "timeUnixNano": "1795682460000000000",
                    "count": "1", "sum": 812, "bucketCounts": ["0", "1"], "explicitBounds": [1024],
                    "attributes": [{"key": "gen_ai.token.type", "value": {"stringValue": "input"}}]}]},
            }],
        }],
    }],
}
_NOT_STORED = ("metrics are not stored by llm-observe; set PROMETHEUS_OTLP_URL (e.g. "
               "http://prometheus:9090/api/v1/otlp/v1/metrics, Prometheus started with --web.enable-otlp-receiver) "
               "to forward them to Prometheus, or stop exporting metrics to this endpoint")


@router.post(
    "/metrics",
    openapi_extra=_openapi(
        message="opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest",
        example=_METRICS_EXAMPLE,
        accepted="Forwarded to Prometheus, or (no PROMETHEUS_OTLP_URL) not stored: then `partialSuccess` counts "
        "every data point as rejected and says how to enable forwarding.",
        partial={"rejectedDataPoints": "1", "errorMessage": _NOT_STORED},
        extra={"503": {"description": "PROMETHEUS_OTLP_URL is set and Prometheus is unreachable or failing "
                       "(Retry-After; google.rpc.Status in the request's encoding)"}},
    ),
    summary="OTLP/HTTP metric export: forwarded to Prometheus when configured",
    description="Never a 404 for exporters that send metrics beside traces and logs. llm-observe stores no OTLP "
    "metrics itself (its own Prometheus metrics of the spans are at /metrics). With `PROMETHEUS_OTLP_URL` set to "
    "Prometheus's native OTLP receiver (`http://<prometheus>:9090/api/v1/otlp/v1/metrics`, Prometheus started "
    "with `--web.enable-otlp-receiver`) the body is forwarded as received (decompressed, same Content-Type) with "
    "a short timeout (PROMETHEUS_OTLP_TIMEOUT_SECONDS): 200 once Prometheus took it, 200 with `partialSuccess` "
    "when Prometheus refused it (4xx, its reason in the message), 503 with Retry-After when Prometheus is "
    "unreachable or failing. Without it: 200 with `partialSuccess` rejecting every data point, and a message "
    "saying how to enable forwarding.",
)
def post_metrics(request):
    read = _read(request, decode_metrics_request)
    if isinstance(read, HttpResponse):
        return read
    encoding, media, data, export = read
    points = count_data_points(export)
    if not forward_url():
        message = _NOT_STORED if points else ""
        metrics_record_otlp(encoding=encoding, code=200)
        return _answer(200, encode_metrics_response(rejected=points, message=message, encoding=encoding), media)
    forwarded = metrics_forward(body=data, media=media)
    if forwarded.unavailable:
        response = _error(503, f"{forwarded.unavailable}; nothing was stored, retry", encoding, media)
        response["Retry-After"] = "5"
        return response
    rejected, message = (0, "") if forwarded.ok else (points, f"Prometheus refused the metrics: {forwarded.refused}")
    metrics_record_otlp(encoding=encoding, code=200)
    return _answer(200, encode_metrics_response(rejected=rejected, message=message, encoding=encoding), media)
