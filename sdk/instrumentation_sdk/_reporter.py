"""Span delivery: `report()` appends to memory and returns; one background thread does the rest.

Path of a span:

    report() -> bounded in-memory deque --(sender thread, every flush_interval or
    batch_size spans)--> prepare (defaults, PII scan + redaction, JSON) -->
      appliance healthy and no backlog: gzip POST /v1/spans, done on 202
      otherwise (refused, timeout, 5xx, 429, 401/403): append to the SQLite WAL
    WAL rows are replayed oldest first once the appliance answers again and
    deleted only after its 202.

Queue full (the appliance is slower than the application): the caller's span goes
to a small spill list that is written to the WAL in chunks, so memory stays bounded
and nothing is dropped. At interpreter exit the queue is flushed (bounded by
`exit_flush_timeout`); whatever is still unsent then is written to the WAL.

The one window in which spans can be lost: spans still in memory (the deque, the
spill list of at most SPILL_CHUNK spans, the batch being posted) when the process
dies without running its exit handlers (SIGKILL, os._exit, power loss). That is at
most about `flush_interval` (0.2 s) worth of spans plus one batch. Everything that
reached the WAL survives (synchronous=FULL).

With no URL configured, spans are dropped and one warning is logged: nothing is
written to disk that no appliance will ever read.

Kafka transport (`transport="kafka"`, the `kafka` extra): the same queue, WAL, backoff
and exit flush; a batch is produced to the appliance's topic instead of POSTed, and
counts as sent (WAL rows deleted) only once the broker acknowledged every message
of it (see _kafka.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import tempfile
from pathlib import Path
from random import getrandbits as _getrandbits
import threading
import time
import weakref
from collections import deque
from datetime import datetime, timezone
from typing import Any, Iterable

from instrumentation_sdk import _kafka
from instrumentation_sdk._config import Config, get_config
from instrumentation_sdk._transport import HttpTransport, TransportError
from instrumentation_sdk._wal import WriteAheadLog
from instrumentation_sdk.sampling import should_sample
from instrumentation_sdk.scanning import default_scanner, prompt_text

try:  # faster, optional
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - depends on the environment
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

log = logging.getLogger("instrumentation_sdk")

SPILL_CHUNK = 256
WAL_CHUNK = 5000  # spans per WAL transaction while the appliance is away
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant
_CHECK_PID = not hasattr(os, "register_at_fork")  # elsewhere the fork hook resets reporters
EXTERNAL, INTERNAL, INTERNAL_SCANNED = 0, 1, 2  # where a queued span came from
MAX_BODY_BYTES = 4 * 1024 * 1024  # the appliance accepts 5 MB (after gunzip) per request
FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls", "error", "cancelled", "cache_hit",
                  "client_disconnect", "unspecified"}
FINISH_ALIASES = {
    "end_turn": "stop", "stop_sequence": "stop", "completed": "stop", "complete": "stop", "eos": "stop",
    "max_tokens": "length", "max_output_tokens": "length", "model_length": "length",
    "tool_use": "tool_calls", "function_call": "tool_calls", "tool_call": "tool_calls",
    "safety": "content_filter", "recitation": "content_filter", "refusal": "content_filter",
    "blocklist": "content_filter", "prohibited_content": "content_filter", "spii": "content_filter",
    "canceled": "cancelled", "abort": "cancelled", "aborted": "cancelled",
    "finish_reason_unspecified": "unspecified", "pause_turn": "unspecified", "other": "unspecified",
}
_TEXT_LIMITS = {"model": 200, "provider": 64, "service_name": 200, "endpoint": 500, "environment": 64,
                "user_id": 200, "session_id": 200, "error_type": 200, "error_message": 10_000,
                "span_id": 128, "trace_id": 128, "parent_span_id": 128}
_INT_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "retry_count")
_FLOAT_FIELDS = ("latency_ms_ttft", "latency_ms_total")


def new_span_id() -> str:
    """A random UUID4 as 32 hex digits (OTel's trace-id spelling; uuid.UUID() and the
    appliance's sampling rule read it as the same 16 bytes as the dashed form).

    From `random`, not os.urandom: ids must be unique, not secret, and this is the hot
    path. `random` reseeds itself in a forked child, so parent and child never collide.
    """
    return "%032x" % ((_getrandbits(128) & _UUID_CLEAR) | _UUID_SET)


_iso_cache: tuple = (None, "")  # (whole second, "YYYY-MM-DDTHH:MM:SS"), replaced as one object


def _iso(value: Any) -> Any:
    """ISO 8601 UTC text ("...Z") for epoch seconds/ms/ns numbers and datetimes; other values unchanged."""
    if type(value) is float and 1e8 < value < 1e11:  # the SDK's own timestamps: time.time()
        global _iso_cache
        second = int(value)
        cached_second, prefix = _iso_cache
        if cached_second != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            _iso_cache = (second, prefix)
        return f"{prefix}.{min(999_999, round((value - second) * 1e6)):06d}Z"
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds > 1e17:
            seconds /= 1e9
        elif seconds > 1e11:
            seconds /= 1e3
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        except (OverflowError, OSError, ValueError):
            return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return value


def normalise_finish_reason(value: Any) -> str | None:
    if value is None:
        return None
    text = str(getattr(value, "value", value)).strip().lower()
    if text.startswith("finishreason."):
        text = text.split(".", 1)[1]
    text = FINISH_ALIASES.get(text, text)
    return text if text in FINISH_REASONS else "unspecified"


class _RateLimitedLog:
    """At most one line per key every `every` seconds; the rest is counted and summarised."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.every:
            skipped = self._suppressed.pop(key, 0)
            suffix = f" ({skipped} similar messages suppressed)" if skipped else ""
            log.warning(message + suffix, *args)
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


class SpanReporter:
    """Delivers span dicts to the appliance. Thread-safe, fork-safe, never blocks on the network.

    Arguments left as None follow the process configuration (`configure()` / LLM_OBSERVE_*).
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, service_name: str | None = None,
                 environment: str | None = None, wal_path: str | None = None, **options: Any) -> None:
        self._overrides = {k: v for k, v in dict(url=url, api_key=api_key, service_name=service_name,
                                                   environment=environment, wal_path=wal_path, **options).items()
                           if v is not None}
        if "url" in self._overrides:
            self._overrides["url"] = str(self._overrides["url"]).rstrip("/")
        self._cfg_source: Config | None = None
        self._cfg_cached: Config | None = None
        self._init_state()
        _REPORTERS.add(self)

    def _init_state(self) -> None:
        self._queue: deque = deque()
        self._spill: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closing = False
        self._stopped = False
        self._wal: WriteAheadLog | None = None
        self._wal_for = None
        self._transport: HttpTransport | None = None
        self._kafka: _kafka.KafkaTransport | None = None  # created and used by the sender thread only
        self._backlog: bool | None = None  # None: not checked yet
        self._retry_at = 0.0
        self._backoff = 0.0
        self._inflight: list[tuple[str | None, bytes]] | None = None
        self._next_wal_check = 0.0
        self._warned_unconfigured = False
        self._logs = _RateLimitedLog()
        self.stats = {"sent": 0, "duplicates": 0, "rejected": 0, "wal_written": 0,
                      "wal_replayed": 0, "dropped": 0, "failed_posts": 0}
        self.last_rejections: deque = deque(maxlen=100)

    # -- configuration --------------------------------------------------------------

    @property
    def config(self) -> Config:
        source = get_config()
        if source is not self._cfg_source:
            from dataclasses import replace

            known = {k: v for k, v in self._overrides.items() if hasattr(source, k)}
            self._cfg_cached = replace(source, **known) if known else source
            self._cfg_source = source
        return self._cfg_cached  # type: ignore[return-value]

    def _reconfigured(self) -> None:
        self._cfg_source = None
        transport, self._transport = self._transport, None
        if transport is not None and self._thread is None:
            transport.close()
        self._backlog = None
        self._retry_at = 0.0
        self._warned_unconfigured = False

    # -- the hot path ---------------------------------------------------------------

    def report(self, span: dict) -> str | None:
        """Queue one span (a dict of span fields). Returns its span_id; never raises, never waits."""
        try:
            if not isinstance(span, dict):
                span = dict(span)
            span = dict(span)  # the caller may reuse its dict
            span_id = span.get("span_id")
            if not span_id:
                span_id = span["span_id"] = new_span_id()
            self._enqueue(span, EXTERNAL)
            return str(span_id)
        except Exception:  # noqa: BLE001 - observability must never break the application
            log.exception("llm-observe: could not queue a span")
            return None

    async def report_async(self, span: dict) -> str | None:
        """Same as report(): it does not wait for anything, so it is safe in an event loop."""
        return self.report(span)

    def submit(self, span: dict, prompt_scanned: bool = False) -> None:
        """Spans built by the SDK itself: a fresh, well-formed dict with a span_id."""
        self._enqueue(span, INTERNAL_SCANNED if prompt_scanned else INTERNAL)

    def _enqueue(self, span: dict, kind: int) -> None:
        cfg = self.config
        if not cfg.enabled:
            return
        if not cfg.has_destination:
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                if cfg.kafka:
                    log.warning("llm-observe: the Kafka transport has no bootstrap servers "
                                "(LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS or configure(kafka_bootstrap_servers=...)); "
                                "spans are not recorded")
                else:
                    log.warning("llm-observe: no appliance URL configured (LLM_OBSERVE_URL or configure(url=...)); "
                                "spans are not recorded")
            self.stats["dropped"] += 1
            return
        if _CHECK_PID and self._pid != os.getpid():
            self._after_fork()
        if self._stopped:  # reported after close() (a late atexit handler): straight to the WAL
            prepared = self._prepare(span, kind, cfg)
            if prepared:
                self._write_wal([prepared], cfg, from_exit=True)
            return
        queue = self._queue
        if len(queue) < cfg.queue_size:
            queue.append((span, kind))
            if self._thread is None:
                self._start()
            elif len(queue) >= cfg.batch_size and not self._wake.is_set():
                self._wake.set()
        else:
            self._overflow((span, kind), cfg)

    def _overflow(self, item: tuple, cfg: Config) -> None:
        with self._lock:
            self._spill.append(item)
            if len(self._spill) < SPILL_CHUNK:
                return
            chunk, self._spill = self._spill, []
        # The caller pays for this disk write, never for the network; amortised over SPILL_CHUNK spans.
        try:
            self._write_wal([r for r in (self._prepare(s, sc, cfg) for s, sc in chunk) if r], cfg, reason="spill")
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: could not spill %d spans to the WAL; they are lost", len(chunk))
            self.stats["dropped"] += len(chunk)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            thread = threading.Thread(target=self._run, name="llm-observe-sender", daemon=True)
            self._thread = thread
            thread.start()

    # -- flushing -------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._queue) + len(self._spill) + (len(self._inflight) if self._inflight else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued span was sent or written to the WAL. True when that happened in time."""
        deadline = time.monotonic() + timeout
        if self._thread is None or self._pid != os.getpid():
            return not self._queue
        with self._lock:
            spill, self._spill = self._spill, []
        for item in spill:
            self._queue.append(item)
        while True:
            with self._idle:
                if not self._queue and not self._busy:
                    return True
                self._wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded), then stop the sender; what is still unsent goes to the WAL."""
        cfg = self.config
        timeout = cfg.exit_flush_timeout if timeout is None else timeout
        if self._pid != os.getpid():
            return
        self._closing = True
        done = self.flush(timeout) if self._thread is not None else True
        self._stopped = True
        self._wake.set()
        if not done:
            self._persist_leftovers(cfg)
        thread = self._thread
        if thread is not None and done:
            thread.join(timeout=max(0.1, min(1.0, timeout)))
        if done and (thread is None or not thread.is_alive()):
            if self._wal is not None:
                self._wal.close()
            producer, self._kafka = self._kafka, None
            if producer is not None and producer.pid == os.getpid():
                producer.close(timeout=min(1.0, max(0.1, timeout)))

    def _persist_leftovers(self, cfg: Config) -> None:
        """Exit with the sender still busy (slow appliance): write queue and in-flight batch to the WAL."""
        rows: list[tuple[str | None, bytes]] = []
        inflight = self._inflight
        if inflight:
            rows.extend(inflight)  # may also reach the appliance: its span_id dedup keeps one copy
        with self._lock:
            spill, self._spill = self._spill, []
        items = list(self._queue) + spill
        self._queue.clear()
        for span, scanned in items:
            prepared = self._prepare(span, scanned, cfg)
            if prepared:
                rows.append(prepared)
        if rows:
            try:
                self._write_wal(rows, cfg, from_exit=True)
            except Exception:  # noqa: BLE001
                log.exception("llm-observe: %d spans could not be written to the WAL at exit", len(rows))

    # -- the sender thread ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            cfg = self.config
            wait = cfg.flush_interval
            if self._backlog:
                # replaying: go on at once; backing off: wake when the backoff ends
                wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            with self._idle:
                self._busy = True
            try:
                self._cycle(self.config)
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("llm-observe: sender error")
                time.sleep(0.5)
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()
            if self._stopped and not self._queue:
                return

    def _cycle(self, cfg: Config) -> None:
        if self._kafka is not None:
            self._kafka.poll()
        if self._backlog is None or time.monotonic() >= self._next_wal_check:
            self._check_wal(cfg)
        queue = self._queue
        # Fresh spans first: posted straight away while the appliance answers, into the WAL while it
        # does not. (A WAL backlog does not hold them back: the appliance orders by timestamp, and
        # replaying old rows must not make new ones wait on disk.)
        while queue:
            backing_off = self._retry_at > time.monotonic()
            # To the WAL: big transactions (one fsync each); to the appliance: one request's worth.
            take = min(WAL_CHUNK if backing_off else cfg.batch_size, len(queue))
            items = []
            for _ in range(take):
                try:
                    items.append(queue.popleft())
                except IndexError:
                    break
            rows = [r for r in (self._prepare(span, kind, cfg) for span, kind in items) if r]
            if not rows:
                continue
            if backing_off:
                self._write_wal(rows, cfg)
                continue
            self._inflight = rows
            try:
                outcome = self._send(rows, cfg)
            finally:
                self._inflight = None
            if outcome == "ok":
                self._backoff = 0.0
            else:
                self._write_wal(rows, cfg)
                self._failed(outcome)
        if self._spill:  # overflow leftovers (fewer than SPILL_CHUNK)
            with self._lock:
                spill, self._spill = self._spill, []
            rows = [r for r in (self._prepare(span, kind, cfg) for span, kind in spill) if r]
            self._write_wal(rows, cfg, reason="spill")
        # Everything handed to report() so far is now sent or on disk: that is what flush() waits for.
        with self._idle:
            self._busy = False
            self._idle.notify_all()
        # Replay the WAL while the appliance answers, oldest rows first; fresh spans go first.
        while self._backlog and self._retry_at <= time.monotonic() and not self._stopped:
            if not self._replay_once(cfg):
                break
            if queue or self._spill:
                break

    def _replaying(self) -> bool:
        return bool(self._backlog) and self._retry_at <= time.monotonic()

    def _check_wal(self, cfg: Config) -> None:
        self._next_wal_check = time.monotonic() + 30.0
        wal = self._get_wal(cfg, create=False)
        if wal is None:
            self._backlog = False
            return
        try:
            wal.release_dead_leases()
            self._backlog = wal.has_rows(cfg.destination)
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: cannot read the WAL %s", wal.path)
            self._backlog = False

    def _replay_once(self, cfg: Config) -> bool:
        wal = self._get_wal(cfg, create=True)
        lease = max(30.0, 3 * cfg.timeout)
        rows = wal.claim(cfg.destination, limit=cfg.batch_size, max_bytes=MAX_BODY_BYTES, lease_seconds=lease)
        if not rows:
            wal.release_dead_leases()
            self._backlog = wal.has_rows(cfg.destination)
            if self._backlog:  # rows leased by another live process: look again later
                self._retry_at = time.monotonic() + min(5.0, cfg.backoff_max)
            return False
        ids = [row_id for row_id, _ in rows]
        outcome = self._send([(None, body) for _, body in rows], cfg)
        if outcome == "ok":
            wal.delete(ids)
            self.stats["wal_replayed"] += len(ids)
            self._backoff = 0.0
            return True
        wal.release(ids)
        self._failed(outcome)
        return False

    def _failed(self, outcome: str) -> None:
        cfg = self.config
        self._backlog = True
        self.stats["failed_posts"] += 1
        if outcome == "auth":
            self._backoff = cfg.backoff_max
        else:
            self._backoff = min(cfg.backoff_max, max(cfg.backoff_initial, self._backoff * 2))
        delay = self._backoff * (0.8 + 0.4 * random.random())
        if self._retry_after:
            delay = max(delay, min(self._retry_after, cfg.backoff_max))
        self._retry_at = time.monotonic() + delay

    _retry_after: float | None = None

    def _get_wal(self, cfg: Config, *, create: bool) -> WriteAheadLog | None:
        path = cfg.resolved_wal_path()
        if self._wal is not None and self._wal_for == path:
            return self._wal
        if not create and not path.exists():
            return None
        if cfg.wal_path is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:  # read-only home (containers): a private folder in the temp dir
                fallback = Path(tempfile.gettempdir()) / f"llm-observe-{os.getuid() if hasattr(os, 'getuid') else 0}"
                log.warning("llm-observe: cannot create %s (%s); the span WAL goes to %s", path.parent, exc, fallback)
                self._wal = WriteAheadLog(fallback / path.name, max_rows=cfg.wal_max_rows)
                self._wal_for = path
                return self._wal
        self._wal = WriteAheadLog(path, max_rows=cfg.wal_max_rows)
        self._wal_for = path
        return self._wal

    def _write_wal(self, rows: list[tuple[str | None, bytes]], cfg: Config, from_exit: bool = False,
                   reason: str = "down") -> None:
        if not rows:
            return
        try:
            wal = self._get_wal(cfg, create=True)
            wal.append(cfg.destination, rows)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions: say so, keep going
            self.stats["dropped"] += len(rows)
            self._logs.warning("walfail", "llm-observe: could not write %d spans to the WAL %s (%s); they are lost",
                               len(rows), cfg.resolved_wal_path(), exc)
            return
        self._backlog = True
        self.stats["wal_written"] += len(rows)
        if from_exit:
            return
        if reason == "spill":
            self._logs.warning("spill", "llm-observe: more than %d spans waiting for %s; the excess is kept in %s",
                               cfg.queue_size, cfg.target, wal.path)
        elif self._retry_at > time.monotonic() or self.stats["failed_posts"]:
            self._logs.warning("wal", "llm-observe: %s not reachable; spans kept in %s and sent "
                               "when it is back", cfg.target, wal.path)

    def _send(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        """Deliver one batch with the configured transport: 'ok', 'transient' or 'auth' (keep the rows)."""
        if cfg.kafka:
            return self._produce(rows, cfg)
        return self._post(rows, cfg)

    # -- Kafka ----------------------------------------------------------------------

    def _produce(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        """Produce one batch to the appliance's topic; 'ok' only when every message was acknowledged."""
        self._retry_after = None
        if not cfg.api_key:
            self._logs.warning("kafkakey", "llm-observe: the Kafka transport needs LLM_OBSERVE_API_KEY (the appliance "
                               "takes the project from it); spans are kept in the WAL")
            return "auth"
        try:
            headers = _kafka.headers_for(cfg.api_key)
        except ValueError as exc:
            self._logs.warning("kafkakey", "llm-observe: %s; spans are kept in the WAL", exc)
            return "auth"
        transport = self._kafka
        if transport is None or transport.retired or transport.key != _kafka.transport_key(cfg):
            if transport is not None:
                transport.dispose()
            self._kafka = None
            try:
                transport = self._kafka = _kafka.KafkaTransport(cfg)
            except _kafka.KafkaUnavailable as exc:
                self._logs.warning("kafkaconf", "llm-observe: %s; spans are kept in the WAL", exc)
                return "auth"
        received_at = _kafka.now_iso()
        messages: list[tuple[bytes, bytes]] = []
        span_ids: list[str | None] = []
        for span_id, body in rows:
            try:
                messages.append(_kafka.encode(body, received_at))
                span_ids.append(span_id)
            except _kafka.InvalidSpan as exc:
                self._rejected_locally(span_id, body, exc.field, exc.reason)
        if not messages:
            return "ok"
        result = transport.send(messages, headers)
        if not result.ok:
            self._logs.warning("kafkadown", "llm-observe: cannot deliver to %s (%s); retrying with backoff",
                               cfg.target, result.error)
            return "transient"
        for index in result.too_large:
            self._rejected_locally(span_ids[index], messages[index][1], None,
                                   f"{len(messages[index][1])} bytes: too large for a Kafka message of this topic")
        self.stats["sent"] += result.delivered
        return "ok"

    def _rejected_locally(self, span_id: str | None, body: bytes, field: str | None, reason: str) -> None:
        """A span no retry can deliver (what the HTTP API would answer with a rejection): counted, logged, dropped."""
        if span_id is None:
            try:
                span_id = str(_kafka._loads(body).get("span_id"))
            except Exception:  # noqa: BLE001
                span_id = None
        self.stats["rejected"] += 1
        self.last_rejections.append({"span_id": span_id, "rule": "invalid_value" if field else "too_large",
                                     "field": field, "reason": reason})
        self._logs.warning("kafkareject", "llm-observe: span %s cannot be sent to Kafka (%s%s); dropped", span_id,
                           f"{field}: " if field else "", reason)

    # -- HTTP -----------------------------------------------------------------------

    def _post(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        """POST one batch. 'ok' (202, rejected spans logged), 'transient' or 'auth' (keep the rows)."""
        self._retry_after = None
        body = b"[" + b",".join(body for _, body in rows) + b"]"
        if len(body) > MAX_BODY_BYTES and len(rows) > 1:
            half = len(rows) // 2
            first = self._post(rows[:half], cfg)
            return first if first != "ok" else self._post(rows[half:], cfg)
        transport = self._transport
        if transport is None or transport.base_url != cfg.url or transport.api_key != cfg.api_key:
            if transport is not None:
                transport.close()
            transport = self._transport = HttpTransport(cfg.url, cfg.api_key, cfg.timeout)
        try:
            reply = transport.request("POST", "/v1/spans", body=body, gzip_body=True)
        except TransportError as exc:
            self._logs.warning("down", "llm-observe: cannot reach %s (%s); retrying with backoff", cfg.url, exc)
            return "transient"
        status, data = reply.status, reply.body
        if status == 202:
            self._accepted(rows, data)
            return "ok"
        if status == 413 and len(rows) > 1:
            half = len(rows) // 2
            first = self._post(rows[:half], cfg)
            return first if first != "ok" else self._post(rows[half:], cfg)
        if status in (401, 403):
            self._logs.warning(f"auth{status}", "llm-observe: %s answered %s (%s): check LLM_OBSERVE_API_KEY; "
                               "spans are kept in the WAL", cfg.url, status, _error_text(data))
            return "auth"
        if status in (404, 408, 409, 425, 429) or status >= 500:
            self._retry_after = reply.retry_after
            self._logs.warning(f"http{status}", "llm-observe: %s answered %s (%s); retrying with backoff",
                               cfg.url, status, _error_text(data))
            return "transient"
        # Any other 4xx (400: no valid span in the batch, 413 for one span): retrying cannot help.
        rejected = data.get("rejected") if isinstance(data, dict) else None
        self.stats["rejected"] += len(rows)
        self.last_rejections.extend(rejected or [{"rule": f"http_{status}", "reason": _error_text(data)}])
        self._logs.warning(f"reject{status}", "llm-observe: %s rejected a batch of %d spans with %s (%s); dropped",
                           cfg.url, len(rows), status, _error_text(data))
        return "ok"

    def _accepted(self, rows: list, data: Any) -> None:
        rejected = data.get("rejected") if isinstance(data, dict) else None
        duplicates = data.get("duplicates", 0) if isinstance(data, dict) else 0
        self.stats["sent"] += len(rows) - len(rejected or ())
        self.stats["duplicates"] += duplicates or 0
        if rejected:
            self.stats["rejected"] += len(rejected)
            self.last_rejections.extend(rejected)
            first = rejected[0]
            self._logs.warning("rejected", "llm-observe: the appliance rejected %d span(s), e.g. span %s: %s (%s)",
                               len(rejected), first.get("span_id"), first.get("reason"), first.get("rule"))

    # -- preparing a span -----------------------------------------------------------

    def _prepare(self, span: dict, kind: int, cfg: Config) -> tuple[str | None, bytes] | None:
        try:
            return self._prepare_unsafe(span, kind, cfg)
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: dropping a span that cannot be serialised")
            self.stats["dropped"] += 1
            return None

    def _prepare_unsafe(self, span: dict, kind: int, cfg: Config) -> tuple[str | None, bytes]:
        """Defaults, timestamps, bounds, PII scan + redaction, JSON. Runs on the sender thread."""
        if not span.get("service_name"):
            span["service_name"] = self._overrides.get("service_name") or cfg.service_name
        if cfg.environment and not span.get("environment"):
            span["environment"] = cfg.environment
        ts = span.get("timestamp_utc")
        span["timestamp_utc"] = _iso(ts if ts is not None else time.time())
        if kind == EXTERNAL:
            self._normalise_external(span)
        elif "finish_reason" in span:
            span["finish_reason"] = normalise_finish_reason(span["finish_reason"])

        # Content: capture, render, scan, redact. PII never reaches the WAL or the wire unredacted.
        if "prompt" in span or "text" in span or "response" in span:
            self._scan_content(span, kind == INTERNAL_SCANNED, cfg)
        if cfg.kafka and not span.get("trace_id"):
            # The message key, so chosen here, once: a re-sent span lands on the same partition.
            span["trace_id"] = new_span_id()
        if cfg.sampling is not None and span.get("is_sampled") is None:
            # Otherwise the appliance decides with the project's rate.
            span["is_sampled"] = should_sample(str(span["span_id"]), cfg.sampling)
        if _METRICS_HOOK is not None:
            try:
                _METRICS_HOOK(span)
            except Exception:  # noqa: BLE001
                log.debug("llm-observe: metrics hook failed", exc_info=True)
        return span.get("span_id"), _dumps(span)

    @staticmethod
    def _normalise_external(span: dict) -> None:
        """A dict from report(): coerce what the appliance would reject, so one odd field does not lose a span."""
        span.setdefault("schema_version", 1)
        if "finish_reason" in span:
            span["finish_reason"] = normalise_finish_reason(span["finish_reason"])
        status = span.get("status")
        if status is not None and status not in ("success", "error"):
            lowered = str(status).strip().lower()
            span["status"] = {"ok": "success", "failed": "error", "failure": "error"}.get(
                lowered, lowered if lowered in ("success", "error") else "error")
        for name in _INT_FIELDS:
            value = span.get(name)
            if value is not None and not isinstance(value, int):
                try:
                    span[name] = int(value)
                except (TypeError, ValueError):
                    span.pop(name)
            if isinstance(span.get(name), int) and span[name] < 0:
                span.pop(name)
        for name in _FLOAT_FIELDS:
            value = span.get(name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                span.pop(name)
        for name, limit in _TEXT_LIMITS.items():
            value = span.get(name)
            if value is not None:
                if not isinstance(value, str):
                    value = str(value)
                span[name] = value[:limit]
        meta = span.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            span["metadata"] = {"value": meta}
        models = span.get("attempted_models")
        if models is not None and not isinstance(models, list):
            span["attempted_models"] = [str(models)]

    @staticmethod
    def _scan_content(span: dict, scanned: bool, cfg: Config) -> None:
        if not cfg.capture_content:
            for name in ("prompt", "text", "response"):
                span.pop(name, None)
            return
        scanner = default_scanner()
        for name in ("prompt", "text"):
            value = span.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                value = prompt_text(value)
            value = value[:cfg.max_text_chars]
            if not scanned or span.get("pii_detected"):
                result = scanner.scan(value, redact=True)
                if result.pii_detected:
                    span["pii_detected"] = True
                    value = result.redacted
                elif not scanned:
                    span.setdefault("pii_detected", False)
                if result.injection_attempt:
                    span["injection_attempt"] = True
                elif not scanned:
                    span.setdefault("injection_attempt", False)
            span[name] = value
        response = span.get("response")
        if response is not None:
            if not isinstance(response, str):
                response = str(response)
            response = response[:cfg.max_text_chars]
            result = scanner.scan(response, redact=True)
            if result.pii_detected:
                span["pii_detected"] = True
                response = result.redacted
                meta = span.get("metadata")
                span["metadata"] = {**(meta if isinstance(meta, dict) else {}), "response_pii_redacted": True}
            span["response"] = response

    # -- fork -----------------------------------------------------------------------

    def _after_fork(self) -> None:
        # The child starts empty: the parent still owns (and sends) what it had queued.
        overrides, source, cached = self._overrides, self._cfg_source, self._cfg_cached
        wal, wal_for = self._wal, self._wal_for
        if self._kafka is not None:
            # librdkafka's threads did not survive the fork: the parent's producer must be neither
            # used nor destroyed here (destroying waits for those threads). Kept, never touched.
            _FORK_ORPHANS.append(self._kafka)
        self._init_state()
        self._overrides, self._cfg_source, self._cfg_cached = overrides, source, cached
        if wal is not None:
            wal.reset_after_fork()
            self._wal, self._wal_for = wal, wal_for


def _error_text(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("error") or data.get("detail") or data)[:300]
    return str(data)[:300]


# -- process-wide state ---------------------------------------------------------------

_REPORTERS: "weakref.WeakSet[SpanReporter]" = weakref.WeakSet()
_FORK_ORPHANS: list = []  # Kafka producers inherited from a parent process
_reporter: Any = None
_reporter_lock = threading.Lock()
_METRICS_HOOK = None


def get_reporter() -> Any:
    """The process's reporter (a SpanReporter unless set_reporter() installed another object)."""
    global _reporter
    current = _reporter
    if current is None:
        with _reporter_lock:
            if _reporter is None:
                _reporter = SpanReporter()
            current = _reporter
    return current


def set_reporter(reporter: Any) -> Any:
    """Install a reporter: a SpanReporter or any object with report(dict). Returns the previous one."""
    global _reporter
    if reporter is not None and not callable(getattr(reporter, "report", None)):
        raise TypeError("a reporter needs a report(span: dict) method")
    with _reporter_lock:
        previous, _reporter = _reporter, reporter
    return previous


def emit(span: dict, prompt_scanned: bool = False) -> None:
    """Hand a span built by the SDK itself to the current reporter."""
    reporter = _reporter if _reporter is not None else get_reporter()
    try:
        if type(reporter) is SpanReporter or isinstance(reporter, SpanReporter):
            reporter.submit(span, prompt_scanned)
        else:
            reporter.report(span)
    except Exception:  # noqa: BLE001
        log.exception("llm-observe: the reporter failed")


def set_metrics_hook(hook) -> None:
    global _METRICS_HOOK
    _METRICS_HOOK = hook


def _config_changed(config: Config) -> None:
    for reporter in list(_REPORTERS):
        reporter._reconfigured()


def _after_fork_in_child() -> None:
    for reporter in list(_REPORTERS):
        if reporter._pid != os.getpid():
            reporter._after_fork()


def _at_exit() -> None:
    for reporter in list(_REPORTERS):
        try:
            if reporter._pid == os.getpid() and (reporter._thread is not None or reporter._spill):
                reporter.close()
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: flush at exit failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def iter_reporters() -> Iterable[SpanReporter]:
    return list(_REPORTERS)
