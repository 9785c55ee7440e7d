"""GET /healthz: the Kafka cluster is part of readiness when KAFKA_BOOTSTRAP_SERVERS is set (real Tansu broker)."""

from __future__ import annotations

import time

import pytest

from appliance import health as health_module
from tests.kafka_broker import free_port, kafka_broker  # noqa: F401 - fixture


@pytest.fixture(autouse=True)
def _fresh_kafka_answer():
    health_module.kafka_health_reset()
    yield
    health_module.kafka_health_reset()


def test_without_kafka_there_is_no_kafka_entry(client, db, settings):
    settings.KAFKA_BOOTSTRAP_SERVERS = None
    body = client.get("/healthz").json()
    assert "kafka" not in body
    assert body["database"] == "ok" and body["broker"] == "ok"


def test_reachable_broker_is_ok_then_a_dead_one_degrades_after_the_cache(client, db, settings, kafka_broker,
                                                                         monkeypatch):
    settings.KAFKA_BOOTSTRAP_SERVERS = kafka_broker.bootstrap
    monkeypatch.setattr(health_module, "KAFKA_CACHE_SECONDS", 1.0)
    assert client.get("/healthz").json()["kafka"] == "ok"

    kafka_broker.stop()
    # Within the cache window the broker is not asked again: still the last answer, and fast.
    started = time.monotonic()
    assert client.get("/healthz").json()["kafka"] == "ok"
    assert time.monotonic() - started < 0.5

    time.sleep(1.1)
    started = time.monotonic()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["kafka"].startswith("error: ") and response.json()["status"] == "degraded"
    assert time.monotonic() - started < health_module.KAFKA_TIMEOUT_SECONDS + 1.0  # a short timeout, not a hang

    kafka_broker.start()  # same port: the kept client reconnects
    time.sleep(1.1)
    deadline = time.monotonic() + 10
    while client.get("/healthz").json()["kafka"] != "ok":
        assert time.monotonic() < deadline, "the broker is back but /healthz does not say so"
        time.sleep(0.5)


def test_nothing_listening_is_an_error_not_a_hang(client, db, settings):
    settings.KAFKA_BOOTSTRAP_SERVERS = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    body = client.get("/healthz").json()
    assert body["kafka"].startswith("error: ") and body["status"] == "degraded"
    assert time.monotonic() - started < health_module.KAFKA_TIMEOUT_SECONDS + 1.0


def test_probes_are_cached_per_window(db, settings, kafka_broker, monkeypatch):
    settings.KAFKA_BOOTSTRAP_SERVERS = kafka_broker.bootstrap
    calls = []
    real = health_module._probe_kafka
    monkeypatch.setattr(health_module, "_probe_kafka", lambda key: calls.append(key) or real(key))
    assert [health_module.check_kafka() for _ in range(20)] == ["ok"] * 20
    assert len(calls) == 1
