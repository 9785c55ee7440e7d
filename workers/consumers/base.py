"""The loop every Kafka consumer shares: batch, process, dead-letter, commit.

At-least-once: offsets are committed (synchronously) only after the batch was written
and its poison messages were acknowledged by the dead-letter topic, so a crash at any
point re-delivers the uncommitted messages; writers must be idempotent. A transient
failure (database or broker away) retries the same batch with backoff while the
partitions are paused, so the group membership stays alive and nothing later is read
or committed past the messages not yet written.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from django.conf import settings

from ingest import kafka_metrics as metrics
from ingest.producer import kafka_config, message_max_bytes, topics_ensure

log = logging.getLogger(__name__)

# A retry against a database or broker that is still down costs one refused connection: a short
# ceiling is cheap, and a longer one is added, whole, to the time it takes to notice they are back.
MAX_BACKOFF_SECONDS = 2.0
HEADER_REASON = "dlq.reason"
# On a dead letter whose value held PII: "1" when it was redacted (the bytes are no longer the original
# ones), "error" when the scanner failed on it (kept as it came, not to lose it). Absent: bytes unchanged.
HEADER_REDACTED = "dlq.redacted"


@dataclass(frozen=True)
class Poison:
    """A message that can never be processed, and why: it goes to the dead-letter topic."""

    message: Message
    reason: str  # short code, a metric label
    detail: str

    @property
    def header(self) -> str:
        return f"{self.reason}: {self.detail}"[:2000]


class TransientError(Exception):
    """Worth retrying the whole batch later (dependency down); never a reason to drop a message."""


class BatchConsumer:
    """Subclasses set `name`, `topic`, `dlq_topic` and implement `process(messages) -> [Poison]`."""

    name: str
    topic: str
    dlq_topic: str
    # Exceptions of `process` that retry the batch instead of stopping the consumer.
    transient_errors: tuple[type[BaseException], ...] = (TransientError,)

    def __init__(self, *, batch_size: int | None = None, batch_ms: int | None = None,
                 group_id: str | None = None) -> None:
        self.batch_size = batch_size or settings.KAFKA_CONSUMER_BATCH_SIZE
        self.batch_timeout = (batch_ms or settings.KAFKA_CONSUMER_BATCH_MS) / 1000
        self.group_id = group_id or f"{settings.KAFKA_CONSUMER_GROUP_PREFIX}-{self.name}"
        self._stopping = threading.Event()
        self._assigned: set[tuple[str, int]] = set()
        self._consumer: Consumer | None = None
        self._dlq: Producer | None = None
        self._last_report = time.monotonic()
        self._counts = {"consumed": 0, "stored": 0, "dlq": 0}

    # --- to implement ----------------------------------------------------------
    def process(self, messages: list[Message]) -> list[Poison]:
        raise NotImplementedError

    def on_retry(self, exc: BaseException) -> None:
        """Called after a transient failure, before the backoff (e.g. drop a broken connection)."""

    # --- lifecycle -------------------------------------------------------------
    def stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        if not self._wait_for_topics():
            return
        pid = os.getpid()
        session = settings.KAFKA_SESSION_TIMEOUT_MS
        self._consumer = Consumer(kafka_config(**{
            "group.id": self.group_id,
            "client.id": f"llm-observe-{self.name}-{pid}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Eager range assignment: simple, and supported by every Kafka-protocol broker.
            "partition.assignment.strategy": "range",
            "session.timeout.ms": session,
            "heartbeat.interval.ms": max(500, min(3000, session // 3)),
            "error_cb": self._on_client_error,
        }))
        self._dlq = self._dlq_producer()
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        log.info("consumer %s: group %s, topic %s, batches of up to %d messages / %.0f ms",
                 self.name, self.group_id, self.topic, self.batch_size, self.batch_timeout * 1000)
        try:
            while not self.stopping:
                messages = self._consumer.consume(self.batch_size, self.batch_timeout)
                batch = [m for m in messages if self._usable(m)]
                if batch:
                    self._handle(batch)
                self._report()
        finally:
            self._close()

    def _dlq_producer(self) -> Producer:
        return Producer(kafka_config(**{
            "client.id": f"llm-observe-{self.name}-dlq-{os.getpid()}",
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": settings.KAFKA_DELIVERY_TIMEOUT_MS,
            "message.max.bytes": message_max_bytes() + 64 * 1024,
        }))

    def _close(self) -> None:
        log.info("consumer %s: stopping", self.name)
        try:
            self._dlq.flush(5)
        finally:
            # Leaves the group now, so the partitions move to another consumer without waiting for the session timeout.
            self._consumer.close()
            for topic, partition in self._assigned:
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(0)
            self._assigned.clear()
        log.info("consumer %s: stopped", self.name)

    def _wait_for_topics(self) -> bool:
        delay = 0.5
        while not self.stopping:
            try:
                created = topics_ensure(timeout=10)
                if created:
                    log.info("consumer %s: created topics %s", self.name, ", ".join(created))
                return True
            except KafkaException as exc:
                log.warning("consumer %s: Kafka not reachable yet (%s); retrying in %.1f s",
                            self.name, exc.args[0].str(), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        return False

    # --- callbacks (run inside consume/poll, on this thread) -------------------
    def _on_assign(self, consumer, partitions) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("consumer %s: assigned %s", self.name, _names(partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        # Every batch is committed before the next consume(), so nothing read is left
        # uncommitted here; a batch still being retried drops these partitions' messages
        # (their new owner re-reads them from the committed offset).
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(0)
        log.info("consumer %s: revoked %s", self.name, _names(partitions))

    def _on_client_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("consumer %s: fatal Kafka error: %s", self.name, err)
        elif err.code() not in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.warning("consumer %s: Kafka error: %s", self.name, err)

    def _usable(self, message: Message) -> bool:
        err = message.error()
        if err is None:
            return True
        if err.fatal():
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer %s: %s", self.name, err)
        return False

    # --- one batch ---------------------------------------------------------------
    def _handle(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        metrics.SPANS_CONSUMED.labels(self.topic).inc(len(batch))
        self._counts["consumed"] += len(batch)
        state: dict = {"batch": batch}

        def process() -> None:
            state["poison"] = self.process(state["batch"])

        if not self._until_done(process, state):
            return
        poison = state["poison"]
        if poison:
            if not self._until_done(lambda: self._dead_letter(poison), state):
                return
            self._counts["dlq"] += len(poison)
        self._commit(state["batch"])
        metrics.BATCH_SECONDS.labels(self.topic).observe(time.perf_counter() - started)
        self._update_lag()

    def _until_done(self, step: Callable[[], None], state: dict) -> bool:
        """Run `step` until it succeeds; False when the batch is given up (stopping, or all its partitions revoked)."""
        attempt = 0
        while True:
            try:
                step()
                return True
            except self.transient_errors as exc:
                attempt += 1
                metrics.STORE_RETRIES.labels(self.topic).inc()
                self.on_retry(exc)
                if self.stopping:
                    log.warning("consumer %s: stopping with a batch not written (%s); it is re-read on restart",
                                self.name, exc)
                    return False
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                # Retries come every 2 s through an outage: the first ones, then one a minute, are enough to read.
                if attempt <= 3 or attempt % 30 == 0:
                    log.warning("consumer %s: batch of %d not written (%s: %s); retry %d in %.1f s",
                                self.name, len(state["batch"]), type(exc).__name__, exc, attempt, delay)
                self._paused_wait(delay)
                state["batch"] = [m for m in state["batch"] if (m.topic(), m.partition()) in self._assigned]
                if not state["batch"]:
                    log.info("consumer %s: the partitions of the pending batch were revoked; dropped it", self.name)
                    return False

    def _paused_wait(self, seconds: float) -> None:
        """Wait while serving group callbacks (rebalances, heartbeats' poll interval) without reading on."""
        consumer = self._consumer
        deadline = time.monotonic() + seconds
        try:
            while not self.stopping and (left := deadline - time.monotonic()) > 0:
                # Again each time: a rebalance during the wait brings new, unpaused partitions.
                assignment = consumer.assignment()
                if assignment:
                    consumer.pause(assignment)
                message = consumer.poll(min(left, 0.5))
                if message is not None and message.error() is None:
                    # Fetched before the pause: rewind so it is read again after this batch.
                    try:
                        consumer.seek(TopicPartition(message.topic(), message.partition(), message.offset()))
                    except KafkaException as exc:
                        log.debug("consumer %s: rewind failed (%s); re-read from the committed offset", self.name, exc)
        finally:
            current = consumer.assignment()
            if current:
                consumer.resume(current)

    def _dead_letter(self, poison: list[Poison]) -> None:
        failures: list[KafkaError] = []

        def delivered(err, msg) -> None:
            if err is not None:
                failures.append(err)

        for item in poison:
            m = item.message
            value, redacted = redact_dead_letter(m.value())
            headers = list(m.headers() or [])
            if redacted:
                headers.append((HEADER_REDACTED, redacted.encode()))
            headers += [
                (HEADER_REASON, item.header.encode()),
                ("dlq.topic", m.topic().encode()),
                ("dlq.partition", str(m.partition()).encode()),
                ("dlq.offset", str(m.offset()).encode()),
                ("dlq.consumer", self.name.encode()),
            ]
            self._dlq.produce(self.dlq_topic, value=value, key=m.key(), headers=headers, on_delivery=delivered)
        remaining = self._dlq.flush(settings.KAFKA_DELIVERY_TIMEOUT_MS / 1000 + 2)
        if failures or remaining:
            # A new producer for the retry: some broker states are never left by the same one
            # (a forgotten producer id). Duplicates in the dead-letter topic are harmless.
            self._dlq.purge()
            self._dlq.flush(0)
            self._dlq = self._dlq_producer()
            try:
                topics_ensure(timeout=5)
            except KafkaException:
                pass
            raise TransientError(f"dead-letter topic did not acknowledge {len(failures) + remaining} messages"
                                 + (f" ({failures[0].str()})" if failures else ""))
        for item in poison:
            metrics.SPANS_DLQ.labels(self.topic, item.reason).inc()
            log.warning("consumer %s: message %s[%d]@%d sent to %s: %s", self.name, item.message.topic(),
                        item.message.partition(), item.message.offset(), self.dlq_topic, item.header)

    def _commit(self, batch: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for m in batch:
            key = (m.topic(), m.partition())
            offsets[key] = max(offsets.get(key, -1), m.offset() + 1)
        owned = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in self._assigned]
        if not owned:
            return
        try:
            self._consumer.commit(offsets=owned, asynchronous=False)
        except KafkaException as exc:
            # Written but not committed: re-delivered after the rebalance and skipped as duplicates.
            log.warning("consumer %s: offset commit failed (%s); the batch will be re-read", self.name, exc.args[0])

    def _update_lag(self) -> None:
        consumer = self._consumer
        assignment = consumer.assignment()
        if not assignment:
            return
        for tp in consumer.position(assignment):
            if tp.offset < 0:
                continue
            # Cached: the high watermark of the last fetch response, no round trip.
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report < 30:
            return
        self._update_lag()
        if self._counts["consumed"]:
            log.info("consumer %s: last %.0f s: %d consumed, %d stored, %d dead-lettered", self.name,
                     now - self._last_report, self._counts["consumed"], self._counts["stored"], self._counts["dlq"])
        self._last_report = now
        self._counts = dict.fromkeys(self._counts, 0)


def redact_dead_letter(value: bytes | None) -> tuple[bytes | None, str]:
    """A rejected message's value with its PII redacted, and what HEADER_REDACTED says ("" when unchanged).

    The dead-letter topic is disk, and a rejected message was never scanned (the SDK's own messages
    are, since 2.0, but an older client's or a hand-made one's are not). JSON: every string value at any
    depth, with the walk that scans a stored span's metadata (bounded; a value past a bound becomes
    "[NOT SCANNED]"), so it stays JSON and replayable. Anything else: its text (invalid UTF-8 replaced).
    A value without PII keeps its bytes, exactly.
    """
    if not value:
        return value, ""
    from instrumentation_sdk._fields import Verdict, scan_json_values

    from ingest.services.scanning import scanner

    try:
        engine = scanner()
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            result = engine.scan(value.decode("utf-8", "replace"), redact=True)
            return (result.redacted.encode(), "1") if result.pii_detected else (value, "")
        verdict = Verdict()
        after = scan_json_values(engine, doc, verdict, drop=False)
        if after is doc and not verdict.pii:
            return value, ""
        return orjson.dumps(after), "1"
    except Exception:  # noqa: BLE001 - a dead letter is never lost; the header says it was not scanned
        log.exception("scanning a dead letter failed; kept as it came")
        return value, "error"


def _names(partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
