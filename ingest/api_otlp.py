"""OTLP/HTTP trace receiver: POST /v1/traces, as any OpenTelemetry exporter sends it.

Answers follow the OTLP/HTTP specification: 200 with an ExportTraceServiceResponse
(partial_success when some spans were rejected), 400 for a body that does not
decode, 415 for a content type other than protobuf or JSON, each in the encoding
of the request. The spans go through spans_ingest like /v1/spans: same
validation, scanning, sampling, pricing and storage.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse
from ninja import Router

from ingest.auth import API_KEY_AUTH
from ingest.bodies import BodyError, read_body
from ingest.metrics import metrics_record_otlp
from ingest.otlp import JSON, PROTOBUF, OtlpDecodeError, decode_request, encode_response, encode_status, map_request
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

_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-protobuf": {
                "schema": {"type": "string", "format": "binary",
                           "description": "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest"},
            },
            "application/json": {
                "schema": {"type": "object", "description": "ExportTraceServiceRequest in the OTLP JSON encoding "
                           "(hex trace/span ids, lowerCamelCase keys)", "additionalProperties": True},
                "example": _EXAMPLE,
            },
        },
    },
    "responses": {
        "200": {
            "description": "Accepted. `partialSuccess` counts the spans that were rejected and says why.",
            "content": {
                "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": True},
                    "examples": {
                        "all accepted": {"value": {}},
                        "partial": {"value": {"partialSuccess": {
                            "rejectedSpans": "1",
                            "errorMessage": "1 of 3 spans rejected: eee19b7ec3c1b174: timestamp_too_old "
                                            "(older than the retention of 30 days)"}}},
                    },
                },
            },
        },
        "400": {"description": "The body does not decode (google.rpc.Status in the request's encoding)",
                "content": {"application/json": {"example": {"code": 3, "message": "body is not valid JSON"}}}},
        "413": {"description": "Body over INGEST_MAX_BYTES (after gzip)"},
        "415": {"description": "Content-Type is neither application/x-protobuf nor application/json"},
    },
}


def _answer(status: int, body: bytes, media: str) -> HttpResponse:
    # "The server MUST use the same Content-Type in the response as it received in the request."
    return HttpResponse(body, status=status, content_type=media)


def _error(status: int, message: str, encoding: str, media: str) -> HttpResponse:
    metrics_record_otlp(encoding=encoding, code=status)
    body = encode_status(code=_RPC_CODES.get(status, 2), message=message, encoding=encoding)
    return _answer(status, body, media)


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
    media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoding = CONTENT_TYPES.get(media)
    if encoding is None:
        return _error(415, f"Content-Type {media or '(none)'!r} is not supported; send application/x-protobuf "
                      "or application/json", JSON, _MEDIA[JSON])
    try:
        data = read_body(request)
        export = decode_request(data, encoding)
    except BodyError as exc:
        return _error(exc.status, exc.message, encoding, media)
    except OtlpDecodeError as exc:
        return _error(400, str(exc), encoding, media)

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
