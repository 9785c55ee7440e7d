"""The optional transport straight to Kafka (`pip install 'instrumentation-sdk[kafka]'`).

Spans are written to the appliance's topic (`llm.spans.raw`) in the format of its
frozen contract (`ingest.contracts.SpanMessageV1`, schema "llm-observe.span",
version 1; key = trace_id), which this package cannot import: the field list is
repeated here and a test keeps the two equal. Two headers mark the message as a
client's span: the appliance's consumer resolves the project from the key header
and validates, scans, samples and prices the span as the HTTP API would.

Same guarantees as HTTP: an idempotent producer (acks=all), a batch counts as sent
only when the delivery report of every one of its messages came back without error,
and whatever is not confirmed stays in (or goes to) the WAL. confluent-kafka is
imported here only, when the transport is first used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any

from instrumentation_sdk import __version__

log = logging.getLogger("instrumentation_sdk")

# --- the contract, as the consumer reads it --------------------------------------------------

SPAN_SCHEMA = "llm-observe.span"
SPAN_VERSION = 1
HEADER_ORIGIN = "llm-observe.origin"
HEADER_KEY = "llm-observe.key"
PROJECT_FROM_KEY = 0  # the consumer takes the project from the key header
KEY_PREFIX = "llmo_"

FIELD_NAMES = (
    "project_id", "span_id", "trace_id", "timestamp_utc", "received_at", "schema_version", "status",
    "is_sampled", "retry_count", "pii_detected", "injection_attempt", "parent_span_id", "model", "provider",
    "service_name", "endpoint", "environment", "user_id", "session_id", "finish_reason", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "token_count_method", "latency_ms_ttft",
    "latency_ms_total", "cost_usd_micro", "price_version", "attempted_models", "matched_patterns", "scan_status",
    "prompt", "response", "prompt_hash", "error_type", "error_message", "metadata",
)
# What the appliance derives itself; a span that carries one of these keeps it in its metadata,
# like an unknown key sent over HTTP.
SERVER_FIELDS = frozenset({"project_id", "received_at", "cost_usd_micro", "price_version", "matched_patterns",
                           "scan_status", "prompt_hash"})
_STR_FIELDS = ("span_id", "trace_id", "status", "parent_span_id", "model", "provider", "service_name", "endpoint",
               "environment", "user_id", "session_id", "finish_reason", "token_count_method", "prompt", "response",
               "error_type", "error_message")
_INT_FIELDS = ("schema_version", "retry_count", "prompt_tokens", "completion_tokens", "cached_tokens",
               "reasoning_tokens")
_FLOAT_FIELDS = ("latency_ms_ttft", "latency_ms_total")
_BOOL_FIELDS = ("is_sampled", "pii_detected", "injection_attempt")
# The span keys the HTTP API knows ("text" is 1.8.1's name of the prompt); any other key is metadata.
_KNOWN = frozenset(FIELD_NAMES) - SERVER_FIELDS | {"text"}

try:  # faster, optional (the appliance writes its messages with orjson)
    import orjson

    _loads = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class InvalidSpan(ValueError):
    """A span that cannot be put into a message; retrying cannot help (the HTTP API would reject it too)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class KafkaUnavailable(Exception):
    """The transport cannot be used here (confluent-kafka missing, settings refused)."""


_TRUE_TEXT = {"1", "true", "t", "yes", "y", "on"}
_FALSE_TEXT = {"0", "false", "f", "no", "n", "off"}


def _bool(value: Any, field_name: str) -> bool:
    """The HTTP API's (pydantic's) reading of a boolean; None is False."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_TEXT | _FALSE_TEXT:
        return value.strip().lower() in _TRUE_TEXT
    raise InvalidSpan(field_name, f"not a boolean: {value!r}"[:200])


def _timestamp(value: Any, field_name: str) -> str:
    """RFC 3339 with an explicit offset, as the contract wants (and as orjson writes a datetime)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidSpan(field_name, f"not an ISO 8601 timestamp: {value[:40]!r}") from None
    else:
        raise InvalidSpan(field_name, f"not a timestamp ({type(value).__name__})")
    if parsed.tzinfo is None:  # naive means UTC, as on the HTTP API
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc).isoformat()
    except (OverflowError, ValueError):
        raise InvalidSpan(field_name, "out of range") from None


def encode(body: bytes, received_at: str) -> tuple[bytes, bytes]:
    """A prepared span (the JSON the HTTP transport would post) -> (key, value) of a SpanMessageV1."""
    span = _loads(body)
    if not isinstance(span, dict):
        raise InvalidSpan("span", "not a JSON object")
    payload: dict[str, Any] = {"schema": SPAN_SCHEMA, "version": SPAN_VERSION}
    for name in FIELD_NAMES:
        payload[name] = None
    extra = {k: v for k, v in span.items() if k not in _KNOWN}
    for name in _STR_FIELDS:
        value = span.get(name)
        if value is not None:
            payload[name] = value if isinstance(value, str) else str(value)
    if payload["prompt"] is None and span.get("text") is not None:
        payload["prompt"] = str(span["text"])
    for name in _INT_FIELDS:
        value = span.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not value.is_integer()):
            raise InvalidSpan(name, f"not an integer: {value!r}"[:200])
        payload[name] = int(value)
    for name in _FLOAT_FIELDS:
        value = span.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidSpan(name, f"not a number: {value!r}"[:200])
        payload[name] = float(value) if math.isfinite(value) else None  # NaN is null in JSON, as over HTTP
    for name in _BOOL_FIELDS:
        payload[name] = _bool(span.get(name), name)
    models = span.get("attempted_models")
    if models is not None:
        payload["attempted_models"] = [str(m) for m in (models if isinstance(models, list) else [models])]
    meta = span.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        meta = {"value": meta}
    if extra:
        meta = {**(meta or {}), **extra}
    payload["metadata"] = meta or None
    if not payload["span_id"] or not payload["trace_id"]:
        raise InvalidSpan("span_id" if not payload["span_id"] else "trace_id", "missing")
    payload["project_id"] = PROJECT_FROM_KEY
    payload["schema_version"] = 1 if payload["schema_version"] is None else payload["schema_version"]
    payload["status"] = payload["status"] or "success"
    payload["retry_count"] = payload["retry_count"] or 0
    ts = span.get("timestamp_utc")
    payload["timestamp_utc"] = _timestamp(ts, "timestamp_utc") if ts is not None else received_at
    payload["received_at"] = received_at
    return payload["trace_id"].encode("utf-8"), _dumps(payload)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def key_header(api_key: str) -> bytes:
    """'<prefix>:<sha256 hex>': the consumer finds the key by its prefix and compares the hash.

    The hash, not the key: the key would otherwise sit in the topic for its retention,
    readable by every consumer, and be good for the HTTP API too.
    """
    key = api_key.strip()
    prefix = ""
    if key.startswith(KEY_PREFIX):
        parts = key[len(KEY_PREFIX):].split("_", 1)
        if len(parts) == 2 and parts[0] and parts[1]:
            prefix = parts[0]
    if not prefix:
        raise ValueError("LLM_OBSERVE_API_KEY is not an llm-observe key (llmo_<prefix>_<secret>)")
    return f"{prefix}:{hashlib.sha256(key.encode('utf-8')).hexdigest()}".encode("ascii")


def headers_for(api_key: str) -> list[tuple[str, bytes]]:
    return [(HEADER_ORIGIN, f"instrumentation-sdk/{__version__}".encode()), (HEADER_KEY, key_header(api_key))]


# --- the producer ------------------------------------------------------------------------------


class _RepeatFilter(logging.Filter):
    """librdkafka logs a failed connect every second while the broker is away: once a minute is plenty."""

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(key, -self.window) < self.window:
                return False
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = now
        return True


_client_log = logging.getLogger("instrumentation_sdk.kafka")
_client_log.addFilter(_RepeatFilter())


class _LibrdkafkaLog:
    """librdkafka's own lines, at DEBUG: what matters to the application (cannot deliver, fatal error,
    authentication refused) is said by the SDK's rate-limited warnings instead of once a second."""

    @staticmethod
    def log(level: int, msg: str, *args: Any) -> None:
        _client_log.debug(msg, *args)

# Beyond Kafka's default of 1 MB: a span may carry a long prompt and response. The topic's
# max.message.bytes (the appliance creates it with 6 MB) is what finally decides.
MESSAGE_MAX_BYTES = 8 * 1024 * 1024
RETIRE_AFTER_FAILURES = 2


def transport_key(cfg) -> tuple:
    """What a producer depends on: a change of any of it means a new producer."""
    return (os.getpid(), cfg.kafka_bootstrap_servers, cfg.kafka_topic, cfg.timeout,
            tuple(sorted((str(k), str(v)) for k, v in (cfg.kafka_config or {}).items())))


@dataclass
class SendResult:
    ok: bool
    delivered: int = 0
    too_large: list[int] = field(default_factory=list)  # indexes of messages the broker will never take
    error: str = ""


def client_settings(cfg, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka settings of a client of the configured broker: ours, then the user's (SASL, TLS, ...)."""
    settings: dict[str, Any] = {
        "bootstrap.servers": cfg.kafka_bootstrap_servers,
        # librdkafka waits up to 10 s between reconnects by default: too slow to notice a broker is back.
        "reconnect.backoff.max.ms": 1000,
        "logger": _LibrdkafkaLog(),
        **(extra or {}),
    }
    settings.update(cfg.kafka_config or {})
    return settings


class KafkaTransport:
    """One idempotent producer, used by the sender thread only (it serves the delivery reports itself)."""

    def __init__(self, cfg) -> None:
        try:
            import confluent_kafka
        except ImportError as exc:
            raise KafkaUnavailable("the Kafka transport needs confluent-kafka: "
                                   "pip install 'instrumentation-sdk[kafka]'") from exc
        self._ck = confluent_kafka
        self.key = transport_key(cfg)
        self.pid = os.getpid()
        self.topic = cfg.kafka_topic
        self.timeout = max(1.0, float(cfg.timeout))
        self.fatal: Any = None
        self.failures = 0
        self.retired = False
        settings = client_settings(cfg, {
            "client.id": f"llm-observe-sdk-{os.getpid()}",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": MESSAGE_MAX_BYTES,
            # Every message gets its delivery report within this time: a batch is then known
            # to be confirmed or not, and nothing of it is still pending in the producer.
            "message.timeout.ms": int(self.timeout * 1000),
            "error_cb": self._on_error,
        })
        # Not negotiable: what the WAL's "delete after the acknowledgement" relies on.
        settings.update({"enable.idempotence": True, "acks": "all"})
        try:  # a batch waits for its reports as long as the producer may take to give them
            self.timeout = max(1.0, float(settings["message.timeout.ms"]) / 1000)
        except (TypeError, ValueError):
            pass
        try:
            self.producer = confluent_kafka.Producer(settings)
        except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
            raise KafkaUnavailable(f"the Kafka settings were refused: {exc}") from exc

    def _on_error(self, err) -> None:
        if err.fatal() or err.code() == self._ck.KafkaError._FATAL:
            self._mark_fatal(err)
        elif err.code() not in (self._ck.KafkaError._TRANSPORT, self._ck.KafkaError._ALL_BROKERS_DOWN):
            # Authentication, TLS, authorisation...: a configuration problem worth seeing (once a minute).
            _client_log.warning("llm-observe: Kafka producer error: %s", err.str())

    def _mark_fatal(self, err) -> None:
        # The idempotence guarantees are gone for this producer (e.g. a broker that lost its
        # producer state): the next batch gets a new one.
        if self.fatal is None:
            log.warning("llm-observe: Kafka producer fatal error, replacing the producer: %s", err)
            self.fatal = err
            self.retired = True

    def poll(self) -> None:
        """Serve log lines and error callbacks while idle."""
        try:
            self.producer.poll(0)
        except self._ck.KafkaException as exc:
            self._mark_fatal(exc.args[0])

    def send(self, messages: list[tuple[bytes, bytes]], headers: list[tuple[str, bytes]]) -> SendResult:
        """Produce the messages and wait for every delivery report (at most about `timeout` seconds)."""
        ck = self._ck
        results: dict[int, Any] = {}

        def delivered(index: int, err, msg) -> None:
            results[index] = err

        producer = self.producer
        too_large: list[int] = []
        produced = 0
        deadline = time.monotonic() + self.timeout
        for index, (key, value) in enumerate(messages):
            while True:
                try:
                    producer.produce(self.topic, value=value, key=key, headers=headers,
                                     on_delivery=partial(delivered, index))
                    produced += 1
                    break
                except BufferError:  # the local queue is full: wait for acknowledgements to drain it
                    if time.monotonic() > deadline:
                        return self._failed("the producer's queue stayed full")
                    self._serve(0.05)
                except ck.KafkaException as exc:
                    err = exc.args[0]
                    if err.code() == ck.KafkaError.MSG_SIZE_TOO_LARGE:
                        too_large.append(index)
                        break
                    if err.fatal():
                        self._mark_fatal(err)
                    return self._failed(f"the producer refused a message ({err.str()})")
        # message.timeout.ms bounds every report; the margin covers the delivery of the last ones.
        wait_until = time.monotonic() + self.timeout + 2.0
        while len(results) < produced:
            left = wait_until - time.monotonic()
            if left <= 0:
                return self._failed(f"{produced - len(results)} of {produced} messages not acknowledged in time")
            self._serve(min(left, 0.1))
        errors = []
        for index, err in results.items():
            if err is None:
                continue
            if err.code() == ck.KafkaError.MSG_SIZE_TOO_LARGE:
                too_large.append(index)
            else:
                errors.append(err)
                if err.fatal():
                    self._mark_fatal(err)
        if errors:
            return self._failed(f"{len(errors)} of {produced} messages not acknowledged ({errors[0].str()})")
        self.failures = 0
        return SendResult(True, delivered=sum(1 for err in results.values() if err is None),
                          too_large=sorted(set(too_large)))

    def _serve(self, seconds: float) -> None:
        try:
            self.producer.poll(seconds)
        except self._ck.KafkaException as exc:
            self._mark_fatal(exc.args[0])

    def _failed(self, error: str) -> SendResult:
        self.failures += 1
        if self.failures >= RETIRE_AFTER_FAILURES:
            # Some broker states are never left by the same producer (librdkafka keeps bumping the
            # epoch of a producer id the broker forgot, e.g. after a broker restart). A new producer
            # costs a connection; a span re-sent by it is stored once (span_id).
            self.retired = True
        return SendResult(False, error=error)

    def close(self, timeout: float = 1.0) -> None:
        """Flush (bounded) and release the producer; called on the sender's own process only."""
        producer, self.producer = self.producer, None
        if producer is None:
            return
        try:
            producer.flush(timeout)
        except Exception:  # noqa: BLE001
            pass
        del producer

    def dispose(self) -> None:
        """Drop a retired producer off the sender thread: destroying it can take a moment."""
        producer, self.producer = self.producer, None
        if producer is None:
            return

        def _destroy(p=producer) -> None:
            try:
                p.purge()
                p.flush(1)
            except Exception:  # noqa: BLE001
                pass

        threading.Thread(target=_destroy, name="llm-observe-kafka-close", daemon=True).start()


def check_topic(cfg, timeout: float = 10.0) -> tuple[bool, str]:
    """(ok, message): does the broker answer with these settings, and does the spans topic exist?"""
    try:
        import confluent_kafka
    except ImportError:
        return False, "the Kafka transport needs confluent-kafka: pip install 'instrumentation-sdk[kafka]'"
    where = f"Kafka {cfg.kafka_bootstrap_servers}"
    try:
        client = confluent_kafka.Producer(client_settings(cfg))
    except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
        return False, f"the Kafka settings were refused: {exc}"
    try:
        metadata = client.list_topics(timeout=timeout)  # every topic: asking for one by name may create it
    except confluent_kafka.KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        return False, f"cannot reach {where}: {getattr(error, 'str', lambda: error)()}"
    topic = metadata.topics.get(cfg.kafka_topic)
    if topic is None or topic.error is not None:
        return False, (f"{where} answers but has no topic {cfg.kafka_topic!r} (the appliance creates it when it "
                       f"starts with KAFKA_BOOTSTRAP_SERVERS set; or set LLM_OBSERVE_KAFKA_TOPIC)")
    return True, f"OK: {where} has the topic {cfg.kafka_topic} ({len(topic.partitions)} partitions)"
