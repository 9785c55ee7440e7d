"""Client-side span metrics with the appliance's names (llm_spans_total, llm_tokens_total, ...).

`init_metrics_pipeline()` makes the reporter record every span it sends. Counters
live in memory (`metrics_snapshot()`); when `prometheus_client` is installed they
are also registered there, so an application that already exposes /metrics shows
them. Cost is priced by the appliance, so a client-side span carries
`cost_usd_micro` only when the caller put it there.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Any

from instrumentation_sdk import _reporter

BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)

_lock = threading.Lock()
_initialized = False
_prom: dict[str, Any] | None = None
_counters: dict[tuple, float] = defaultdict(float)
_histograms: dict[tuple, list[int]] = {}


def _label(value: Any) -> str:
    return "" if value is None else str(value)[:100]


def _init_prometheus() -> dict[str, Any] | None:
    try:
        from prometheus_client import Counter, Histogram
    except ImportError:
        return None
    try:
        common = ["model", "provider", "service_name"]
        return {
            "spans": Counter("llm_spans", "LLM spans recorded", common + ["status"]),
            "tokens": Counter("llm_tokens", "LLM tokens", common + ["token_type"]),
            "cost": Counter("llm_cost_usd_micro", "LLM cost in micro-USD", common),
            "latency": Histogram("llm_latency_ms_total", "LLM call latency (ms)", common, buckets=BUCKETS_MS),
            "ttft": Histogram("llm_latency_ms_ttft", "LLM time to first token (ms)", common, buckets=BUCKETS_MS),
            "pii": Counter("llm_pii_detected", "spans with PII", common),
            "injection": Counter("llm_injection_attempts", "spans with a prompt-injection attempt", common),
            "finish": Counter("llm_finish_reason", "finish reasons", common + ["finish_reason"]),
        }
    except ValueError:  # already registered (re-import in tests)
        return None


def init_metrics_pipeline() -> dict:
    """Start recording metrics for every span this process reports. Idempotent."""
    global _initialized, _prom
    with _lock:
        if not _initialized:
            _prom = _init_prometheus()
            _initialized = True
    _reporter.set_metrics_hook(record_span_metrics)
    backend = "prometheus_client and in-memory" if _prom else "in-memory"
    return {"initialized": True, "message": f"metrics pipeline ready ({backend})"}


def _observe(name: str, labels: tuple, value: float) -> None:
    buckets = _histograms.get((name,) + labels)
    if buckets is None:
        buckets = _histograms[(name,) + labels] = [0] * (len(BUCKETS_MS) + 1)
    buckets[bisect.bisect_left(BUCKETS_MS, value)] += 1
    _counters[(name + "_sum",) + labels] += value
    _counters[(name + "_count",) + labels] += 1


def record_span_metrics(span: dict) -> dict:
    """Count one span (dict of span fields). Returns {recorded, cost_usd_micro, price_version}."""
    try:
        labels = (_label(span.get("model")), _label(span.get("provider")), _label(span.get("service_name")))
        status = _label(span.get("status") or "success")
        with _lock:
            _counters[("llm_spans_total",) + labels + (status,)] += 1
            for token_type in ("prompt", "completion", "cached", "reasoning"):
                value = span.get(f"{token_type}_tokens")
                if isinstance(value, (int, float)) and value > 0:
                    _counters[("llm_tokens_total",) + labels + (token_type,)] += value
            cost = span.get("cost_usd_micro")
            if isinstance(cost, (int, float)) and cost > 0:
                _counters[("llm_cost_usd_micro_total",) + labels] += cost
            for field, name in (("latency_ms_total", "llm_latency_ms_total"),
                                ("latency_ms_ttft", "llm_latency_ms_ttft")):
                value = span.get(field)
                if isinstance(value, (int, float)):
                    _observe(name, labels, float(value))
            if span.get("pii_detected"):
                _counters[("llm_pii_detected_total",) + labels] += 1
            if span.get("injection_attempt"):
                _counters[("llm_injection_attempts_total",) + labels] += 1
            if span.get("finish_reason"):
                _counters[("llm_finish_reason_total",) + labels + (_label(span["finish_reason"]),)] += 1
        if _prom:
            _record_prometheus(span, labels, status)
        return {"recorded": True, "cost_usd_micro": cost if isinstance(cost, int) else None,
                "price_version": span.get("price_version")}
    except Exception:  # noqa: BLE001
        return {"recorded": False, "cost_usd_micro": None, "price_version": None}


def _record_prometheus(span: dict, labels: tuple, status: str) -> None:
    p = _prom
    p["spans"].labels(*labels, status).inc()
    for token_type in ("prompt", "completion", "cached", "reasoning"):
        value = span.get(f"{token_type}_tokens")
        if isinstance(value, (int, float)) and value > 0:
            p["tokens"].labels(*labels, token_type).inc(value)
    cost = span.get("cost_usd_micro")
    if isinstance(cost, (int, float)) and cost > 0:
        p["cost"].labels(*labels).inc(cost)
    if isinstance(span.get("latency_ms_total"), (int, float)):
        p["latency"].labels(*labels).observe(span["latency_ms_total"])
    if isinstance(span.get("latency_ms_ttft"), (int, float)):
        p["ttft"].labels(*labels).observe(span["latency_ms_ttft"])
    if span.get("pii_detected"):
        p["pii"].labels(*labels).inc()
    if span.get("injection_attempt"):
        p["injection"].labels(*labels).inc()
    if span.get("finish_reason"):
        p["finish"].labels(*labels, str(span["finish_reason"])).inc()


def metrics_snapshot() -> dict[str, float]:
    """{"llm_spans_total{model=...,provider=...,...}": value, ...} of what this process recorded."""
    with _lock:
        out = {}
        for key, value in _counters.items():
            out[f"{key[0]}{{{','.join(key[1:])}}}"] = value
        return out


def reset_metrics() -> None:
    with _lock:
        _counters.clear()
        _histograms.clear()
