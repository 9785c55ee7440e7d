"""The sampling decision: which spans get a prompt hash and an embedding (shared with the appliance)."""

from __future__ import annotations

import hashlib
import uuid


def _digest(span_id: str) -> int:
    # 1.8.1's rule, kept bit for bit: the UUID's 16 bytes when the id parses as one.
    try:
        raw = uuid.UUID(span_id).bytes
    except ValueError:
        raw = span_id.encode("utf-8")
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def should_sample(span_id: str, rate_percent: float | None = None) -> bool:
    """Deterministic per span_id. rate None: the seed's `% 100 == 0` (about 1 %)."""
    digest = _digest(str(span_id))
    if rate_percent is None:
        return digest % 100 == 0
    if rate_percent <= 0:
        return False
    if rate_percent >= 100:
        return True
    return digest % 10_000 < round(rate_percent * 100)
