"""Shapes of what crosses the HTTP boundary. No logic beyond parsing and bounds."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from ninja import Schema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest.kinds import SPAN_KINDS, is_model_call, kind_normalize

FINISH_REASONS = (
    "stop", "length", "content_filter", "tool_calls", "error", "cancelled",
    "cache_hit", "client_disconnect", "unspecified",
)
# Provider spellings of the same reasons (Anthropic, Gemini, OTel GenAI).
FINISH_REASON_ALIASES = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "safety": "content_filter",
    "recitation": "content_filter",
    "canceled": "cancelled",
    "finish_reason_unspecified": "unspecified",
}
TOKEN_COUNT_METHODS = ("provider", "tiktoken", "estimated", "unspecified")
MAX_ID = 128
# How deep objects and arrays may nest inside one span (metadata, unknown keys). Checked before
# anything recursive reads the span: orjson serialises at most 254 levels, and nothing real nests 64.
MAX_DEPTH = 64


class SpanIn(BaseModel):
    """One span as sent by the SDK (schema_version 1). Unknown keys go to metadata."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    schema_version: Literal[1] = 1
    name: str | None = Field(None, max_length=500, description="what the span did, e.g. `chat gpt-4o`, a tool's name")
    kind: str | None = Field(None, description="LLM, CHAIN, TOOL, AGENT, RETRIEVER, EMBEDDING, RERANKER, "
                             "GUARDRAIL, EVALUATOR or UNKNOWN (any case). Only LLM, EMBEDDING and RERANKER "
                             "spans are priced. Absent: LLM when the span has a model or tokens, else UNKNOWN")
    response_id: str | None = Field(None, max_length=200, description="the provider's id of the answer: two "
                                    "spans of one trace with the same id are one call, counted once")
    span_id: str | None = Field(None, min_length=1, max_length=MAX_ID)
    trace_id: str | None = Field(None, min_length=1, max_length=MAX_ID)
    parent_span_id: str | None = Field(None, max_length=MAX_ID)
    timestamp_utc: datetime | None = None
    model: str | None = Field(None, max_length=200)
    provider: str | None = Field(None, max_length=64)
    service_name: str | None = Field(None, max_length=200)
    endpoint: str | None = Field(None, max_length=500)
    environment: str | None = Field(None, max_length=64)
    user_id: str | None = Field(None, max_length=200)
    session_id: str | None = Field(None, max_length=200)
    status: Literal["success", "error"] = "success"
    finish_reason: str | None = None
    prompt_tokens: int | None = Field(None, ge=0, le=100_000_000)
    completion_tokens: int | None = Field(None, ge=0, le=100_000_000)
    cached_tokens: int | None = Field(None, ge=0, le=100_000_000)
    reasoning_tokens: int | None = Field(None, ge=0, le=100_000_000)
    token_count_method: Literal["provider", "tiktoken", "estimated", "unspecified"] | None = None
    latency_ms_ttft: float | None = Field(None, ge=0, le=86_400_000)
    latency_ms_total: float | None = Field(None, ge=0, le=86_400_000)
    retry_count: int = Field(0, ge=0, le=1000)
    attempted_models: list[str] | None = Field(None, max_length=100)
    is_sampled: bool | None = None
    pii_detected: bool | None = None
    injection_attempt: bool | None = None
    prompt: str | None = None
    # 1.8.1's manual reports carry the prompt as "text".
    text: str | None = None
    response: str | None = None
    error_type: str | None = Field(None, max_length=200)
    error_message: str | None = Field(None, max_length=10_000)
    metadata: dict[str, Any] | None = None

    @field_validator("finish_reason", mode="before")
    @classmethod
    def _finish_reason(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be a string")
        lowered = value.strip().lower()
        lowered = FINISH_REASON_ALIASES.get(lowered, lowered)
        if lowered not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason {value!r}; one of {', '.join(FINISH_REASONS)}")
        return lowered

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> Any:
        if value is None:
            return None
        kind = kind_normalize(value)
        if kind is None:
            raise ValueError(f"unknown kind {value!r}; one of {', '.join(SPAN_KINDS)}")
        return kind

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            return {"ok": "success", "failed": "error", "failure": "error"}.get(lowered, lowered)
        return value

    @field_validator("span_id", "trace_id", "parent_span_id", "user_id", "session_id", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # An id with NUL cannot be stored as sent (PostgreSQL text has no NUL); changing it would
        # make a different id, so the span is refused instead.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("NUL characters are not allowed in ids")
        return value

    @field_validator("timestamp_utc", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> Any:
        # Epoch numbers: seconds, or milliseconds / nanoseconds when they are that large.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
            if seconds > 1e17:
                seconds /= 1e9
            elif seconds > 1e11:
                seconds /= 1e3
            try:
                return datetime.fromtimestamp(seconds, tz=timezone.utc)
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"{value!r} is not a time: send epoch seconds, milliseconds or nanoseconds "
                                 "of a date between the years 1 and 9999, or ISO 8601") from None
        return value


class RejectedSpan(Schema):
    index: int
    span_id: str | None = None
    rule: str
    field: str | None = None
    reason: str


class IngestAccepted(Schema):
    success: bool = True
    accepted: int = Field(description="spans stored now or already stored (re-sent span_ids)")
    duplicates: int = Field(0, description="spans whose span_id was already stored; not stored twice")
    rejected: list[RejectedSpan] = Field(default_factory=list)
    span_warnings: list[str] = Field(default_factory=list)


class ErrorOut(Schema):
    error: str
    rule: str
    field: str | None = None
    rejected: list[RejectedSpan] | None = None


class SpanOut(Schema):
    span_id: str
    trace_id: str
    parent_span_id: str | None
    timestamp_utc: datetime
    schema_version: int
    model: str | None
    provider: str | None
    service_name: str | None
    endpoint: str | None
    environment: str | None
    user_id: str | None
    session_id: str | None
    status: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    token_count_method: str | None
    latency_ms_ttft: float | None
    latency_ms_total: float | None
    cost_usd_micro: int | None
    price_version: str | None
    is_sampled: bool
    retry_count: int
    attempted_models: list[str] | None
    pii_detected: bool
    injection_attempt: bool
    matched_patterns: list[str] | None
    scan_status: str | None
    prompt: str | None
    response: str | None
    prompt_hash: str | None
    error_type: str | None
    error_message: str | None
    metadata: dict[str, Any] | None
    received_at: datetime
    name: str | None = None
    kind: str | None = None
    response_id: str | None = None
    duplicate_of: str | None = Field(None, description="the span of the same model call that carries its tokens "
                                     "and cost; this one is left out of sums, metrics and budgets")
    cost_status: str = Field("no_tokens", description="priced; estimated (tokens counted from the text: the "
                             "provider sent none); not_applicable (not a model call); duplicate (see "
                             "duplicate_of); unknown_price (model not in the price table); no_tokens")

    @staticmethod
    def resolve_cost_status(obj: Any) -> str:
        get = obj.get if isinstance(obj, dict) else lambda name: getattr(obj, name, None)
        return cost_status(kind=get("kind"), model=get("model"), duplicate_of=get("duplicate_of"),
                           cost=get("cost_usd_micro"), method=get("token_count_method"),
                           has_tokens=get("prompt_tokens") is not None or get("completion_tokens") is not None)


def cost_status(*, kind: str | None, model: str | None, duplicate_of: str | None, cost: int | None,
                method: str | None, has_tokens: bool) -> str:
    """Why a span has the cost it has (SpanOut.cost_status)."""
    if duplicate_of:
        return "duplicate"
    if not is_model_call(kind, model):
        return "not_applicable"
    if cost is not None:
        return "estimated" if method == "estimated" else "priced"
    return "unknown_price" if has_tokens else "no_tokens"


class SpanPage(Schema):
    items: list[SpanOut]
    next_cursor: str | None


class TraceNode(SpanOut):
    children: list["TraceNode"] = Field(default_factory=list)


class TraceOut(Schema):
    trace_id: str
    span_count: int
    roots: list[TraceNode]


class HealthOut(Schema):
    status: Literal["ok", "degraded"]
    database: str
    broker: str = Field(description="the Celery broker (Redis/Valkey)")
    worker: str
    kafka: str | None = Field(None, description="the Kafka cluster; only when KAFKA_BOOTSTRAP_SERVERS is set")
    processes: str | None = Field(None, description="supervised processes that are not running (restarting, "
                                  "stopped), while `manage.py serve` restarts them; absent when all run")
