"""Readiness of the parts the appliance needs: database, broker, at least one worker."""

from __future__ import annotations

import redis
from django.conf import settings
from django.db import connection

WORKER_KEY_PREFIX = "llmobs:worker:"


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)


def check_database() -> str:
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        return f"error: {type(exc).__name__}"


def check_broker() -> str:
    try:
        _redis().ping()
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}"


def check_worker() -> str:
    try:
        alive = next(iter(_redis().scan_iter(match=WORKER_KEY_PREFIX + "*", count=100)), None)
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}"
    return "ok" if alive else "no worker heartbeat"


def health() -> dict:
    state = {"database": check_database(), "broker": check_broker(), "worker": check_worker()}
    state["status"] = "ok" if all(v == "ok" for v in state.values()) else "degraded"
    return state
