"""Prometheus metrics of the Kafka pipeline (producer in the web process, consumers in workers).

Plain prometheus_client objects: with PROMETHEUS_MULTIPROC_DIR set, every process
(gunicorn workers, consumers) writes its own files and /metrics aggregates them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SPANS_PRODUCED = Counter(
    "llm_kafka_spans_produced", "Spans acknowledged by the broker (acks=all)", ["topic"])
PRODUCE_FAILURES = Counter(
    "llm_kafka_produce_failures", "Ingest requests answered 503 because the broker did not acknowledge", ["reason"])
SPANS_CONSUMED = Counter(
    "llm_kafka_spans_consumed", "Messages read by a consumer (before decoding)", ["topic"])
SPANS_STORED = Counter(
    "llm_kafka_spans_stored", "Spans a consumer wrote to the database (new rows)", ["topic"])
SPANS_DUPLICATES = Counter(
    "llm_kafka_spans_duplicates", "Re-delivered spans already stored, skipped by the idempotent insert", ["topic"])
SPANS_DLQ = Counter(
    "llm_kafka_spans_dlq", "Messages sent to the dead-letter topic", ["topic", "reason"])
STORE_RETRIES = Counter(
    "llm_kafka_store_retries", "Batches retried because the database was unavailable", ["topic"])
BATCH_SECONDS = Histogram(
    "llm_kafka_batch_seconds", "Time to decode, store and commit one consumer batch", ["topic"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CONSUMER_LAG = Gauge(
    "llm_kafka_consumer_lag", "Messages behind the partition's high watermark, per assigned partition",
    ["topic", "partition"], multiprocess_mode="livemax")
