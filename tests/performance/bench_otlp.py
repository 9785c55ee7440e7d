"""OTLP ingest benchmark: spans/s through POST /v1/traces (protobuf), next to POST /v1/spans (JSON) for the
same spans, and next to Arize Phoenix receiving the same OTLP payloads, on this machine, in one run.

    .venv/bin/python tests/performance/bench_otlp.py [--clients 3] [--batches 8] [--batch-size 512]
                                                     [--web-workers 2] [--no-phoenix]

Spans are made by the real OpenTelemetry SDK and encoded by its OTLP exporter's encoder: traces of an
HTTP server span, two GenAI chat spans (messages, tokens, cached tokens) and a tool span, batched like
the SDK's BatchSpanProcessor (512 spans). The /v1/spans bodies are the same spans as our ingest maps them
(into another project, so nothing counts as a duplicate).

Rates are spans durably stored per second: the appliance answers after commit; Phoenix answers before
storing (its insertion runs in the background), so its clock stops when its database holds every span.
Phoenix runs from its own venv (.data/phoenix-venv, created here with `pip install arize-phoenix` on first
use) with its default storage (SQLite in its working directory), after the appliance's web server has
stopped, so neither competes for the CPU with the other.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import run_parallel  # noqa: E402  (the same fork-and-start-together client pool)

PHOENIX_VENV = ROOT / ".data" / "phoenix-venv"
WORDS = ("invoice account balance refund shipping order customer policy summary translate "
         "explain contract clause payment delay status ticket escalate product warranty").split()
MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4", "anthropic"),
          ("gemini-2.5-flash", "gcp.gemini"), ("mistral-large", "mistral_ai")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


# --- spans ------------------------------------------------------------------------------
def make_payloads(total_spans: int, batch_size: int, seed: int = 42) -> list[bytes]:
    """OTLP protobuf ExportTraceServiceRequests of `batch_size` spans, made by the OpenTelemetry SDK."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode, use_span

    rng = random.Random(seed)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-support-bot",
                                                        "deployment.environment.name": "production"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench.otlp", "1.0")
    ms = 1_000_000
    base = time.time_ns() - 600_000 * ms
    while len(exporter.get_finished_spans()) < total_spans:
        t0 = base + rng.randint(0, 500_000) * ms
        root = tracer.start_span("POST /chat", kind=SpanKind.SERVER, start_time=t0, attributes={
            "http.request.method": "POST", "http.route": "/chat", "http.response.status_code": 200,
            "user.id": f"user-{rng.randint(1, 500)}"})
        with use_span(root, end_on_exit=False):
            offset = 5
            for _ in range(2):
                model, provider_name = rng.choice(MODELS)
                prompt_tokens = rng.randint(50, 4000)
                latency = rng.randint(200, 9000)
                chat = tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, start_time=t0 + offset * ms,
                                         attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider_name,
                    "gen_ai.request.model": model, "gen_ai.response.model": model,
                    "gen_ai.usage.input_tokens": prompt_tokens,
                    "gen_ai.usage.cache_read.input_tokens": rng.choice([0, 0, prompt_tokens // 2]),
                    "gen_ai.usage.output_tokens": rng.randint(10, 800),
                    "gen_ai.response.finish_reasons": ("stop",),
                    "gen_ai.response.time_to_first_chunk": rng.uniform(0.08, 0.9),
                    "gen_ai.conversation.id": f"sess-{rng.randint(1, 2000)}",
                    "gen_ai.input.messages": orjson.dumps([{"role": "user", "parts": [
                        {"type": "text", "content": _text(rng, rng.randint(60, 300))}]}]).decode(),
                    "gen_ai.output.messages": orjson.dumps([{"role": "assistant", "parts": [
                        {"type": "text", "content": _text(rng, rng.randint(30, 200))}], "finish_reason": "stop"}]
                    ).decode(),
                    "gen_ai.request.temperature": 0.2,
                })
                chat.set_status(Status(StatusCode.OK))
                chat.end(end_time=t0 + (offset + latency) * ms)
                offset += latency + 3
            tool = tracer.start_span("execute_tool lookup_order", start_time=t0 + offset * ms, attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
                "gen_ai.tool.call.arguments": orjson.dumps({"order": rng.randint(1, 10 ** 6)}).decode(),
                "gen_ai.tool.call.result": orjson.dumps({"status": "shipped"}).decode()})
            tool.end(end_time=t0 + (offset + 20) * ms)
        root.end(end_time=t0 + (offset + 40) * ms)
    spans = list(exporter.get_finished_spans())[:total_spans]
    return [encode_spans(spans[i:i + batch_size]).SerializeToString() for i in range(0, len(spans), batch_size)]


def _span_count(payload: bytes) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(payload)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# --- HTTP clients -------------------------------------------------------------------------
def http_client(port: int, path: str, headers: dict, bodies: list[bytes], ok: int, start, out) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    failures = retries = 0
    start.wait()
    for body in bodies:
        while True:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status == 503:  # at capacity: back off and resend, as an exporter would
                retries += 1
                time.sleep(0.05)
                continue
            if response.status != ok:
                failures += 1
            break
    out.put((failures, retries))


def run_clients(port: int, path: str, headers: dict, bodies: list[bytes], clients: int, ok: int,
                stored=None, expected: int = 0) -> tuple[float, float, int, int]:
    """(seconds until every request was answered, seconds until `stored()` reached `expected`, failures, retries)."""
    answered, results = run_parallel(http_client, [(port, path, headers, bodies[c::clients], ok)
                                                   for c in range(clients)])
    done = answered
    if stored is not None:
        polled = time.perf_counter()
        deadline = polled + 900
        while stored() < expected and time.perf_counter() < deadline:
            time.sleep(0.25)  # a light poll: the store under test should not be the one waiting
        done = answered + time.perf_counter() - polled
    return answered, done, sum(r[0] for r in results), sum(r[1] for r in results)


def wait_http(port: int, path: str, headers: dict, proc: subprocess.Popen, what: str, seconds: int = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited during start-up")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path, headers=headers)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not come up in {seconds} s")


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Phoenix --------------------------------------------------------------------------------
def phoenix_ready() -> Path:
    """The `phoenix` command of the separate venv, installed on first use."""
    python = PHOENIX_VENV / "bin" / "python"
    if not (PHOENIX_VENV / "bin" / "phoenix").exists():
        print(f"[phoenix] creating {PHOENIX_VENV} and installing arize-phoenix (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PHOENIX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "arize-phoenix"], check=True)
    version = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                              "print(version('arize-phoenix'))"], capture_output=True, text=True).stdout.strip()
    print(f"[phoenix] arize-phoenix {version}", flush=True)
    return PHOENIX_VENV / "bin" / "phoenix"


def bench_phoenix(payloads: list[bytes], warm: list[bytes], total: int, clients: int,
                  work_dir: Path) -> tuple[float, float, int, int, int]:
    phoenix = phoenix_ready()
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "DJANGO_"))}
    env.update(PHOENIX_WORKING_DIR=str(work_dir), PHOENIX_PORT=str(port), PHOENIX_GRPC_PORT=str(_free_port()),
               PHOENIX_TELEMETRY_ENABLED="false")
    log = open(work_dir / "phoenix.log", "wb")
    proc = subprocess.Popen([str(phoenix), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir)
    try:
        wait_http(port, "/healthz", {}, proc, "Phoenix", seconds=180)
        database = work_dir / "phoenix.db"

        def stored() -> int:
            try:
                with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
                    return db.execute("SELECT count(*) FROM spans").fetchone()[0]
            except sqlite3.Error:
                return 0

        # warm-up with other spans, then counted from what is there
        run_clients(port, "/v1/traces", {"Content-Type": "application/x-protobuf"}, warm, clients, 200,
                    stored, sum(_span_count(w) for w in warm))
        before = stored()
        print(f"[phoenix] {clients} client processes -> Phoenix on :{port} (SQLite in {work_dir})", flush=True)
        answered, done, failures, retries = run_clients(
            port, "/v1/traces", {"Content-Type": "application/x-protobuf", "x-project-name": "bench"}, payloads,
            clients, 200, lambda: stored() - before, total)
        return answered, done, failures, retries, stored() - before
    finally:
        stop(proc)
        log.close()


# --- main -------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="batches per client")
    parser.add_argument("--batch-size", type=int, default=512, help="spans per request (the SDK's default)")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--no-phoenix", action="store_true")
    args = parser.parse_args()
    total = args.clients * args.batches * args.batch_size

    data_dir = ROOT / ".data" / "bench-otlp"
    shutil.rmtree(data_dir, ignore_errors=True)
    os.environ.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="appliance.settings")
    for name in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(name, None)
    port = _free_port()
    os.environ["PORT"] = str(port)

    print(f"[setup] building {total:,} spans with the OpenTelemetry SDK, {args.batch_size} per request", flush=True)
    payloads = make_payloads(total, args.batch_size)
    warm = make_payloads(args.web_workers * 4 * args.batch_size, args.batch_size, seed=7)
    otlp_bytes = sum(len(p) for p in payloads)

    import django

    print(f"[setup] fresh embedded PostgreSQL in {data_dir}", flush=True)
    django.setup()  # this process starts (and at exit stops) the embedded servers
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from ingest.models import Project
    from ingest.otlp import map_request
    from ingest.services.api_keys import api_key_create

    call_command("migrate", verbosity=0)
    call_command("load_config", verbosity=0)
    call_command("maintain_partitions", verbosity=0)
    keys = {}
    projects = {}
    for name in ("otlp", "json", "warm"):
        projects[name] = Project.objects.create(name=f"bench-{name}")
        keys[name] = api_key_create(project=projects[name])[1]

    # The same spans as /v1/spans JSON bodies: mapped exactly as the OTLP route maps them.
    json_bodies = []
    for payload in payloads:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        json_bodies.append(orjson.dumps(map_request(request).spans))
    json_bytes = sum(len(b) for b in json_bodies)
    connection.close()

    def stored(project) -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest_span WHERE project_id = %s", [project.id])
            return cur.fetchone()[0]

    env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL, "REDIS_URL": settings.REDIS_URL}
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--skip-prepare", "--no-worker", "--web-workers", str(args.web_workers)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_http(port, "/v1/spans?limit=1", {"Authorization": f"Bearer {keys['warm']}"}, server, "the appliance")
        pb_headers = {"Content-Type": "application/x-protobuf"}
        run_clients(port, "/v1/traces", {**pb_headers, "Authorization": f"Bearer {keys['warm']}"}, warm,
                    args.clients, 200)
        run_clients(port, "/v1/spans", {"Content-Type": "application/json",
                                        "Authorization": f"Bearer {keys['warm']}"},
                    [orjson.dumps(map_request(ExportTraceServiceRequest.FromString(w)).spans) for w in warm],
                    args.clients, 202)
        for label, path, headers, bodies, ok, project in (
            ("otlp", "/v1/traces", {**pb_headers, "Authorization": f"Bearer {keys['otlp']}"}, payloads, 200,
             projects["otlp"]),
            ("json", "/v1/spans", {"Content-Type": "application/json", "Authorization": f"Bearer {keys['json']}"},
             json_bodies, 202, projects["json"]),
        ):
            print(f"[{label}] {args.clients} client processes -> POST {path} ({args.web_workers} gunicorn workers)",
                  flush=True)
            answered, _, failures, retries = run_clients(port, path, headers, bodies, args.clients, ok)
            count = stored(project)
            connection.close()
            results[label] = (count / answered, answered, failures, count)
    finally:
        stop(server)

    phoenix = None
    if not args.no_phoenix:
        answered, done, failures, retries, count = bench_phoenix(payloads, warm, total, args.clients,
                                                                 data_dir / "phoenix")
        phoenix = (count / done, done, answered, failures, retries, count)

    print()
    print(f"spans per run              : {total:,} in {len(payloads)} requests "
          f"(OTLP protobuf {otlp_bytes / len(payloads) / 1024:.0f} KiB/request, "
          f"JSON {json_bytes / len(json_bodies) / 1024:.0f} KiB/request)")
    for label, title in (("otlp", "llm-observe OTLP protobuf  "), ("json", "llm-observe /v1/spans JSON ")):
        rate, seconds, failures, count = results[label]
        print(f"{title}: {rate:>8,.0f} spans/s  ({count:,} stored in {seconds:.1f} s, {failures} failed requests)")
    if phoenix:
        rate, done, answered, failures, retries, count = phoenix
        print(f"Arize Phoenix OTLP (SQLite) : {rate:>8,.0f} spans/s  ({count:,} stored in {done:.1f} s; all requests "
              f"answered after {answered:.1f} s; {failures} failed, {retries} retried on 503)")
        print(f"OTLP llm-observe / Phoenix : {results['otlp'][0] / rate:.1f}x  (target >= 10x)")
    ok = all(r[2] == 0 and r[3] == total for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
