"""docker-compose.prod-all.yaml's topology, run here as processes: what the compose file describes.

There is no container engine, so each app container of the file becomes a `manage.py` process
tree with its own DATA_DIR (its volume), started with the file's own `command` and environment:
the worker (prepares the database, prints the first key, Celery worker and beat), two web
replicas and two consumer replicas (the file's default replica counts), all on one PostgreSQL
(the embedded one standing in for the postgres service), one Valkey (redis) and a Tansu broker
(kafka). Replaced for a host without containers: the service names by 127.0.0.1 and free ports,
`--bind 0.0.0.0` by 127.0.0.1 (METRICS_AUTH_TOKEN is set, so /metrics asks for it anyway), and a
TLS proxy in front of the production-mode webs by `X-Forwarded-Proto: https`.

Checks: spans posted to both webs are produced to Kafka, written by the consumers exactly once;
every container's /metrics refuses a scrape without the token and counts its own processes'
work with it (what prometheus-compose.yml sums over the replicas); SIGTERM stops each with 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.docker.test_compose import REQUIRED, interpolate
from tests.kafka_broker import SESSION_TIMEOUT_MS, TansuBroker, free_port
from tests.workers.processes import Stack, kill_group, new_data_dir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "docker-compose.prod-all.yaml"
TOKEN = REQUIRED["docker-compose.prod-all.yaml"]["METRICS_AUTH_TOKEN"]
PROXY = {"X-Forwarded-Proto": "https"}


class Container:
    """One app container of the compose file as a process tree: `manage.py <its command>`."""

    def __init__(self, name: str, command: list[str], env: dict, data_dir: Path, log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        self.command = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in command]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "DATA_DIR": str(data_dir), "PORT": str(self.port)}
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Container:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "manage.py", *self.command], cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.output()[-4000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise AssertionError(f"{self.name} not healthy in {timeout:.0f}s:\n{self.output()[-4000:]}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(90)


@pytest.fixture
def topology(tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = interpolate(compose, REQUIRED["docker-compose.prod-all.yaml"])["services"]
    stack = Stack(new_data_dir("prod-all"), tmp_path).start()
    broker = TansuBroker(tmp_path / "tansu.log")
    broker.start()
    base = {k: v for k, v in os.environ.items() if k not in (
        "DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "WITH_KAFKA",
        "PROMETHEUS_MULTIPROC_DIR", "DATA_DIR", "PORT", "BIND_HOST", "METRICS_AUTH_TOKEN")}
    containers: dict[str, list[Container]] = {}
    try:
        for name in ("worker", "web", "consumer"):
            service = services[name]
            env = {**base, **{k: str(v) for k, v in service["environment"].items()},
                   "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url,
                   "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "TRUST_X_FORWARDED_PROTO": "1",
                   # Small for two shared cores; Tansu joins a group in half the session timeout.
                   "WEB_WORKERS": "1", "WORKER_CONCURRENCY": "1", "KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
                   "PYTHONUNBUFFERED": "1"}
            replicas = int(service.get("deploy", {}).get("replicas", 1))
            containers[name] = [Container(f"{name}-{i + 1}", service["command"], env, tmp_path / f"{name}-{i + 1}",
                                          tmp_path) for i in range(replicas)]
        yield stack, broker, containers
    finally:
        for group in containers.values():
            for container in group:
                kill_group(container.proc)
        broker.close()
        stack.close()
        shutil.rmtree(stack.data_dir, ignore_errors=True)


def test_prod_all_topology_as_processes(topology):
    stack, broker, containers = topology
    assert [len(containers[n]) for n in ("worker", "web", "consumer")] == [1, 2, 2]  # the file's defaults
    worker = containers["worker"][0].start()
    worker.wait_healthy(240)  # migrations on a new database first
    key = re.search(r"API key \(default\)\s*:\s*(llmo_\S+)", worker.output()).group(1)
    webs, consumers = containers["web"], containers["consumer"]
    for container in webs + consumers:
        container.start()
    for container in webs + consumers:
        container.wait_healthy(120)
    assert "applying migrations" not in "".join(c.output() for c in webs + consumers)  # --skip-prepare

    # The consumers create the topics (the compose file's Kafka does not); wait for them.
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    deadline = time.monotonic() + 60
    while "llm.spans.raw" not in admin.list_topics(timeout=5).topics:
        assert time.monotonic() < deadline, "the consumers did not create llm.spans.raw"
        time.sleep(1)

    auth = {"Authorization": f"Bearer {key}", **PROXY}
    run = uuid.uuid4().hex[:8]
    sent = 0
    for batch in range(6):
        web = webs[batch % 2]
        spans = [{"span_id": f"{run}-{batch}-{i}", "trace_id": f"{run}-t{batch}-{i}", "model": "gpt-4o-mini",
                  "provider": "openai", "service_name": "prod-all", "prompt_tokens": 10, "completion_tokens": 2}
                 for i in range(10)]
        answer = httpx.post(f"{web.url}/v1/spans", headers=auth, json=spans, timeout=30)
        assert answer.status_code == 202, answer.text
        sent += len(spans)

    project = stack.query("SELECT id FROM ingest_project WHERE name = 'default'")[0][0]
    deadline = time.monotonic() + 90
    while True:
        stored, distinct = stack.query("SELECT count(*), count(DISTINCT span_id) FROM ingest_span "
                                       "WHERE project_id = %s AND span_id LIKE %s", [project, f"{run}-%"])[0]
        if stored >= sent or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (stored, distinct) == (sent, sent)

    for container in webs + consumers + [worker]:
        assert httpx.get(f"{container.url}/metrics", timeout=10).status_code == 401, container.name
    assert [w.metric("llm_kafka_spans_produced_total") for w in webs] == [sent / 2, sent / 2]
    assert sum(c.metric("llm_kafka_spans_stored_total") for c in consumers) == sent
    assert worker.metric("llm_kafka_spans_stored_total") == 0  # no consumer in the worker (--no-consumer)

    for container in webs + consumers + [worker]:
        assert container.stop() == 0, f"{container.name}:\n{container.output()[-3000:]}"
