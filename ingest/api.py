"""HTTP routes of the ingest domain: parse, authenticate, call one service or selector, answer."""

from __future__ import annotations

from datetime import datetime

from ninja import Query, Router, Status

from ingest.auth import API_KEY_AUTH
from ingest.bodies import BodyError, read_json_spans
from ingest.kinds import SPAN_KINDS, kind_normalize
from ingest.schemas import SpanIn, ErrorOut, IngestAccepted, SpanPage, TraceOut
from ingest.selectors.spans import BadCursor, SpanFilters, as_utc, span_list, trace_get
from ingest.services.spans import spans_ingest

router = Router(tags=["spans"], auth=API_KEY_AUTH)

_SPAN_EXAMPLE = {
    "span_id": "3f1c2a9e-8d1b-4a57-9c0e-1f2d3c4b5a69",
    "trace_id": "9b0e7c55-2f43-4a0c-8a8e-6f0d9a1b2c3d",
    "model": "gpt-4o-2024-08-06",
    "provider": "openai",
    "service_name": "payment-bot",
    "endpoint": "/chat",
    "prompt_tokens": 812,
    "completion_tokens": 164,
    "latency_ms_total": 1834.2,
    "latency_ms_ttft": 412.0,
    "finish_reason": "stop",
    "status": "success",
    "timestamp_utc": "2026-11-26T10:15:00Z",
    "prompt": "Summarise the last three invoices",
    "response": "Here is a summary ...",
    "metadata": {"team": "billing"},
}

_SPAN_SCHEMA = SpanIn.model_json_schema(ref_template="#/components/schemas/{model}")
_SPAN_SCHEMA.pop("$defs", None)
_SPANS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _SPAN_SCHEMA,
                        {"type": "array", "items": _SPAN_SCHEMA, "minItems": 1, "maxItems": 1000},
                    ]
                },
                "example": [_SPAN_EXAMPLE],
            }
        },
    }
}


@router.post(
    "/spans",
    response={202: IngestAccepted, 400: ErrorOut, 413: ErrorOut, 415: ErrorOut, 503: ErrorOut},
    openapi_extra=_SPANS_BODY,
    summary="Ingest one span or a batch",
    description="One span object or an array of up to 1,000 (5 MB, gzip allowed). Answers 202 once stored. "
    "Invalid spans of a batch are listed in `rejected`; the valid ones are stored. Re-sent span_ids are not stored twice.",
)
def post_spans(request):
    try:
        items = read_json_spans(request)
    except BodyError as exc:
        return Status(exc.status, {"error": exc.message, "rule": exc.rule})
    result = spans_ingest(project=request.auth.project, items=items)
    rejected = [r.as_dict() for r in result.rejected]
    if result.accepted == 0:
        first = result.rejected[0]
        return Status(400, {"error": f"no valid span: {first.reason}", "rule": first.rule, "field": first.field, "rejected": rejected})
    return Status(202, {
        "success": True,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": rejected,
        "span_warnings": result.warnings,
    })


@router.get("/spans", response={200: SpanPage, 400: ErrorOut}, summary="List stored spans, newest first")
def get_spans(
    request,
    start: datetime | None = Query(None, alias="from", description="ISO 8601, inclusive"),
    end: datetime | None = Query(None, alias="to", description="ISO 8601, exclusive"),
    service: str | None = None,
    model: str | None = None,
    provider: str | None = None,
    status: str | None = None,
    trace_id: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    kind: str | None = Query(None, description="LLM, CHAIN, TOOL, AGENT, RETRIEVER, EMBEDDING, RERANKER, "
                             "GUARDRAIL, EVALUATOR or UNKNOWN"),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=1000),
):
    if kind is not None:
        canonical = kind_normalize(kind)
        if canonical is None:
            return Status(400, {"error": f"unknown kind; one of {', '.join(SPAN_KINDS)}", "rule": "invalid_value",
                                "field": "kind"})
        kind = canonical
    texts = {"service": service, "model": model, "provider": provider, "status": status, "trace_id": trace_id,
             "user_id": user_id, "session_id": session_id, "cursor": cursor}
    bad = next((name for name, value in texts.items() if value and "\x00" in value), None)
    if bad:
        return Status(400, {"error": "NUL characters are not allowed", "rule": "invalid_value", "field": bad})
    try:
        start, end = as_utc(start), as_utc(end)
    except ValueError as exc:
        return Status(400, {"error": str(exc), "rule": "invalid_value", "field": "from"})
    filters = SpanFilters(start=start, end=end, service=service, model=model, provider=provider,
                          status=status, trace_id=trace_id, user_id=user_id, session_id=session_id, kind=kind)
    try:
        items, next_cursor = span_list(project_id=request.auth.project.id, filters=filters, limit=limit, cursor=cursor)
    except BadCursor as exc:
        return Status(400, {"error": str(exc), "rule": "invalid_cursor", "field": "cursor"})
    return Status(200, {"items": items, "next_cursor": next_cursor})


@router.get("/traces/{trace_id}", response={200: TraceOut, 404: ErrorOut}, summary="One trace as a span tree")
def get_trace(request, trace_id: str):
    if "\x00" in trace_id:
        return Status(400, {"error": "NUL characters are not allowed", "rule": "invalid_value", "field": "trace_id"})
    trace = trace_get(project_id=request.auth.project.id, trace_id=trace_id)
    if trace is None:
        return Status(404, {"error": "no spans of this trace in your project", "rule": "not_found", "field": "trace_id"})
    return Status(200, trace)
