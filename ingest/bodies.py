"""Reading a JSON request body within the ingest limits (size, gzip, batch length)."""

from __future__ import annotations

import zlib

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig


class BodyError(Exception):
    def __init__(self, status: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.status, self.rule, self.message = status, rule, message


def _too_big() -> BodyError:
    return BodyError(413, "body_too_large", f"request body over {settings.INGEST_MAX_BYTES} bytes; send smaller batches")


def _inflate(data: bytes, encoding: str) -> bytes:
    limit = settings.INGEST_MAX_BYTES
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)  # bounded: no decompression bombs
    except zlib.error as exc:
        raise BodyError(400, "invalid_encoding", f"body is not valid {encoding}: {exc}") from None
    if len(out) > limit:
        raise _too_big()
    if not inflater.eof:
        raise BodyError(400, "invalid_encoding", f"body is a truncated {encoding} stream")
    return out


def read_body(request) -> bytes:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BodyError(400, "invalid_header", "Content-Length is not a number") from None
    if declared > settings.INGEST_MAX_BYTES:
        raise _too_big()
    try:
        data = request.body
    except RequestDataTooBig:
        raise _too_big() from None
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        data = _inflate(data, encoding)
    elif encoding not in ("", "identity"):
        raise BodyError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return data


def require_json(request) -> None:
    """415 unless the body is declared JSON, or not declared at all (1.8.1-era clients sent none)."""
    media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media and media not in ("application/json", "text/json") and not media.endswith("+json"):
        raise BodyError(415, "unsupported_media_type",
                        f"Content-Type {media!r} is not supported here; send application/json")


def read_json_spans(request) -> list:
    """The body as a list of span candidates: one object or an array of up to INGEST_MAX_SPANS."""
    require_json(request)
    data = read_body(request)
    if not data.strip():
        raise BodyError(400, "empty_body", "the body is empty; send a span object or an array of spans")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if isinstance(payload, dict):
        # {"spans": [...]} is accepted as well as a bare array.
        if isinstance(payload.get("spans"), list) and len(payload) == 1:
            payload = payload["spans"]
        else:
            return [payload]
    if not isinstance(payload, list):
        raise BodyError(400, "invalid_body", "body must be a span object or an array of span objects")
    if not payload:
        raise BodyError(400, "empty_batch", "the array holds no spans")
    if len(payload) > settings.INGEST_MAX_SPANS:
        raise BodyError(413, "too_many_spans", f"{len(payload)} spans in one request; the limit is {settings.INGEST_MAX_SPANS}")
    return payload
