"""get_embedding: the appliance's MiniLM embedding of a text, or None."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from instrumentation_sdk._config import get_config
from instrumentation_sdk._transport import HttpTransport, TransportError

log = logging.getLogger("instrumentation_sdk")

TIMEOUT_S = 0.5
DIMENSIONS = 384


def _valid(vector: Any) -> list[float] | None:
    if isinstance(vector, list) and len(vector) == DIMENSIONS and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
        return [float(v) for v in vector]
    return None


def get_embedding_sync(text: str, *, timeout: float = TIMEOUT_S) -> list[float] | None:
    """POST {url}/v1/embeddings/embed {text}; 384 floats, or None on any failure (timeout 500 ms)."""
    cfg = get_config()
    if not cfg.url or not isinstance(text, str) or not text:
        return None
    deadline = time.monotonic() + timeout
    try:
        transport = HttpTransport(cfg.url, cfg.api_key, timeout)
        try:
            reply = transport.request("POST", "/v1/embeddings/embed", body=json.dumps({"text": text}).encode())
        finally:
            transport.close()
    except (TransportError, ValueError, OSError) as exc:
        log.debug("llm-observe: embedding failed: %s", exc)
        return None
    if time.monotonic() > deadline + 0.05 or reply.status != 200 or not isinstance(reply.body, dict):
        return None
    return _valid(reply.body.get("embedding"))


async def get_embedding(text: str) -> list[float] | None:
    """`vector = await get_embedding("...")`: 384 floats or None (never raises, 500 ms at most)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(get_embedding_sync, text), TIMEOUT_S + 0.1)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - timeout, no loop thread, anything: None
        return None
