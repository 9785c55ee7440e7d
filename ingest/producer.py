"""Kafka mode of ingestion: prepared rows go to `llm.spans.raw`, acknowledged before the 202.

One idempotent producer (acks=all) per process, created lazily for the current pid so
a fork never shares librdkafka's threads. A background thread serves the delivery
callbacks; each request waits only for its own messages, so a busy process does not
make one request wait for another's. Anything short of an acknowledgement of every
message of the request is a `BrokerUnavailable` (HTTP 503): the client retries the
whole batch and the idempotent store drops what did get through.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from django.conf import settings

from ingest import kafka_metrics as metrics
from ingest.contracts import SpanMessage
from ingest.queues import Topic

log = logging.getLogger(__name__)


class _RepeatFilter(logging.Filter):
    """librdkafka logs a failed connect every few milliseconds while a broker is away: once a minute is plenty."""

    WINDOW = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(key, -self.WINDOW) < self.WINDOW:
                return False
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = now
        return True


_client_log = logging.getLogger("kafka.client")
_client_log.addFilter(_RepeatFilter())

RETRY_AFTER_SECONDS = 5
RETIRE_AFTER_FAILURES = 2
# Delivery errors that mean the topic is gone (a broker that lost its metadata):
# the next request recreates it instead of waiting on it forever.
_TOPIC_GONE = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}
# Delivery errors after which this producer's idempotence state is refused for good (seen after a
# broker restart: "a newer producer ... fences the current one"). librdkafka does not flag them
# fatal, yet every later request of the same producer fails the same way.
_PRODUCER_STATE_LOST = {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED,
                        KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.INVALID_PRODUCER_ID_MAPPING,
                        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER}


class BrokerUnavailable(Exception):
    """The broker did not acknowledge every message of a request: nothing may be reported accepted."""

    def __init__(self, message: str, *, reason: str = "unavailable", retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.reason = reason  # a metric label
        self.retry_after = retry_after


class SpanTooLarge(Exception):
    """A span bigger than a Kafka message may be: retrying cannot help (HTTP 413)."""


def message_max_bytes() -> int:
    # A span's message is about its share of the request body (already bounded by
    # INGEST_MAX_BYTES) plus the derived fields; Kafka's default limit of 1 MB is too small.
    return settings.INGEST_MAX_BYTES + 1024 * 1024


def kafka_config(**extra) -> dict:
    """Client settings shared by producers, consumers and the admin client."""
    config = {
        "bootstrap.servers": settings.KAFKA_BOOTSTRAP_SERVERS,
        "security.protocol": settings.KAFKA_SECURITY_PROTOCOL,
        # librdkafka backs off up to 10 s between reconnects by default: too slow to notice a broker is back.
        "reconnect.backoff.max.ms": 1000,
        # librdkafka's own log lines through Python logging (served by poll), not raw on stderr.
        "logger": _client_log,
    }
    if settings.KAFKA_SASL_MECHANISM:
        config["sasl.mechanism"] = settings.KAFKA_SASL_MECHANISM
        config["sasl.username"] = settings.KAFKA_SASL_USERNAME or ""
        config["sasl.password"] = settings.KAFKA_SASL_PASSWORD or ""
    config.update(extra)
    return config


def topics_ensure(*, timeout: float = 10.0) -> list[str]:
    """Create the span topics that are missing; answer the names created. Raises KafkaException."""
    wanted = {
        Topic.SPANS_RAW: settings.KAFKA_SPAN_PARTITIONS,
        # Poison messages are rare: one partition keeps them in arrival order.
        Topic.SPANS_DLQ: 1,
    }
    admin = AdminClient(kafka_config())
    existing = admin.list_topics(timeout=timeout).topics
    for name, partitions in wanted.items():
        if name in existing and len(existing[name].partitions) < partitions:
            # Not changed automatically: more partitions move trace_ids to other partitions.
            log.warning("topic %s has %d partitions, KAFKA_SPAN_PARTITIONS asks for %d; add them with Kafka's tools",
                        name, len(existing[name].partitions), partitions)
    config = {"max.message.bytes": str(message_max_bytes())}
    missing = [NewTopic(str(name), num_partitions=partitions, replication_factor=settings.KAFKA_REPLICATION_FACTOR,
                        config=config)
               for name, partitions in wanted.items() if name not in existing]
    created = []
    if missing:
        for name, future in admin.create_topics(missing, request_timeout=timeout).items():
            try:
                future.result(timeout)
                created.append(name)
                log.info("created Kafka topic %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another process was first
                    raise
    return created


@dataclass(eq=False)
class _Request:
    """The messages of one request: the request thread waits on `done`."""

    expected: int
    results: list = field(default_factory=list)  # list.append is atomic: safe from the poller thread
    done: threading.Event = field(default_factory=threading.Event)

    def delivered(self, err, msg) -> None:
        self.results.append(err)
        if len(self.results) >= self.expected:
            self.done.set()


class _Handle:
    """A producer of this process with the thread that serves its callbacks."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.fatal: KafkaError | None = None
        self.retired = False  # replaced on the next request (fatal error, or failing repeatedly)
        self.failures = 0  # requests failed in a row
        self.topics_ready = False
        self.timeout_ms = settings.KAFKA_DELIVERY_TIMEOUT_MS
        self.producer = Producer(kafka_config(**{
            "client.id": f"llm-observe-web-{os.getpid()}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": message_max_bytes() + 64 * 1024,  # + protocol overhead
            # A message not acknowledged in time fails its request (503) instead of waiting on.
            "message.timeout.ms": self.timeout_ms,
            "error_cb": self._on_error,
        }))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kafka-producer-poll", daemon=True)
        self._thread.start()

    def _on_error(self, err: KafkaError) -> None:
        if _is_fatal(err):
            self.mark_fatal(err)
        elif err.code() not in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.warning("Kafka producer error: %s", err)

    def mark_fatal(self, err: KafkaError) -> None:
        # The idempotence guarantees are gone for this producer (e.g. a broker that lost its
        # producer state): the next request gets a new one.
        if self.fatal is None:
            log.error("Kafka producer cannot go on, replacing it: %s", err)
            self.fatal = err
            self.retired = True

    def record(self, ok: bool) -> None:
        self.failures = 0 if ok else self.failures + 1
        if self.failures >= RETIRE_AFTER_FAILURES and not self.retired:
            # Some broker states are never left by the same producer (librdkafka keeps bumping
            # the epoch of a producer id the broker forgot). A new producer costs a connection;
            # a span is never duplicated by it, the store being idempotent on span_id.
            log.warning("Kafka producer failed %d requests in a row; replacing it", self.failures)
            self.retired = True

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.1)
            except KafkaException as exc:
                # Raised once for a fatal error; keep serving so the queued messages get their failure reports.
                self.mark_fatal(exc.args[0])

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.producer.flush(timeout)


_lock = threading.Lock()
_handle: _Handle | None = None


def _current() -> _Handle:
    global _handle
    # The pid is part of the key: a forked child never uses its parent's producer.
    key = (os.getpid(), settings.KAFKA_BOOTSTRAP_SERVERS, settings.KAFKA_DELIVERY_TIMEOUT_MS)
    handle = _handle
    if handle is not None and handle.key == key and not handle.retired:
        return handle
    with _lock:
        handle = _handle
        if handle is None or handle.key != key or handle.retired:
            if handle is not None and handle.key[0] == key[0]:
                # Closed aside, after the delivery reports of requests still waiting on it.
                threading.Thread(target=handle.close, args=(handle.timeout_ms / 1000 + 1,), daemon=True).start()
            handle = _handle = _Handle(key)
    return handle


def producer_close(timeout: float = 5.0) -> None:
    """Flush and drop this process's producer (tests, shutdown)."""
    global _handle
    with _lock:
        handle, _handle = _handle, None
    if handle is not None and handle.key[0] == os.getpid():
        handle.close(timeout)


def spans_produce(*, rows: list[dict]) -> None:
    """Produce prepared rows to `llm.spans.raw`; return once the broker acknowledged all of them."""
    if not rows:
        return
    payloads = [(row["trace_id"].encode(), SpanMessage.from_row(row).to_bytes()) for row in rows]
    for attempt in (1, 2):
        handle = _current()
        try:
            _produce(handle, payloads)
            handle.record(ok=True)
            break
        except BrokerUnavailable as exc:
            if exc.reason != "unreachable":  # that one never reached the producer
                handle.record(ok=False)
            # A producer hit by a fatal error (e.g. a broker that lost its producer state) is
            # replaced; the request gets one more try with the new one before answering 503.
            if attempt == 1 and handle.fatal is not None:
                continue
            metrics.PRODUCE_FAILURES.labels(exc.reason).inc()
            raise
    metrics.SPANS_PRODUCED.labels(str(Topic.SPANS_RAW)).inc(len(rows))


def _is_fatal(err: KafkaError) -> bool:
    return err.fatal() or err.code() in _PRODUCER_STATE_LOST or err.code() == KafkaError._FATAL


def _produce(handle: _Handle, payloads: list[tuple[bytes, bytes]]) -> None:
    timeout = handle.timeout_ms / 1000
    if not handle.topics_ready:
        try:
            topics_ensure(timeout=min(timeout, 5.0))
            handle.topics_ready = True
        except KafkaException as exc:
            raise BrokerUnavailable(f"the Kafka broker is unavailable ({exc.args[0].str()}); nothing was accepted, "
                                    "retry", reason="unreachable") from None
    limit = message_max_bytes()
    too_large = next((i for i, (_, value) in enumerate(payloads) if len(value) > limit), None)
    if too_large is not None:
        raise SpanTooLarge(f"span {too_large} of the request is {len(payloads[too_large][1])} bytes as a message, "
                           f"over the limit of {limit}; nothing was accepted")
    request = _Request(expected=len(payloads))
    producer, topic = handle.producer, str(Topic.SPANS_RAW)
    deadline = time.monotonic() + timeout
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=request.delivered)
                break
            except BufferError:
                # The local queue is full: the poller thread drains it as the broker acknowledges.
                if time.monotonic() > deadline:
                    raise BrokerUnavailable("the Kafka producer queue is full; nothing was accepted, retry",
                                            reason="queue_full") from None
                time.sleep(0.005)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise SpanTooLarge(f"a span is too large for the Kafka producer ({exc.args[0].str()})") from None
                if _is_fatal(exc.args[0]):
                    handle.mark_fatal(exc.args[0])
                raise BrokerUnavailable(f"the Kafka producer refused the message ({exc.args[0].str()}); retry",
                                        reason="produce_error") from None
    # Every message has a delivery report by message.timeout.ms; the margin covers the poller's tick.
    if not request.done.wait(timeout + 2.0):
        raise BrokerUnavailable("the Kafka broker did not acknowledge in time; retry", reason="timeout")
    errors = [err for err in request.results if err is not None]
    if errors:
        if any(err.code() in _TOPIC_GONE for err in errors):
            handle.topics_ready = False
        if any(err.code() == KafkaError.MSG_SIZE_TOO_LARGE for err in errors):
            raise SpanTooLarge("the Kafka topic refused a span as too large (its max.message.bytes is below "
                               f"{message_max_bytes()}); {len(payloads) - len(errors)} of {len(payloads)} "
                               "were accepted")
        fatal = next((err for err in errors if _is_fatal(err)), None)
        if fatal is not None:
            handle.mark_fatal(fatal)
        raise BrokerUnavailable(f"the Kafka broker did not acknowledge {len(errors)} of {len(payloads)} spans "
                                f"({errors[0].str()}); retry the request", reason="not_acknowledged")
