"""HTTP routes of scores: parse, authenticate, call one service or selector, answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from ninja import Field, Query, Router, Schema, Status

from ingest.auth import API_KEY_AUTH
from ingest.bodies import BodyError, read_body, require_json
from ingest.schemas import ErrorOut
from ingest.selectors.scores import ScoreFilters, score_list
from ingest.selectors.spans import BadCursor, as_utc
from ingest.services.scores import MAX_BATCH, MAX_COMMENT, SOURCES, score_delete, scores_ingest

router = Router(tags=["scores"], auth=API_KEY_AUTH)


class ScoreIn(Schema):
    """One score. Its type is fixed per name by the project's score config (admin: Score configs); a name
    without one takes numbers (numeric) and true/false (boolean)."""

    id: str | None = Field(None, max_length=128, description="idempotency id: a score re-sent with the same id "
                           "is stored once. Made by the appliance when absent")
    name: str = Field(max_length=200, examples=["helpfulness"])
    value: float | bool | str = Field(description="a number, true/false, or a category of the name's config")
    comment: str | None = Field(None, max_length=MAX_COMMENT, description="scanned for PII, redacted before storage")
    comment_pii: bool = Field(False, description="the client found PII in the comment and redacted it (the SDK does)")
    source: str | None = Field(None, description=f"one of {', '.join(SOURCES)}; default api")
    timestamp: datetime | None = Field(None, description="when the judgement was made; default now")
    span_id: str | None = Field(None, max_length=128)
    trace_id: str | None = Field(None, max_length=128)
    session_id: str | None = Field(None, max_length=200, description="at least one of span_id, trace_id, session_id")


class ScoreOut(Schema):
    id: str
    name: str
    data_type: str = Field(description="numeric, boolean or categorical")
    value: float | bool | str
    comment: str | None = None
    comment_pii: bool = Field(description="PII was found in the comment and redacted")
    source: str
    author: str | None = Field(None, description="key:<api key id> or user:<name>")
    span_id: str | None = None
    trace_id: str | None = None
    session_id: str | None = None
    created_at: datetime
    received_at: datetime


class ScorePage(Schema):
    items: list[ScoreOut]
    next_cursor: str | None = None


class RejectedScore(Schema):
    index: int
    id: str | None = None
    rule: str = Field(description="missing_field, missing_target, unknown_field, invalid_type, invalid_value, "
                      "too_long, wrong_type, out_of_range, unknown_category, unconfigured_categorical")
    field: str | None = None
    reason: str


class ScoresAccepted(Schema):
    success: bool = True
    accepted: int = Field(description="scores stored now or already stored (re-sent ids)")
    duplicates: int = Field(0, description="scores whose id was already stored; not stored twice")
    ids: list[str] = Field(description="the ids of the accepted scores, in order")
    rejected: list[RejectedScore] = Field(default_factory=list)


class ScoresError(Schema):
    error: str
    rule: str
    field: str | None = None
    rejected: list[RejectedScore] | None = None


_EXAMPLES = {
    "one": {"summary": "End-user thumbs-up on a trace", "value": {
        "id": "fb-7f3c", "name": "user_feedback", "value": True, "comment": "spot on",
        "trace_id": "9b0e7c55-2f43-4a0c-8a8e-6f0d9a1b2c3d"}},
    "batch": {"summary": "A batch: a rating of a span and a category of a session", "value": {"scores": [
        {"name": "helpfulness", "value": 4, "span_id": "3f1c2a9e-8d1b-4a57-9c0e-1f2d3c4b5a69"},
        {"name": "tone", "value": "polite", "session_id": "sess-42", "source": "annotation"}]}},
}
_SCORE_SCHEMA = ScoreIn.model_json_schema(ref_template="#/components/schemas/{model}")
_SCORE_SCHEMA.pop("$defs", None)
_SCORES_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {
            "schema": {"oneOf": [
                _SCORE_SCHEMA,
                {"type": "object", "required": ["scores"], "properties": {
                    "scores": {"type": "array", "items": _SCORE_SCHEMA, "minItems": 1, "maxItems": MAX_BATCH}}},
            ]},
            "examples": _EXAMPLES,
        }},
    }
}


def _read_scores(request) -> list[Any]:
    require_json(request)
    data = read_body(request)
    if not data.strip():
        raise BodyError(400, "empty_body", "the body is empty; send a score object or {\"scores\": [...]}")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if isinstance(payload, dict) and set(payload) == {"scores"}:
        payload = payload["scores"]
        if not isinstance(payload, list):
            raise BodyError(400, "invalid_body", "`scores` must be an array of score objects")
    elif isinstance(payload, dict):
        return [payload]
    if not isinstance(payload, list):
        raise BodyError(400, "invalid_body", "body must be a score object, an array or {\"scores\": [...]}")
    if not payload:
        raise BodyError(400, "empty_batch", "the batch holds no scores")
    if len(payload) > MAX_BATCH:
        raise BodyError(413, "too_many_scores", f"{len(payload)} scores in one request; the limit is {MAX_BATCH}")
    return payload


@router.post(
    "/scores",
    response={202: ScoresAccepted, 400: ScoresError, 413: ErrorOut, 415: ErrorOut, 503: ErrorOut},
    openapi_extra=_SCORES_BODY,
    summary="Record one score or a batch",
    description=f"One score object, an array or `{{\"scores\": [...]}}` of up to {MAX_BATCH}. Answers 202 once "
    "stored. Invalid scores of a batch are listed in `rejected` with a rule code; the valid ones are stored. "
    "A score may name a span or trace that has not arrived yet: it is kept and found by the same ids.",
)
def post_scores(request):
    try:
        items = _read_scores(request)
    except BodyError as exc:
        return Status(exc.status, {"error": exc.message, "rule": exc.rule})
    result = scores_ingest(project=request.auth.project, items=items, author=f"key:{request.auth.api_key_id}")
    rejected = [r.as_dict() for r in result.rejected]
    if result.accepted == 0:
        first = result.rejected[0]
        return Status(400, {"error": f"no valid score: {first.reason}", "rule": first.rule, "field": first.field,
                            "rejected": rejected})
    return Status(202, {"success": True, "accepted": result.accepted, "duplicates": result.duplicates,
                        "ids": result.ids, "rejected": rejected})


@router.get("/scores", response={200: ScorePage, 400: ErrorOut}, summary="List scores, newest first")
def get_scores(
    request,
    start: datetime | None = Query(None, alias="from", description="ISO 8601, inclusive (the score's timestamp)"),
    end: datetime | None = Query(None, alias="to", description="ISO 8601, exclusive"),
    name: str | None = None,
    source: str | None = Query(None, description=", ".join(SOURCES)),
    trace_id: str | None = None,
    span_id: str | None = None,
    session_id: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=1000),
):
    texts = {"name": name, "source": source, "trace_id": trace_id, "span_id": span_id, "session_id": session_id,
             "cursor": cursor}
    bad = next((key for key, value in texts.items() if value and "\x00" in value), None)
    if bad:
        return Status(400, {"error": "NUL characters are not allowed", "rule": "invalid_value", "field": bad})
    try:
        start, end = as_utc(start), as_utc(end)
    except ValueError as exc:
        return Status(400, {"error": str(exc), "rule": "invalid_value", "field": "from"})
    filters = ScoreFilters(start=start, end=end, name=name, source=source, trace_id=trace_id, span_id=span_id,
                           session_id=session_id)
    try:
        items, next_cursor = score_list(project_id=request.auth.project.id, filters=filters, limit=limit,
                                        cursor=cursor)
    except BadCursor as exc:
        return Status(400, {"error": str(exc), "rule": "invalid_cursor", "field": "cursor"})
    return Status(200, {"items": items, "next_cursor": next_cursor})


@router.delete("/scores/{score_id}", response={204: None, 404: ErrorOut}, summary="Delete one score by id")
def delete_score(request, score_id: str):
    if "\x00" in score_id or not score_delete(project_id=request.auth.project.id, score_id=score_id):
        return Status(404, {"error": "no score with this id in your project", "rule": "not_found", "field": "id"})
    return Status(204, None)
