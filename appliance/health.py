"""Readiness of the parts the appliance needs: database, broker, at least one worker, and Kafka if configured."""

from __future__ import annotations

import os
import threading
import time

import redis
from django.conf import settings
from django.db import connection

WORKER_KEY_PREFIX = "llmobs:worker:"
# A load balancer or orchestrator may probe every second from every replica: the Kafka
# answer is reused for this long, so the broker sees at most one metadata request per
# process per window, and a broker that is down costs one timeout per window, not per probe.
KAFKA_CACHE_SECONDS = 5.0
KAFKA_TIMEOUT_SECONDS = 1.5

_kafka_lock = threading.Lock()
_kafka_admin = None  # (key, AdminClient): kept, so a probe reuses its connection
_kafka_answer: tuple[tuple, float, str] | None = None  # (key, monotonic time, answer)


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


def _probe_kafka(key: tuple) -> str:
    """One metadata request: does a broker of KAFKA_BOOTSTRAP_SERVERS answer?"""
    global _kafka_admin
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from ingest.producer import kafka_config

    try:
        if _kafka_admin is None or _kafka_admin[0] != key:
            # The pid is part of the key: a forked child never uses its parent's client.
            _kafka_admin = (key, AdminClient(kafka_config()))
        admin = _kafka_admin[1]
        try:
            metadata = admin.list_topics(timeout=KAFKA_TIMEOUT_SECONDS)
        finally:
            admin.poll(0)  # serve queued client log lines (they are routed through Python logging)
    except KafkaException as exc:
        return f"error: {exc.args[0].name()}"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}"
    return "ok" if metadata.brokers else "error: no brokers"


def check_kafka() -> str:
    global _kafka_answer
    key = (os.getpid(), settings.KAFKA_BOOTSTRAP_SERVERS, settings.KAFKA_SECURITY_PROTOCOL)
    answer = _kafka_answer
    if answer is not None and answer[0] == key and time.monotonic() - answer[1] < KAFKA_CACHE_SECONDS:
        return answer[2]
    with _kafka_lock:  # concurrent probes of one process wait for one request
        answer = _kafka_answer
        if answer is None or answer[0] != key or time.monotonic() - answer[1] >= KAFKA_CACHE_SECONDS:
            answer = _kafka_answer = (key, time.monotonic(), _probe_kafka(key))
    return answer[2]


def kafka_health_reset() -> None:
    """Forget the cached answer and the client (tests)."""
    global _kafka_admin, _kafka_answer
    with _kafka_lock:
        _kafka_admin = _kafka_answer = None


def check_processes() -> str | None:
    """None when no supervisor runs here or all its processes run; else which are down and why."""
    from appliance.supervisor import read_state, state_file

    supervised = read_state(state_file(settings.DATA_DIR))
    if not supervised:
        return None
    down = [f"{name} {p.get('state')}" + (f" (last exit: {p['last_exit']})" if p.get("last_exit") else "")
            for name, p in sorted(supervised.get("processes", {}).items()) if p.get("state") != "running"]
    return "; ".join(down) or None


def health() -> dict:
    state = {"database": check_database(), "broker": check_broker(), "worker": check_worker()}
    if settings.KAFKA_BOOTSTRAP_SERVERS:
        state["kafka"] = check_kafka()
    processes = check_processes()
    if processes:
        state["processes"] = processes
    state["status"] = "ok" if all(v == "ok" for v in state.values()) else "degraded"
    return state
