"""What crosses a process boundary: one frozen, versioned message per span.

The web process (producer) builds a `SpanMessage` from a prepared row, already
validated, priced, scanned and redacted; the consumer decodes it and stores the row
unchanged. A change of shape is a new class with a new version, never an edit of
this one: messages written by an older release may still sit in the topic.

The SDK's Kafka transport (`instrumentation_sdk._kafka`, which cannot import this
module) writes the same message with the headers below and `project_id` 0. Such a
message is a client's span, not a prepared row: the consumer resolves the project
from the key header and runs it through `spans_prepare` (validation, scanning with
the server's patterns, sampling, pricing) before storing it. Messages without
`HEADER_ORIGIN` come from the web process and are stored as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import orjson

SPAN_SCHEMA = "llm-observe.span"
# Headers of messages produced by the SDK straight to Kafka.
HEADER_ORIGIN = "llm-observe.origin"  # b"instrumentation-sdk/<version>": a client's span, to prepare
HEADER_KEY = "llm-observe.key"  # b"<key prefix>:<sha256 hex of the API key>": names the project
PROJECT_FROM_KEY = 0  # project_id of an SDK message: the key header decides


class ContractError(ValueError):
    """A message that does not satisfy its contract: the reason says what is wrong."""


# Validators per JSON type. bool is an int subclass in Python: kept apart on purpose.
def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, str) for i in v)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_datetime(v: Any) -> bool:
    return isinstance(v, str)  # parsed below


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanMessageV1:
    """One stored-ready span row (the columns of ingest_span), version 1."""

    SCHEMA: ClassVar[str] = SPAN_SCHEMA
    VERSION: ClassVar[int] = 1

    project_id: int
    span_id: str
    trace_id: str
    timestamp_utc: datetime
    received_at: datetime
    schema_version: int
    status: str
    is_sampled: bool
    retry_count: int
    pii_detected: bool
    injection_attempt: bool
    parent_span_id: str | None = None
    model: str | None = None
    provider: str | None = None
    service_name: str | None = None
    endpoint: str | None = None
    environment: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    token_count_method: str | None = None
    latency_ms_ttft: float | None = None
    latency_ms_total: float | None = None
    cost_usd_micro: int | None = None
    price_version: str | None = None
    attempted_models: list[str] | None = None
    matched_patterns: list[str] | None = None
    scan_status: str | None = None
    prompt: str | None = None
    response: str | None = None
    prompt_hash: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None

    # --- building -----------------------------------------------------------
    @classmethod
    def from_row(cls, row: dict) -> SpanMessageV1:
        """From a row of `spans_prepare`; a missing column is a programming error, said clearly."""
        try:
            return cls(**{name: row[name] for name in cls._fields()})
        except KeyError as exc:
            raise ContractError(f"row lacks the field {exc.args[0]!r} of {cls.__name__}") from None

    def to_row(self) -> dict:
        """The row to store: every column of ingest_span (those this version lacks are None)."""
        row = dict.fromkeys(FIELD_NAMES)
        row.update((name, getattr(self, name)) for name in self._fields())
        return row

    @classmethod
    def _fields(cls) -> dict[str, tuple]:
        return _FIELDS_BY_CLASS[cls]

    # --- wire format ----------------------------------------------------------
    def to_bytes(self) -> bytes:
        payload = {"schema": self.SCHEMA, "version": self.VERSION}
        payload.update((name, getattr(self, name)) for name in self._fields())
        # Datetimes as RFC 3339 with offset; non-string metadata keys as strings, like the jsonb column.
        return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> SpanMessageV1:
        payload, version = _payload(data, cls.SCHEMA)
        if version != cls.VERSION:
            raise ContractError(f"unsupported version {version!r} of {cls.SCHEMA} (this consumer reads {cls.VERSION})")
        return cls._from_payload(payload)

    @classmethod
    def _from_payload(cls, payload: dict) -> SpanMessageV1:
        fields = cls._fields()
        unknown = payload.keys() - fields.keys()
        if unknown:
            raise ContractError(f"unknown fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, (check, required) in fields.items():
            value = payload.get(name)
            if value is None:
                if required:
                    raise ContractError(f"missing field {name!r}")
                continue
            if not check(value):
                raise ContractError(f"field {name!r} has the wrong type ({type(value).__name__})")
            if check is _is_datetime:
                value = _parse_datetime(name, value)
            elif check is _is_float:
                value = float(value)
            values[name] = value
        if not values["span_id"] or not values["trace_id"]:
            raise ContractError("span_id and trace_id must not be empty")
        return cls(**values)


def _parse_datetime(name: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ContractError(f"field {name!r} is not an ISO 8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise ContractError(f"field {name!r} has no UTC offset")
    return parsed


_CHECKS = {
    int: _is_int, float: _is_float, bool: _is_bool, str: _is_str, datetime: _is_datetime,
    list: _is_str_list, dict: _is_dict,
}


def _fields_of(cls) -> dict[str, tuple]:
    import typing

    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
        base = typing.get_origin(args[0]) or args[0]
        required = f.default is dataclasses.MISSING
        fields[f.name] = (_CHECKS[base], required)
    return fields


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanMessageV2(SpanMessageV1):
    """Version 2: a span's name and kind, and the provider's response id that links two spans of one call."""

    VERSION: ClassVar[int] = 2

    name: str | None = None
    kind: str | None = None
    response_id: str | None = None
    duplicate_of: str | None = None


_FIELDS_BY_CLASS = {cls: _fields_of(cls) for cls in (SpanMessageV1, SpanMessageV2)}
# The current message, what producers write; consumers read every version below.
SpanMessage = SpanMessageV2
FIELD_NAMES = tuple(_FIELDS_BY_CLASS[SpanMessage])
_BY_VERSION = {cls.VERSION: cls for cls in _FIELDS_BY_CLASS}


def span_message_from_bytes(data: bytes | None) -> SpanMessageV1:
    """Decode a message of any version this release reads (older ones may still sit in the topic)."""
    payload, version = _payload(data, SPAN_SCHEMA)
    cls = _BY_VERSION.get(version)
    if cls is None:
        raise ContractError(f"unsupported version {version!r} of {SPAN_SCHEMA} (this consumer reads "
                            f"{', '.join(str(v) for v in sorted(_BY_VERSION))})")
    return cls._from_payload(payload)


def _payload(data: bytes | None, schema_name: str) -> tuple[dict, Any]:
    if not data:
        raise ContractError("empty message")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ContractError(f"not a JSON object but {type(payload).__name__}")
    schema, version = payload.pop("schema", None), payload.pop("version", None)
    if schema != schema_name:
        raise ContractError(f"schema is {schema!r}, expected {schema_name!r}")
    return payload, version
