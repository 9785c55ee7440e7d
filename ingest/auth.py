"""Ingestion keys on the API: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""

from __future__ import annotations

from ninja.security import APIKeyHeader, HttpBearer

from ingest.selectors.api_keys import KeyCheck, api_key_check


class RevokedKey(Exception):
    """A known key that was revoked: 403, not 401."""


def _resolve(raw_key: str) -> KeyCheck | None:
    raw_key = raw_key.strip()
    if not raw_key:
        return None
    check = api_key_check(raw_key=raw_key)
    if check.project is None:
        return None
    if check.revoked:
        raise RevokedKey()
    return check


class BearerKey(HttpBearer):
    def authenticate(self, request, token):
        return _resolve(token)


class HeaderKey(APIKeyHeader):
    param_name = "X-API-Key"

    def authenticate(self, request, key):
        return _resolve(key) if key else None


API_KEY_AUTH = [BearerKey(), HeaderKey()]
