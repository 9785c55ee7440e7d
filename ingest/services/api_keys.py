"""Creating and revoking ingestion keys. The key itself is returned once and never stored."""

from __future__ import annotations

import hashlib
import secrets

from django.db import transaction
from django.utils import timezone

from ingest.models import ApiKey, Project

KEY_PREFIX = "llmo_"


def hash_key(raw_key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def split_key(raw_key: str) -> str | None:
    """The lookup prefix of a well-formed key, or None."""
    if not raw_key.startswith(KEY_PREFIX):
        return None
    parts = raw_key[len(KEY_PREFIX):].split("_", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0]


@transaction.atomic
def api_key_create(*, project: Project, name: str = "default") -> tuple[ApiKey, str]:
    prefix = secrets.token_hex(6)
    raw_key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(project=project, name=name, prefix=prefix, key_hash=hash_key(raw_key))
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    from ingest.selectors.api_keys import api_key_cache_clear

    api_key_cache_clear()
    return api_key


@transaction.atomic
def project_get_or_create(*, name: str) -> tuple[Project, bool]:
    return Project.objects.get_or_create(name=name)
