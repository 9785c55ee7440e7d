"""POST /v1/search/similar: nearest sampled prompts to a text or to a span."""

from __future__ import annotations

from datetime import datetime

from ninja import Router, Schema, Status
from pydantic import Field

from ingest.auth import API_KEY_AUTH
from ingest.schemas import ErrorOut, SpanOut
from ingest.selectors.search import SearchError, search_similar
from ingest.selectors.spans import SpanFilters, as_utc

router = Router(tags=["search"], auth=API_KEY_AUTH)


class SimilarIn(Schema):
    text: str | None = Field(None, min_length=1, max_length=100_000, description="find prompts like this text")
    span_id: str | None = Field(None, min_length=1, max_length=128, description="...or like this span's prompt")
    k: int = Field(10, ge=1, le=100)
    start: datetime | None = Field(None, alias="from")
    end: datetime | None = Field(None, alias="to")
    service: str | None = None
    model: str | None = None
    provider: str | None = None

    model_config = {"populate_by_name": True,
                    "json_schema_extra": {"examples": [{"text": "refund for a late order", "k": 5, "service": "support-bot"}]}}


class SimilarItem(SpanOut):
    score: float = Field(description="cosine similarity, 1 = same meaning")


class SimilarOut(Schema):
    items: list[SimilarItem]


@router.post("/search/similar", response={200: SimilarOut, 400: ErrorOut, 404: ErrorOut},
             summary="Spans whose prompts are nearest in meaning (sampled, PII-free prompts only)")
def post_similar(request, body: SimilarIn):
    if any(v and "\x00" in v for v in (body.text, body.span_id, body.service, body.model, body.provider)):
        return Status(400, {"error": "NUL characters are not allowed", "rule": "invalid_value", "field": None})
    try:
        start, end = as_utc(body.start), as_utc(body.end)
    except ValueError as exc:
        return Status(400, {"error": str(exc), "rule": "invalid_value", "field": "from"})
    filters = SpanFilters(start=start, end=end, service=body.service, model=body.model, provider=body.provider)
    try:
        items = search_similar(project_id=request.auth.project.id, text=body.text, span_id=body.span_id,
                               k=body.k, filters=filters)
    except SearchError as exc:
        return Status(exc.status, {"error": exc.message, "rule": exc.rule, "field": exc.field})
    return Status(200, {"items": items})
