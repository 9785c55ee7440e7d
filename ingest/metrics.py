"""Prometheus metrics of the spans the appliance stores, and the /metrics exposition.

Correct across processes: `manage.py serve` gives every child (gunicorn workers,
Celery, consumers) PROMETHEUS_MULTIPROC_DIR, so each writes its own files there
and /metrics adds them up (prometheus_client's multiprocess mode). Without the
variable (tests, a bare `runserver`) the process's own registry is exposed.

Label values come from clients, so they are bounded: each label admits its first
N distinct values per process and maps every later one to "other". Series are
therefore bounded by the caps, whatever a client sends.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter as Tally
from collections import defaultdict

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ingest.kinds import MODEL_CALL_KINDS, counts_as_call
from ingest.services.pricing import normalize_provider

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# `*_created` series double the output and mean nothing once several processes are summed.
disable_created_metrics()

# LLM calls last from tens of milliseconds (a cache hit) to minutes (long reasoning).
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000,
                      30_000, 45_000, 60_000, 90_000, 120_000, 180_000, 300_000, 600_000)
TTFT_BUCKETS_MS = (25, 50, 100, 150, 250, 400, 600, 800, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 20_000,
                   30_000, 60_000, 120_000, 300_000)

OTHER = "other"
NONE = "none"
LABEL_CAPS = {"model": 200, "provider": 50, "service_name": 200, "rule": 50}
_LABEL_LENGTH = 120

SPANS = Counter("llm_spans", "LLM spans stored", ["model", "provider", "service_name", "status"])
TOKENS = Counter("llm_tokens", "Tokens of stored LLM spans; input includes cached_input",
                 ["model", "provider", "service_name", "token_type"])
COST = Counter("llm_cost_usd_micro", "Cost of stored LLM spans in micro-USD (priced spans only)",
               ["model", "provider", "service_name"])
LATENCY = Histogram("llm_latency_ms_total", "End-to-end latency of LLM calls in milliseconds",
                    ["model", "provider"], buckets=LATENCY_BUCKETS_MS)
TTFT = Histogram("llm_latency_ms_ttft", "Time to first token/chunk of streamed LLM calls in milliseconds",
                 ["model", "provider"], buckets=TTFT_BUCKETS_MS)
PII = Counter("llm_pii_detected", "Stored spans in which PII was found (and redacted)", ["service_name"])
INJECTION = Counter("llm_injection_attempts", "Stored spans flagged as prompt-injection attempts", ["service_name"])
# The same spans by the tier that flagged them: 1 the inline scanner at ingest, 2 the semantic classifier
# in the worker after storage (counted into llm_injection_attempts too, when it flags).
INJECTION_FLAGS = Counter("llm_injection_flags", "Spans flagged as prompt-injection attempts, by detection tier",
                          ["tier", "service_name"])
# Span prompts the tier-2 worker took: classified (embedded here), cached (the stored search vector reused),
# skipped_lag (not read: the worker was behind and classified a sample).
INJECTION_TIER2_PROMPTS = Counter("llm_injection_tier2_prompts", "Span prompts taken by tier-2 injection "
                                  "classification, by outcome", ["outcome"])
INJECTION_TIER2_SECONDS = Histogram("llm_injection_tier2_seconds", "Time to embed and classify one task's prompts",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
FINISH = Counter("llm_finish_reason", "Stored LLM spans by finish reason", ["model", "provider", "finish_reason"])

INGEST_SPANS = Counter("llm_ingest_spans", "Spans received by the ingest service, by outcome",
                       ["outcome"])  # stored | duplicate | rejected
INGEST_REJECTIONS = Counter("llm_ingest_rejections", "Spans rejected at validation, by rule", ["rule"])
OTLP_REQUESTS = Counter("llm_otlp_requests", "OTLP/HTTP export requests answered", ["encoding", "code"])
OTLP_SPANS = Counter("llm_otlp_spans", "Spans received over OTLP, by span type", ["span_type"])
# /v1/logs: GenAI events (log records) by what became of them. applied: their span was stored, its empty
# prompt/response filled; pending: kept until their span lands; merged: a pending one applied when its span
# landed; dropped: pending ones over OTLP_LOG_PENDING_MAX_ROWS; unmatched: the span id is stored under another
# trace; rejected: not a GenAI event, or without a trace and span id.
OTLP_LOG_EVENTS = Counter("llm_otlp_log_events", "GenAI events received over OTLP logs, by outcome", ["outcome"])
OTLP_LOG_EVENTS_EXPIRED = Counter("llm_otlp_log_events_expired",
                                  "Pending GenAI events deleted after OTLP_LOG_PENDING_SECONDS without their span")
SCANNED = Counter("llm_scanned_spans", "Stored spans by PII/injection scan outcome (error: stored unscanned)",
                  ["outcome"])  # clean | flagged | error
EMBEDDED = Counter("llm_embeddings", "Prompts embedded (once per distinct prompt, whatever its spans)", ["backend"])
EMBEDDINGS_REUSED = Counter("llm_embeddings_reused",
                            "Prompts of an embedding task that already had a vector (deduplicated, not embedded again)")
EMBEDDING_SECONDS = Histogram("llm_embedding_seconds", "Time to embed one batch of prompts with the MiniLM model",
                              ["backend"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

# Non-LLM spans of an OTLP trace (HTTP handlers, chains, agents, tools) are stored but are not LLM calls.
_LLM_SPAN_TYPES = {None, "llm", "embedding"}


class BoundedLabel:
    """The first `cap` distinct values pass; later ones are "other"."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value) -> str:
        if value is None or value == "":
            return NONE
        text = str(value)[:_LABEL_LENGTH]
        if text in self.seen:
            return text
        with self._lock:
            if text in self.seen:
                return text
            if len(self.seen) >= self.cap:
                return OTHER
            self.seen.add(text)
            return text


_labels = {name: BoundedLabel(cap) for name, cap in LABEL_CAPS.items()}
_model, _provider, _service, _rule = (_labels["model"], _labels["provider"], _labels["service_name"], _labels["rule"])


def labels_reset() -> None:
    for label in _labels.values():
        with label._lock:
            label.seen.clear()


def _is_llm_row(row: dict) -> bool:
    if not counts_as_call(row):
        return False
    if row.get("kind") in MODEL_CALL_KINDS:
        return True
    metadata = row.get("metadata")
    return not metadata or metadata.get("otel.span_type") in _LLM_SPAN_TYPES


def metrics_record_rows(rows: list[dict]) -> None:
    """Count stored span rows. One increment per label set, not per span: cheap on big batches."""
    spans: Tally = Tally()
    tokens: Tally = Tally()
    cost: Tally = Tally()
    pii: Tally = Tally()
    injection: Tally = Tally()
    finish: Tally = Tally()
    scanned: Tally = Tally()
    latency: dict[tuple, list[float]] = defaultdict(list)
    ttft: dict[tuple, list[float]] = defaultdict(list)
    seen: set = set()
    for row in rows:
        key = (row.get("project_id"), row.get("span_id"))
        if key in seen:  # a span_id repeated in one batch is stored once
            continue
        seen.add(key)
        service = _service(row.get("service_name"))
        flagged = row.get("pii_detected") or row.get("injection_attempt")
        scanned["error" if row.get("scan_status") == "error" else "flagged" if flagged else "clean"] += 1
        if row.get("pii_detected"):
            pii[service] += 1
        if row.get("injection_attempt"):
            injection[service] += 1
        if not _is_llm_row(row):
            continue
        model = _model(row.get("model"))
        provider = _provider(normalize_provider(row.get("provider")))
        spans[(model, provider, service, row.get("status") or "success")] += 1
        prompt_tokens, cached = row.get("prompt_tokens"), row.get("cached_tokens")
        if prompt_tokens:
            tokens[(model, provider, service, "input")] += prompt_tokens
        if cached:
            tokens[(model, provider, service, "cached_input")] += cached
        if row.get("completion_tokens"):
            tokens[(model, provider, service, "output")] += row["completion_tokens"]
        if row.get("reasoning_tokens"):
            tokens[(model, provider, service, "reasoning")] += row["reasoning_tokens"]
        if row.get("cost_usd_micro"):
            cost[(model, provider, service)] += row["cost_usd_micro"]
        finish[(model, provider, row.get("finish_reason") or "unspecified")] += 1
        if row.get("latency_ms_total") is not None:
            latency[(model, provider)].append(row["latency_ms_total"])
        if row.get("latency_ms_ttft") is not None:
            ttft[(model, provider)].append(row["latency_ms_ttft"])
    for labels, n in spans.items():
        SPANS.labels(*labels).inc(n)
    for labels, n in tokens.items():
        TOKENS.labels(*labels).inc(n)
    for labels, n in cost.items():
        COST.labels(*labels).inc(n)
    for labels, n in finish.items():
        FINISH.labels(*labels).inc(n)
    for outcome, n in scanned.items():
        SCANNED.labels(outcome).inc(n)
    for service, n in pii.items():
        PII.labels(service).inc(n)
    for service, n in injection.items():
        INJECTION.labels(service).inc(n)
        INJECTION_FLAGS.labels("1", service).inc(n)
    for labels, values in latency.items():
        child = LATENCY.labels(*labels)
        for value in values:
            child.observe(value)
    for labels, values in ttft.items():
        child = TTFT.labels(*labels)
        for value in values:
            child.observe(value)


def metrics_record_ingest(*, prepared, stored) -> None:
    """Called once at the end of spans_ingest with what it prepared and what spans_store wrote.

    Re-sent batches (an exporter's retry) store nothing and count nothing. When a batch
    is only partly new, which rows were new is not known here; all of them are counted.
    """
    try:
        rejected = prepared.rejected
        INGEST_SPANS.labels("stored").inc(stored.stored)
        if stored.duplicates:
            INGEST_SPANS.labels("duplicate").inc(stored.duplicates)
        if rejected:
            INGEST_SPANS.labels("rejected").inc(len(rejected))
            for rule, n in Tally(_rule(r.rule) for r in rejected).items():
                INGEST_REJECTIONS.labels(rule).inc(n)
        if stored.stored:
            metrics_record_rows(prepared.rows)
    except Exception:  # noqa: BLE001 - metrics never fail a write that has already committed
        logging.getLogger(__name__).exception("recording span metrics failed")


def metrics_record_embeddings(*, backend: str, embedded: int, reused: int, seconds: float | None) -> None:
    """One embedding task: how many prompts it embedded (in `seconds`) and how many already had a vector."""
    try:
        if embedded:
            EMBEDDED.labels(backend).inc(embedded)
        if seconds is not None:
            EMBEDDING_SECONDS.labels(backend).observe(seconds)
        if reused:
            EMBEDDINGS_REUSED.inc(reused)
    except Exception:  # noqa: BLE001 - metrics never fail the task
        logging.getLogger(__name__).exception("recording embedding metrics failed")


def metrics_record_injection_tier2(*, outcomes: dict, flagged_services: list, seconds: float | None) -> None:
    """One tier-2 task: its prompts by outcome, the spans it flagged (their services), its time."""
    try:
        for outcome in ("classified", "cached", "skipped_lag"):
            if outcomes.get(outcome):
                INJECTION_TIER2_PROMPTS.labels(outcome).inc(outcomes[outcome])
        for service, n in Tally(_service(s) for s in flagged_services).items():
            INJECTION.labels(service).inc(n)
            INJECTION_FLAGS.labels("2", service).inc(n)
        if seconds is not None:
            INJECTION_TIER2_SECONDS.observe(seconds)
    except Exception:  # noqa: BLE001 - metrics never fail the task
        logging.getLogger(__name__).exception("recording tier-2 injection metrics failed")


def metrics_record_otlp(*, encoding: str, code: int, span_types: list[str] | None = None) -> None:
    try:
        OTLP_REQUESTS.labels(encoding, str(code)).inc()
        if span_types:
            for span_type, n in Tally(span_types).items():
                OTLP_SPANS.labels(span_type if span_type in _BOUNDED_SPAN_TYPES else OTHER).inc(n)
    except Exception:  # noqa: BLE001 - e.g. an unwritable PROMETHEUS_MULTIPROC_DIR: the request goes on
        logging.getLogger(__name__).exception("recording OTLP metrics failed")


def metrics_record_log_events(*, outcome: str, count: int) -> None:
    if count:
        try:
            OTLP_LOG_EVENTS.labels(outcome).inc(count)
        except Exception:  # noqa: BLE001 - as metrics_record_otlp
            logging.getLogger(__name__).exception("recording OTLP log metrics failed")


def metrics_record_log_events_expired(*, count: int) -> None:
    if count:
        try:
            OTLP_LOG_EVENTS_EXPIRED.inc(count)
        except Exception:  # noqa: BLE001 - as metrics_record_otlp
            logging.getLogger(__name__).exception("recording OTLP log metrics failed")


_BOUNDED_SPAN_TYPES = {"llm", "embedding", "chain", "agent", "tool", "retriever", "reranker", "guardrail",
                       "evaluator", "invoke_agent", "create_agent", "execute_tool", "retrieval", "invoke_workflow",
                       "other"}


class _QueueCollector:
    """Celery queue lengths, read from the broker at scrape time."""

    def collect(self):
        family = GaugeMetricFamily("llm_queue_length", "Tasks waiting in a Celery queue", labels=["queue"])
        try:
            import redis
            from django.conf import settings

            from ingest.queues import Queue

            client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
            for queue in Queue:
                family.add_metric([queue.value], client.llen(queue.value))
        except Exception:  # noqa: BLE001 - a scrape without queue figures beats a failed scrape
            return [family]
        return [family]

    def describe(self):
        return []


_queue_collector = _QueueCollector()
if not MULTIPROCESS:
    REGISTRY.register(_queue_collector)


class _SupervisorCollector:
    """Up/down and restarts of the processes `manage.py serve` supervises, from its state file."""

    def collect(self):
        from django.conf import settings

        from appliance.supervisor import read_state, state_file

        up = GaugeMetricFamily("llm_process_up", "1 while a supervised appliance process runs", labels=["process"])
        restarts = CounterMetricFamily("llm_process_restarts", "Restarts of a supervised appliance process since "
                                       "serve started", labels=["process"])
        state = read_state(state_file(settings.DATA_DIR))
        for name, process in ((state or {}).get("processes") or {}).items():
            up.add_metric([name], 1 if process.get("state") == "running" else 0)
            restarts.add_metric([name], process.get("restarts") or 0)
        return [up, restarts]

    def describe(self):
        return []


_supervisor_collector = _SupervisorCollector()
if not MULTIPROCESS:
    REGISTRY.register(_supervisor_collector)


def metrics_exposition() -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text exposition for this appliance."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_queue_collector)
        registry.register(_supervisor_collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metrics_state() -> tuple[bool, str]:
    """(initialized, message) for /v1/metrics/init and /v1/metrics/health."""
    if not MULTIPROCESS:
        return True, "Prometheus metrics of this process at GET /metrics"
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return False, f"PROMETHEUS_MULTIPROC_DIR {directory} is not a writable directory"
    return True, "Prometheus metrics of every appliance process at GET /metrics"
