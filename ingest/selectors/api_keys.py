"""Resolving an ingestion key to its project, with a short in-process cache.

The cache keeps the hot ingest path to zero extra queries; a revocation is seen
by every process within CONFIG_REFRESH_SECONDS (at once in the revoking one).
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from ingest.models import ApiKey, Project
from ingest.services.api_keys import hash_key, split_key

_cache: dict[str, tuple[float, "KeyCheck"]] = {}
_lock = threading.Lock()
_LAST_USED_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class KeyCheck:
    api_key_id: int | None
    project: Project | None
    revoked: bool


def api_key_cache_clear() -> None:
    with _lock:
        _cache.clear()


def api_key_check(*, raw_key: str) -> KeyCheck:
    """KeyCheck(project=None) for unknown keys; revoked=True for revoked ones."""
    return api_key_check_hashed(prefix=split_key(raw_key), digest=hash_key(raw_key))


def api_key_check_hashed(*, prefix: str | None, digest: str) -> KeyCheck:
    """The same check from a key's prefix and SHA-256 (what SDK messages on Kafka carry)."""
    now = time.monotonic()
    hit = _cache.get(digest)
    if hit is not None and now - hit[0] < settings.CONFIG_REFRESH_SECONDS:
        return hit[1]
    check = KeyCheck(None, None, False)
    if prefix:
        api_key = ApiKey.objects.select_related("project").filter(prefix=prefix).first()
        if api_key is not None and hmac.compare_digest(api_key.key_hash, digest):
            check = KeyCheck(api_key.id, api_key.project, api_key.revoked_at is not None)
            if not check.revoked and (api_key.last_used_at is None
                                      or timezone.now() - api_key.last_used_at > _LAST_USED_EVERY):
                ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now())
    with _lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[digest] = (now, check)
    return check
