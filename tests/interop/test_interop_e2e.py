"""Interop against a running appliance (`manage.py serve`: gunicorn with 2 workers, Celery, embedded servers).

A real OpenTelemetry SDK with the OTLP/HTTP exporter sends GenAI and OpenInference spans; they are read
back through GET /v1/spans. Every 1.8.1 route is called over HTTP, the SSE test stream is checked to
really stream, /metrics is checked to add up both web workers, and schemathesis fuzzes the appliance's
own OpenAPI schema looking for a 500. One appliance for the whole module.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from tests.interop.otel_helpers import GENAI_CHAT_COST, Recorder, genai_chat_attributes, hex_id

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_from(path: Path) -> int | None:
    try:
        first = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


def _chat_attributes() -> dict:
    # Tests of one appliance run seconds apart: their calls must not share a response id (one call).
    return genai_chat_attributes(**{"gen_ai.response.id": f"chatcmpl-{uuid.uuid4().hex}"})


class Appliance:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir, self.log = data_dir, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = ""
        self.proc: subprocess.Popen | None = None

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS",
                            "PROMETHEUS_MULTIPROC_DIR")}
        env.update(DATA_DIR=str(self.data_dir), PORT=str(self.port), WEB_WORKERS="2", WORKER_CONCURRENCY="1",
                   PYTHONUNBUFFERED="1")
        self.handle = open(self.log, "ab")
        # Own session: if it has to be killed, its process group goes with it (by id, nothing else).
        self.proc = subprocess.Popen([sys.executable, "manage.py", "serve"], cwd=ROOT, env=env, stdout=self.handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early:\n{self.output()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"not healthy in time:\n{self.output()[-3000:]}")
        match = re.search(r"API key \(default\)\s*: (\S+)", self.output())
        assert match, self.output()[-3000:]
        self.key = match.group(1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # The embedded servers run in their own sessions; after a clean stop they are gone already.
        for pid_file in (self.data_dir / "postgres" / "postmaster.pid", self.data_dir / "valkey" / "valkey.state"):
            pid = _pid_from(pid_file)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.handle.close()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    # Not under tmp_path: as root the embedded PostgreSQL runs as an unprivileged user who must enter DATA_DIR.
    data_dir = ROOT / ".data" / "e2e" / f"interop-{uuid.uuid4().hex[:8]}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    app = Appliance(data_dir, tmp_path_factory.mktemp("interop") / "serve.log")
    try:
        app.start()
        yield app
    finally:
        app.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def spans_of(app: Appliance, **params) -> dict[str, dict]:
    response = httpx.get(f"{app.url}/v1/spans", params={"limit": 1000, **params}, headers=app.auth, timeout=10)
    assert response.status_code == 200, response.text
    return {s["span_id"]: s for s in response.json()["items"]}


def sdk_tracer(app: Appliance, service: str, *, headers: dict | None = None, compression=Compression.Gzip):
    exporter = OTLPSpanExporter(endpoint=f"{app.url}/v1/traces", headers=headers, compression=compression,
                                timeout=30)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    results = []

    class Checked(SimpleSpanProcessor):
        def on_end(self, span):
            results.append(exporter.export([span]))

    provider.add_span_processor(Checked(exporter))
    return provider, provider.get_tracer("e2e.interop"), results


def test_otel_sdk_protobuf_export_of_genai_spans(appliance, monkeypatch):
    # The key as OTEL_EXPORTER_OTLP_HEADERS, as an application would configure it.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"Authorization=Bearer%20{appliance.key}")
    provider, tracer, results = sdk_tracer(appliance, "e2e-otel-pb")
    with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER) as root:
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT,
                                          attributes=_chat_attributes()) as llm:
            pass
        with tracer.start_as_current_span("chat claude", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 2000,
                "gen_ai.usage.cache_read.input_tokens": 1500, "gen_ai.usage.output_tokens": 100}) as claude:
            claude.set_status(Status(StatusCode.ERROR, "overloaded"))
    provider.shutdown()
    assert results and all(r == SpanExportResult.SUCCESS for r in results)

    spans = spans_of(appliance, trace_id=hex_id(root, "trace_id"))
    assert len(spans) == 3
    got = spans[hex_id(llm)]
    assert got["model"] == "gpt-4o-2024-08-06" and got["provider"] == "openai"
    assert (got["prompt_tokens"], got["completion_tokens"], got["cached_tokens"]) == (812, 164, 512)
    assert got["cost_usd_micro"] == GENAI_CHAT_COST  # config/model_prices.yaml: gpt-4o 2.50 / 10.00 / 1.25
    assert got["parent_span_id"] == hex_id(root) and got["service_name"] == "e2e-otel-pb"
    c = spans[hex_id(claude)]
    # claude-sonnet-4-5: 500 x 3.00 + 1500 x 0.30 + 100 x 15.00
    assert c["cost_usd_micro"] == 500 * 3 + 450 + 1500 and c["status"] == "error"
    assert spans[hex_id(root)]["model"] is None


def test_otlp_json_body_of_the_same_kind_of_spans(appliance):
    rec = Recorder(service="e2e-otel-json")
    with rec.span("POST /chat", end_ms=2000) as root:
        with rec.span("chat gpt-4o", start_ms=10, end_ms=1900, attributes=_chat_attributes()) as llm:
            pass
    response = httpx.post(f"{appliance.url}/v1/traces", content=rec.json(),
                          headers={**appliance.auth, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.json() == {}
    spans = spans_of(appliance, trace_id=hex_id(root, "trace_id"))
    got = spans[hex_id(llm)]
    assert (got["model"], got["prompt_tokens"], got["cached_tokens"], got["cost_usd_micro"]) == \
        ("gpt-4o-2024-08-06", 812, 512, GENAI_CHAT_COST)
    assert got["latency_ms_total"] == pytest.approx(1890, abs=0.01)
    assert got["latency_ms_ttft"] == pytest.approx(412)

    bad = httpx.post(f"{appliance.url}/v1/traces", content=b"{nope",
                     headers={**appliance.auth, "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["code"] == 3
    assert httpx.post(f"{appliance.url}/v1/traces", content=b"x",
                      headers={**appliance.auth, "Content-Type": "text/plain"}).status_code == 415
    assert httpx.post(f"{appliance.url}/v1/traces", content=b"").status_code == 401


def test_openinference_spans_from_the_sdk(appliance):
    provider, tracer, results = sdk_tracer(appliance, "e2e-openinference", headers=appliance.auth,
                                           compression=Compression.NoCompression)
    with tracer.start_as_current_span("LLMChain", attributes={
            "openinference.span.kind": "CHAIN", "input.value": "Translate: bonjour", "output.value": "hello"}) as chain:
        with tracer.start_as_current_span("OpenAI", attributes={
                "openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini", "llm.provider": "openai",
                "llm.token_count.prompt": 20, "llm.token_count.completion": 2,
                "llm.input_messages.0.message.role": "user",
                "llm.input_messages.0.message.content": "Translate: bonjour",
                "llm.output_messages.0.message.role": "assistant",
                "llm.output_messages.0.message.content": "hello", "session.id": "sess-e2e"}) as llm:
            pass
    provider.shutdown()
    assert all(r == SpanExportResult.SUCCESS for r in results)
    spans = spans_of(appliance, trace_id=hex_id(chain, "trace_id"))
    got = spans[hex_id(llm)]
    assert (got["model"], got["provider"], got["prompt_tokens"], got["completion_tokens"]) == \
        ("gpt-4o-mini", "openai", 20, 2)
    assert got["cost_usd_micro"] is not None and got["session_id"] == "sess-e2e"
    assert got["prompt"] == "Translate: bonjour" and got["response"] == "hello"
    assert spans[hex_id(chain)]["model"] is None and spans[hex_id(chain)]["prompt"] == "Translate: bonjour"


def _post(app, path, body=None, raw=None):
    content = raw if raw is not None else orjson.dumps(body) if body is not None else b""
    return httpx.post(f"{app.url}{path}", content=content, timeout=30,
                      headers={**app.auth, "Content-Type": "application/json"})


def test_every_1_8_1_route_over_http(appliance):
    assert _post(appliance, "/instrumentation/init").json()["success"] is True
    assert _post(appliance, "/instrumentation/uninstrument").json()["success"] is True
    assert _post(appliance, "/instrumentation/detect", {"url": "https://api.anthropic.com/v1/messages",
                                                         "body": {"model": "claude-3-5-haiku"}}).json() == \
        {"provider": "anthropic", "model": "claude-3-5-haiku"}
    call = _post(appliance, "/instrumentation/test-call", {"method": "chat", "provider": "openai"}).json()
    assert call["success"] is True
    assert call["span_id"] in spans_of(appliance, service="llm-observe-test")
    count = _post(appliance, "/v1/token-counting/count", {"prompt": "hello world", "model": "gpt-4"})
    assert count.status_code in (200, 503)  # 503 until the SDK's instrumentation_sdk.tokens is installed
    if count.status_code == 200:
        assert count.json() == {"tokens": 2, "method": "tiktoken"}
    assert _post(appliance, "/v1/pii-injection/scan", {"prompt": "my email is test@example.com"}).json() == \
        {"pii_detected": True, "injection_attempt": False}
    assert set(_post(appliance, "/v1/sampling/should-sample", {"span_id": "test-span-id"}).json()) == {"is_sampled"}
    embed = _post(appliance, "/v1/embeddings/embed", {"text": "your text here"})
    assert embed.status_code in (200, 503)  # 503 until workers.enrichment is there
    if embed.status_code == 200:
        assert len(embed.json()["embedding"]) == 384
    assert _post(appliance, "/v1/metrics/init").json()["initialized"] is True
    health = httpx.get(f"{appliance.url}/v1/metrics/health", headers=appliance.auth).json()
    assert health["initialized"] is True and "every appliance process" in health["message"]
    record = _post(appliance, "/v1/metrics/record", {"model": "gpt-4o", "provider": "openai", "prompt_tokens": 1000,
                                                     "completion_tokens": 200})
    assert record.json()["recorded"] is True and record.json()["cost_usd_micro"] == 4500
    batch = _post(appliance, "/v1/metrics/record-batch", [{"model": "gpt-4o"}, {"model": "gpt-4o-mini"}])
    assert batch.json()["recorded_count"] == 2
    for path, raw in (("/instrumentation/detect", b"{}"), ("/v1/metrics/record", b"[]"),
                      ("/v1/streaming/test-stream-call", b'{"chunks": -1}'), ("/v1/embeddings/embed", b"{"),
                      ("/v1/pii-injection/scan", b'{"prompt": 1}')):
        response = _post(appliance, path, raw=raw)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)


@pytest.mark.parametrize("path", ["/v1/streaming/test-stream-call", "/streaming/test-stream-call"])
def test_test_stream_call_really_streams_and_records_ttft(appliance, path):
    arrivals, events = [], []
    started = time.perf_counter()
    body = {"provider": "anthropic", "chunks": ["one ", "two ", "three ", "four ", "five"], "delay_ms": 150,
            "first_chunk_delay_ms": 100}
    with httpx.stream("POST", f"{appliance.url}{path}", json=body, headers=appliance.auth, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - started)
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    # the first chunk arrived long before the last: not buffered into one response
    assert arrivals[4] - arrivals[0] > 0.45
    done = orjson.loads(events[-2])
    assert 100 <= done["latency_ms_ttft"] < 1000
    span = spans_of(appliance, service="llm-observe-test")[done["span_id"]]
    assert span["latency_ms_ttft"] == done["latency_ms_ttft"] and span["response"] == "one two three four five"
    assert span["provider"] == "anthropic" and span["latency_ms_total"] >= 700


def test_client_that_disconnects_mid_stream_leaves_a_span(appliance):
    body = {"provider": "openai", "chunks": [f"w{i} " for i in range(40)], "delay_ms": 100,
            "first_chunk_delay_ms": 0}
    with httpx.stream("POST", f"{appliance.url}/v1/streaming/test-stream-call", json=body, headers=appliance.auth,
                      timeout=30) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    span_id = orjson.loads(first[6:])["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        span = spans_of(appliance, service="llm-observe-test").get(span_id)
        if span:
            break
        time.sleep(0.3)
    assert span, "no span for the interrupted stream"
    assert span["finish_reason"] == "client_disconnect" and span["response"].startswith("w0")


def _scrape(app) -> dict:
    text = httpx.get(f"{app.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_metrics_add_up_every_web_worker(appliance):
    service = f"mp-{uuid.uuid4().hex[:6]}"

    def send(i: int) -> int:
        # one connection per request, so both gunicorn workers take some
        return httpx.post(f"{appliance.url}/v1/spans", headers=appliance.auth, timeout=30, json=[
            {"model": "gpt-4o", "provider": "openai", "service_name": service, "prompt_tokens": 100,
             "completion_tokens": 10, "latency_ms_total": 1000 + i, "latency_ms_ttft": 200}]).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(send, range(40))) == {202}
    for _ in range(4):  # whichever worker answers the scrape, it reports every worker's counts
        samples = _scrape(appliance)
        assert _total(samples, "llm_spans_total", service_name=service) == 40
        assert _total(samples, "llm_tokens_total", service_name=service, token_type="input") == 4000
        assert _total(samples, "llm_cost_usd_micro_total", service_name=service) == 40 * 350
    assert _total(samples, "llm_latency_ms_ttft_count", model="gpt-4o") >= 40
    assert ("llm_queue_length", (("queue", "celery"),)) in samples
    pids = {p.name.rsplit("_", 1)[-1] for p in (appliance.data_dir / "prometheus").glob("counter_*.db")}
    assert len(pids) >= 2, f"one process wrote every metric: {pids}"


_SCHEMATHESIS_CONFIG = """
# 503 is the documented answer of these two while their backend (the SDK's token counter, the embedding
# model) is not installed; any other 5xx anywhere is a failure.
[[operations]]
include-path = "/v1/embeddings/embed"
checks.not_a_server_error.expected-statuses = ["2XX", "3XX", "4XX", "503"]

[[operations]]
include-path = "/v1/token-counting/count"
checks.not_a_server_error.expected-statuses = ["2XX", "3XX", "4XX", "503"]
"""


# CI runs a bounded fuzz (seconds per auth style, fixed seed); `make fuzz` runs it for minutes with a new seed.
FUZZ_SECONDS = int(os.environ.get("LLM_OBSERVE_FUZZ_SECONDS", "30"))
FUZZ_SEED = os.environ.get("LLM_OBSERVE_FUZZ_SEED", "1")


@pytest.mark.parametrize("auth", ["Authorization: Bearer {key}", "X-API-Key: {key}"], ids=["bearer", "x-api-key"])
def test_schemathesis_finds_no_server_error(appliance, tmp_path, auth):
    # Bounded: a time budget per auth style. One worker: CPython 3.11 can fail parsing source in two
    # threads at once (hypothesis does, describing strategies). The SSE test streams are excluded:
    # they hold a thread for seconds by design; their bad bodies are covered above.
    config = tmp_path / "schemathesis.toml"
    config.write_text(_SCHEMATHESIS_CONFIG)
    command = [
        str(Path(sys.executable).with_name("st")), "--config-file", str(config), "run",
        f"{appliance.url}/api/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "50" if FUZZ_SECONDS > 120 else "5",
        "--max-time", str(FUZZ_SECONDS), "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1",
        "--request-timeout", "20", "--header", auth.format(key=appliance.key),
        "--exclude-path-regex", "test-stream-call", "--no-color",
        *([] if FUZZ_SEED == "random" else ["--seed", FUZZ_SEED]),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS * 4 + 120, cwd=tmp_path)
    (ROOT / ".data" / "e2e" / f"schemathesis-{auth.split(':')[0].lower()}.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


def _curl_chunked(app: Appliance, path: str, body: bytes, tmp_path: Path, *, gzipped: bool = False,
                  content_type: str = "application/json") -> tuple[int, bytes]:
    """POST with `Transfer-Encoding: chunked` and no Content-Length, exactly as curl sends it."""
    data = tmp_path / f"body-{uuid.uuid4().hex}"
    data.write_bytes(gzip.compress(body) if gzipped else body)
    out = tmp_path / f"answer-{uuid.uuid4().hex}"
    command = ["curl", "-sS", "-X", "POST", "-H", "Transfer-Encoding: chunked", "-H", f"Content-Type: {content_type}",
               "-H", f"Authorization: Bearer {app.key}", "--data-binary", f"@{data}", "-o", str(out),
               "-w", "%{http_code}", f"{app.url}{path}"]
    if gzipped:
        command[1:1] = ["-H", "Content-Encoding: gzip"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return int(run.stdout), out.read_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_chunked_bodies_are_read_and_stored_on_every_route(appliance, tmp_path):
    service = f"chunked-{uuid.uuid4().hex[:6]}"
    ids = [f"{service}-{n}" for n in range(6)]
    status, answer = _curl_chunked(appliance, "/v1/spans", orjson.dumps([
        {"span_id": ids[0], "service_name": service, "model": "gpt-4o"},
        {"span_id": ids[1], "service_name": service, "model": "gpt-4o"}]), tmp_path)
    assert (status, orjson.loads(answer)["accepted"]) == (202, 2), answer
    status, answer = _curl_chunked(appliance, "/v1/spans", orjson.dumps({"span_id": ids[2], "service_name": service}),
                                   tmp_path, gzipped=True)
    assert status == 202, answer
    status, answer = _curl_chunked(appliance, "/v1/metrics/record", orjson.dumps(
        {"span_id": ids[3], "service_name": service, "model": "gpt-4o", "prompt_tokens": 1000}), tmp_path)
    assert status == 200 and orjson.loads(answer)["cost_usd_micro"] == 2500, answer
    status, answer = _curl_chunked(appliance, "/v1/metrics/record-batch", orjson.dumps(
        [{"span_id": ids[4], "service_name": service}]), tmp_path)
    assert status == 200 and orjson.loads(answer)["recorded_count"] == 1, answer

    rec = Recorder(service=service)
    with rec.span("chat gpt-4o", end_ms=100, attributes=_chat_attributes()) as llm:
        pass
    status, answer = _curl_chunked(appliance, "/v1/traces", rec.json(), tmp_path)
    assert (status, orjson.loads(answer)) == (200, {})
    stored = spans_of(appliance, service=service)
    assert set(stored) == set(ids[:5]) | {hex_id(llm)}

    # routes whose body is a schema read it too
    status, answer = _curl_chunked(appliance, "/v1/pii-injection/scan", b'{"prompt": "mail me at a@b.co"}', tmp_path)
    assert (status, orjson.loads(answer)["pii_detected"]) == (200, True)
    # the 5 MB limit holds without a Content-Length: 413, nothing stored
    big = orjson.dumps([{"span_id": ids[5], "service_name": service, "prompt": "x" * (6 * 1024 * 1024)}])
    status, answer = _curl_chunked(appliance, "/v1/spans", big, tmp_path)
    assert status == 413 and orjson.loads(answer)["rule"] == "body_too_large"
    assert ids[5] not in spans_of(appliance, service=service)


NODE_PROJECT = Path(__file__).parent / "node"


def _node_exporter() -> Path:
    """The pinned npm packages of tests/interop/node, installed once into .data (npm ci, no scripts)."""
    target = ROOT / ".data" / "node-otlp"
    lock = (NODE_PROJECT / "package-lock.json").read_bytes()
    if not (target / "node_modules").is_dir() or (target / "package-lock.json").read_bytes() != lock:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in ("package.json", "package-lock.json", "send.mjs"):
            shutil.copy(NODE_PROJECT / name, target / name)
        run = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                             cwd=target, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"npm ci failed (the npm registry must be reachable): {run.stderr[-2000:]}"
    shutil.copy(NODE_PROJECT / "send.mjs", target / "send.mjs")
    return target


@pytest.mark.skipif((shutil.which("node") is None or shutil.which("npm") is None)
                    and not os.environ.get("LLM_OBSERVE_REQUIRE_NODE"),
                    reason="Node.js and npm are not installed (.ci/run sets LLM_OBSERVE_REQUIRE_NODE: CI must have them)")
@pytest.mark.parametrize("gzipped", [False, True])
def test_the_nodejs_otlp_exporter_is_stored(appliance, gzipped):
    # @opentelemetry/exporter-trace-otlp-http sends its bodies chunked: acknowledged and lost until now.
    project = _node_exporter()
    service = f"node-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "OTLP_URL": f"{appliance.url}/v1/traces", "OTLP_KEY": appliance.key, "SERVICE": service,
           "COUNT": "3", "GZIP": "1" if gzipped else "0"}
    run = subprocess.run(["node", "send.mjs"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    stored = spans_of(appliance, service=service)
    assert len(stored) == 3, run.stdout
    assert {s["model"] for s in stored.values()} == {"gpt-4o-mini"}
    assert sorted(s["prompt"] for s in stored.values()) == ["node prompt 0", "node prompt 1", "node prompt 2"]
    assert {(s["prompt_tokens"], s["completion_tokens"]) for s in stored.values()} == {(23, 17)}
