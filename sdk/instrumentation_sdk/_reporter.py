"""Span delivery: `report()` hands the span over in microseconds; one background thread does the rest.

Path of a span:

    report() -> serialised into this process's spill file (a memory-mapped file on /dev/shm,
    see _spill.py) and appended to a bounded in-memory deque --(sender thread, every
    flush_interval or batch_size spans)--> prepare (defaults, PII scan + redaction, JSON) -->
      appliance healthy and no backlog: gzip POST /v1/spans, done on 202
      otherwise (refused, timeout, 5xx, 429, 401/403): append to the SQLite WAL
    WAL rows are replayed oldest first once the appliance answers again and deleted only
    after its 202. A span's spill record is marked done once the span is durable elsewhere
    (202, a final 4xx, the WAL); a later process on the same WAL path replays the records
    of a dead one that were not done (through the same prepare step), then removes its files.

Answers: a 4xx is final for the spans it names (counted in stats["rejected"] and
last_rejections; a 4xx naming none splits the batch to find them). A refused connection,
a timeout, 401/403, 429 and 502/503/504 are retried with backoff for as long as it takes.
Any other 5xx may be caused by the batch's content: after `server_error_retries` such
answers the batch is split by halves until the culprit stands alone; with proof that the
appliance accepts other spans, it goes to the dead-letter file next to the WAL
(`llm-observe wal list|replay|purge`), and the rest flows.

Queue full (the appliance is slower than the application): the caller's span goes to a
small overflow list that is written to the WAL in chunks, so memory stays bounded and
nothing is dropped. At interpreter exit the queue is flushed (bounded by
`exit_flush_timeout`); whatever is still unsent then is written to the WAL.

What can still be lost:
- a span whose report() had not returned when the process died (the caller cannot have
  counted it as reported; a torn record is ignored);
- spans not spilled, held in memory only, when the process dies without its exit handlers
  (SIGKILL, os._exit, OOM kill): where no memory-backed folder exists (macOS, Windows, no
  tmpfs /dev/shm: the spill is off unless LLM_OBSERVE_SPILL_DIR names one), with
  `spill=False`, past `spill_max_bytes` per process, or a span the spill cannot serialise
  (stats["spill_skipped"]). For those the old window applies: about `flush_interval`
  (0.2 s) of spans plus one batch;
- on power loss or a kernel crash, what was only in the spill file (it is RAM, on purpose:
  spans are raw there, PII is redacted on the sender thread, and unredacted text must not
  touch a disk). Everything that reached the WAL survives (synchronous=FULL);
- spill files whose WAL path no process uses again stay in /dev/shm until a reboot
  (`llm-observe wal status` shows them, `llm-observe wal recover` adopts them).

With no URL configured, spans are dropped and one warning is logged: nothing is
written anywhere that no appliance will ever read.

Kafka transport (`transport="kafka"`, the `kafka` extra): the same queue, spill file, WAL,
backoff and exit flush; a batch is produced to the appliance's topic instead of POSTed, and
counts as sent (WAL rows deleted) only once the broker acknowledged every message
of it (see _kafka.py). There are no per-batch answers, so nothing is dead-lettered here:
the appliance's consumer sends what it rejects to its DLQ topic.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from random import getrandbits as _getrandbits
import threading
import time
import weakref
from collections import deque
from datetime import datetime, timezone
from typing import Any, Iterable

from instrumentation_sdk import _kafka, _score_wire, _spill
from instrumentation_sdk._config import Config, get_config
from instrumentation_sdk._fields import Verdict, redact_values
from instrumentation_sdk._kinds import as_kind
from instrumentation_sdk._transport import HttpTransport, TransportError
from instrumentation_sdk._wal import WalRow, WriteAheadLog
from instrumentation_sdk.sampling import should_sample
from instrumentation_sdk.scanning import default_scanner, prompt_text

try:  # faster, optional
    import orjson

    _loads = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - depends on the environment
    import json

    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

log = logging.getLogger("instrumentation_sdk")

OVERFLOW_CHUNK = 256
WAL_CHUNK = 5000  # spans per WAL transaction while the appliance is away
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant
_CHECK_PID = not hasattr(os, "register_at_fork")  # elsewhere the fork hook resets reporters
EXTERNAL, INTERNAL, INTERNAL_SCANNED = 0, 1, 2  # where a queued span came from
MAX_BODY_BYTES = 4 * 1024 * 1024  # the appliance accepts 5 MB (after gunzip) per request
# Answers that say nothing about the batch: the appliance (or the proxy in front of it) is down,
# overloaded or out of disk. Retried for as long as it takes, like a refused connection.
TRANSIENT_STATUSES = frozenset({404, 408, 409, 425, 429, 502, 503, 504, 507})
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
                "span_id": 128, "trace_id": 128, "parent_span_id": 128, "name": 500}
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


class _Wake(threading.Event):
    """The sender's wake-up. report() may run inside a signal handler or a finaliser that interrupted
    its own thread in the middle of set() (or of the sender's wait/clear): Event's lock is then held
    by that very thread, and waiting for it would never end. The nested set() is skipped instead: an
    interrupted set() completes the wake-up itself; an interrupted wait() ends at its timeout."""

    def __init__(self) -> None:
        super().__init__()
        self._inside: set[int] = set()

    def _guarded(self, method: Any, *args: Any) -> Any:
        ident = threading.get_ident()
        if ident in self._inside:
            return False
        self._inside.add(ident)
        try:
            return method(*args)
        finally:
            self._inside.discard(ident)

    def set(self) -> None:
        self._guarded(super().set)

    def clear(self) -> None:
        self._guarded(super().clear)

    def wait(self, timeout: float | None = None) -> bool:
        return self._guarded(super().wait, timeout)


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
        self._queue: deque = deque()  # (span, kind, report time, spill handle or None)
        self._overflow: list = []
        self._spill: _spill.SpillFile | bool | None = None  # None: not opened yet; False: off
        self._lock = threading.Lock()
        self._wake = _Wake()
        self._idle = threading.Condition(threading.Lock())
        self._cycles = 0  # sender cycles completed (each one looks at the queue, the first also at the disk)
        # Spans the sender took from the queue, and of those the ones it has sent or written to the WAL.
        # Written by the sender only; flush() compares them to what was queued when it was called.
        self._taken = 0
        self._settled = 0
        self._disk_checked = False  # the sender looked at the disk (dead processes' spill files, WAL) for this config
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
        self._inflight: tuple[list, list[tuple[str | None, bytes]]] | None = None  # (items, rows)
        self._oks = 0  # 202 answers so far
        self._oks_at_blame = 0  # ... as of the last answer that blamed a batch (a server error)
        self._blame_proof = False  # a 202 came between the last two blaming answers
        self._blamed_by = ""  # that answer, for the dead-letter reason
        self._next_orphan_check = 0.0
        self._next_wal_check = 0.0
        self._warned_unconfigured = False
        self._logs = _RateLimitedLog()
        self.stats = {"sent": 0, "duplicates": 0, "rejected": 0, "wal_written": 0,
                      "wal_replayed": 0, "dropped": 0, "failed_posts": 0, "dead_lettered": 0,
                      "spill_skipped": 0, "spill_recovered": 0}
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
        self._disk_checked = False
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

    def submit_score(self, score: dict) -> None:
        """A score from _scores.score(): the spans' queue, spill file and WAL (see _score_wire.py)."""
        self._enqueue(score, INTERNAL)

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
        when = time.time()
        if self._stopped:  # reported after close() (a late atexit handler): straight to the WAL
            prepared = self._prepare(span, kind, cfg, when)
            if prepared:
                self._write_wal([prepared], cfg, from_exit=True)
            return
        spill = self._spill
        if spill is None:
            spill = self._open_spill(cfg)
        # Out of process memory before report() returns: a SIGKILL from here on loses nothing.
        handle = spill.write(span, kind, when) if spill else None
        if handle is None and spill:
            self.stats["spill_skipped"] += 1  # too large for the bound, or the bound is reached: memory only
        item = (span, kind, when, handle)
        queue = self._queue
        if len(queue) < cfg.queue_size:
            queue.append(item)
            if self._thread is None:
                self._start()
            elif len(queue) >= cfg.batch_size and not self._wake.is_set():
                self._wake.set()
        else:
            self._overflowed(item, cfg)

    def _open_spill(self, cfg: Config) -> _spill.SpillFile | bool:
        with self._lock:
            if self._spill is not None:
                return self._spill
            self._spill = False
            if not cfg.spill:
                return False
            directory, why = _spill.spill_directory(cfg.spill_dir)
            if directory is None:
                # Expected on macOS and Windows; on Linux it means /dev/shm is missing or not tmpfs.
                (log.warning if sys.platform.startswith("linux") else log.info)(
                    "llm-observe: no spill file (%s): spans still in memory are lost if the process is killed; "
                    "set LLM_OBSERVE_SPILL_DIR to a tmpfs folder", why)
                return False
            if cfg.spill_dir and not _spill.memory_backed(directory.parent if not directory.exists() else directory):
                log.warning("llm-observe: LLM_OBSERVE_SPILL_DIR %s is not memory-backed: raw span text (before "
                            "PII redaction) is written to disk there", directory)
            try:
                self._spill = _spill.SpillFile(
                    directory, key=_spill.spill_key(cfg.resolved_wal_path()), max_bytes=cfg.spill_max_bytes,
                    meta={"wal": str(cfg.resolved_wal_path()), "destination": cfg.destination}, dumps=_dumps)
            except Exception as exc:  # noqa: BLE001 - a full or foreign /dev/shm must not break report()
                log.warning("llm-observe: cannot make a spill file in %s (%s): spans still in memory are lost if "
                            "the process is killed", directory, exc)
            return self._spill

    def _overflowed(self, item: tuple, cfg: Config) -> None:
        with self._lock:
            self._overflow.append(item)
            if len(self._overflow) < OVERFLOW_CHUNK:
                return
            chunk, self._overflow = self._overflow, []
        # The caller pays for this disk write, never for the network; amortised over OVERFLOW_CHUNK spans.
        try:
            self._park(chunk, self._prepare_items(chunk, cfg), cfg, reason="spill")
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: could not write %d spans to the WAL; they stay in the spill file only",
                          len(chunk))
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
        inflight = self._inflight
        return len(self._queue) + len(self._overflow) + (len(inflight[1]) if inflight else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver what waits, for at most `timeout` seconds. True when nothing is left undelivered.

        True: every span reported before the call was accepted by the appliance (202),
        rejected by it for good (counted in `stats["rejected"]`, `last_rejections`), or set
        aside in the dead-letter file; and no row for this destination waits in the WAL,
        whoever wrote it (an earlier run, another process, a killed process's spill file).
        False: some are still queued or in the WAL (the appliance is down, slow, refuses
        the key); they are safe there and go on being retried.
        """
        deadline = time.monotonic() + timeout
        if self._pid != os.getpid():
            return not self._queue
        cfg = self.config
        if self._thread is None:
            if not cfg.enabled or not cfg.has_destination or self._stopped:
                return not self._queue
            if not self._queue and not self._work_on_disk(cfg):
                return True
            self._start()
        if not self._drain(deadline):
            return False
        wal = self._get_wal(cfg, create=False)
        if wal is None:
            return True
        try:
            mark = wal.last_id(cfg.destination)  # rows written later are not this call's business
            while wal.has_rows(cfg.destination, upto=mark):
                if time.monotonic() >= deadline or self._stopped:
                    return False
                self._backlog = True  # also rows another process wrote (`llm-observe wal replay`)
                self._wake.set()
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - an unreadable WAL: nothing can be said to be delivered
            log.exception("llm-observe: cannot read the WAL %s", wal.path)
            return False
        return True

    def _work_on_disk(self, cfg: Config) -> bool:
        """WAL rows for this destination or spill files of dead processes: a sender must run."""
        wal = self._get_wal(cfg, create=False)
        try:
            if wal is not None and wal.has_rows(cfg.destination):
                return True
        except Exception:  # noqa: BLE001
            return False
        directory, _ = _spill.spill_directory(cfg.spill_dir)
        return directory is not None and bool(_spill.spill_files(directory, _spill.spill_key(cfg.resolved_wal_path())))

    def _drain(self, deadline: float) -> bool:
        """Wait until every span queued before this call was sent or written to the WAL (durable either way).

        Only those: spans reported meanwhile (other threads, a signal handler firing every
        millisecond) must not keep it waiting for a moment when the queue happens to be empty.
        The queue is FIFO and the sender takes from its head and counts what it took in one step
        under `_idle`: the spans queued now are exactly among the first len(queue) + taken it ever
        takes (report() appends without that lock, at the tail: later spans come after them).
        """
        if self._thread is None:
            return not self._queue
        with self._lock:
            overflow, self._overflow = self._overflow, []
        for item in overflow:
            self._queue.append(item)
        with self._idle:
            target = len(self._queue) + self._taken
        while True:
            with self._idle:
                # ... and the sender looked at the disk: it adopts dead processes' spill files into the WAL.
                if self._settled >= target and self._disk_checked:
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
        # Durable is enough here (WAL or delivered): an exit must not wait for an appliance that is down.
        done = self._drain(time.monotonic() + timeout) if self._thread is not None else True
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if thread is not None and done:
            # It goes on with what was reported while _drain() waited (not its business), then ends.
            thread.join(timeout=max(0.1, min(1.0, timeout)))
        if not done or self._overflow or self._queue:
            self._persist_leftovers(cfg)
        spill = self._spill
        if spill:
            spill.close()  # removed when every span in it is done; otherwise left for the next process
        if done and (thread is None or not thread.is_alive()):
            if self._wal is not None:
                self._wal.close()
            producer, self._kafka = self._kafka, None
            if producer is not None and producer.pid == os.getpid():
                producer.close(timeout=min(1.0, max(0.1, timeout)))

    def _persist_leftovers(self, cfg: Config) -> None:
        """Exit with the sender still busy (slow appliance): write queue and in-flight batch to the WAL."""
        items: list = []
        rows: list[tuple[str | None, bytes]] = []
        inflight = self._inflight
        if inflight:  # may also reach the appliance: its span_id dedup keeps one copy
            items.extend(inflight[0])
            rows.extend(inflight[1])
        with self._lock:
            overflow, self._overflow = self._overflow, []
        queued = list(self._queue) + overflow
        self._queue.clear()
        rows.extend(self._prepare_items(queued, cfg))
        try:
            self._park(items + queued, rows, cfg, from_exit=True)
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
            if self._stopped:  # close(): what was reported while it drained, at once
                wait = 0.0
            self._wake.wait(wait)
            self._wake.clear()
            try:
                self._cycle(self.config)
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("llm-observe: sender error")
                with self._idle:
                    # A failed cycle is still one, and its spans are left to the spill file: _drain() must
                    # not wait for them forever.
                    self._cycles += 1
                    self._settled = self._taken
                    self._disk_checked = True
                time.sleep(0.5)
            finally:
                with self._idle:
                    self._idle.notify_all()
            if self._stopped and not self._queue:
                return

    def _cycle(self, cfg: Config) -> None:
        if self._kafka is not None:
            self._kafka.poll()
        if self._backlog is None or time.monotonic() >= self._next_wal_check:
            self._check_wal(cfg)
            self._disk_checked = True
        queue = self._queue
        # Fresh spans first: posted straight away while the appliance answers, into the WAL while it
        # does not. (A WAL backlog does not hold them back: the appliance orders by timestamp, and
        # replaying old rows must not make new ones wait on disk.)
        # Only the spans queued when the cycle began: spans that keep coming while it sends (a busy
        # application, a signal handler) wait for the next cycle, woken by a full batch, the
        # flush interval or flush(), instead of being sent one or two per request in a cycle that
        # never ends (and never gets to the WAL backlog).
        budget = len(queue)
        while budget > 0 and queue:
            backing_off = self._retry_at > time.monotonic()
            # To the WAL: big transactions (one fsync each); to the appliance: one request's worth.
            take = min(WAL_CHUNK if backing_off else cfg.batch_size, budget, len(queue))
            items = []
            with self._idle:  # taken and counted in one step: see _drain()
                for _ in range(take):
                    try:
                        items.append(queue.popleft())
                    except IndexError:  # emptied by close()
                        break
                self._taken += len(items)
            budget -= take
            try:
                rows = self._prepare_items(items, cfg)
                if not rows or backing_off:
                    self._park(items, rows, cfg)
                    continue
                self._inflight = (items, rows)
                try:
                    outcome = self._send(rows, cfg)
                finally:
                    self._inflight = None
                if outcome == "ok":
                    self._backoff = 0.0
                    self._done(items)
                else:
                    # A batch the appliance answered with a server error starts with one attempt counted.
                    self._park(items, rows, cfg, attempts=int(outcome == "blamed"))
                    self._failed(outcome)
            finally:
                with self._idle:
                    self._settled += len(items)  # sent, or in the WAL (or left to the spill file: it failed)
                    self._idle.notify_all()
        if self._overflow:  # overflow leftovers (fewer than OVERFLOW_CHUNK)
            with self._lock:
                overflow, self._overflow = self._overflow, []
            self._park(overflow, self._prepare_items(overflow, cfg), cfg, reason="spill")
        spill = self._spill
        if spill:
            spill.collect()
        # Everything queued when this cycle began is now sent or on disk (what _drain() waits for is
        # counted per batch, above); the first cycle also looked at the disk (orphans, WAL).
        with self._idle:
            self._cycles += 1
            self._idle.notify_all()
        # Replay the WAL while the appliance answers, oldest rows first; fresh spans go first.
        while self._backlog and self._retry_at <= time.monotonic() and not self._stopped:
            if not self._replay_once(cfg):
                break
            if queue or self._overflow:
                break

    def _replaying(self) -> bool:
        return bool(self._backlog) and self._retry_at <= time.monotonic()

    def _check_wal(self, cfg: Config) -> None:
        self._next_wal_check = time.monotonic() + 30.0
        self._adopt_orphans(cfg)
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
        ids = [row.id for row in rows]
        outcome = self._send([(row.span_id, row.body) for row in rows], cfg)
        if outcome == "ok":
            wal.delete(ids)
            self.stats["wal_replayed"] += len(ids)
            self._backoff = 0.0
            return True
        if outcome == "blamed":
            wal.blame(ids)
            if max(row.attempts for row in rows) + 1 >= cfg.server_error_retries:
                return self._isolate(wal, [row._replace(attempts=row.attempts + 1) for row in rows], cfg)
        wal.release(ids)
        self._failed(outcome)
        return False

    def _isolate(self, wal: WriteAheadLog, rows: list[WalRow], cfg: Config) -> bool:
        """A batch the appliance keeps answering with a server error: split it by halves until the
        span(s) causing it stand alone, and set those aside in the dead-letter file.

        A span is set aside only with proof that the appliance works: a 202 for another part of
        the batch, or for any batch since the previous server error. Without it (every part fails:
        the appliance is broken, not the spans) the rows stay in the WAL and are retried with
        backoff, as when it is down. A span blamed alone gets one more try alone (a one-off 500
        must not cost a good span). True when every row was settled.
        """
        proved, oks = self._blame_proof, self._oks  # proof: that, or a 202 (not a 4xx) from here on
        level, delivered, suspects, kept = [rows], [], [], []
        while level:
            blamed: list[list[WalRow]] = []
            for index, part in enumerate(level):
                halves = [part] if len(part) == 1 else [part[:len(part) // 2], part[len(part) // 2:]]
                for position, half in enumerate(halves):
                    outcome = self._send([(row.span_id, row.body) for row in half], cfg)
                    if outcome == "ok":
                        delivered.extend(half)  # stored, or rejected for good
                    elif outcome == "blamed":
                        (suspects if len(part) == 1 else blamed).append(half)
                    else:  # down, overloaded, refused: the rest waits in the WAL like any batch
                        kept.extend(row for rest in halves[position:] + level[index + 1:] + blamed for row in rest)
                        self._settle(wal, delivered, [], kept + [r for s in suspects for r in s], cfg)
                        self._failed(outcome)
                        return False
            if blamed and not (proved or self._oks != oks):
                kept.extend(row for part in blamed for row in part)  # nothing shows the spans are at fault
                break
            level = blamed
        if proved or self._oks != oks:
            dead = [row for part in suspects for row in part]
        else:
            dead = []
            kept.extend(row for part in suspects for row in part)
        self._settle(wal, delivered, dead, kept, cfg)
        if kept:
            self._failed("blamed")
            return False
        self._backoff = 0.0
        return True

    def _settle(self, wal: WriteAheadLog, delivered: list[WalRow], dead: list[WalRow], kept: list[WalRow],
                cfg: Config) -> None:
        wal.delete([row.id for row in delivered])
        self.stats["wal_replayed"] += len(delivered)
        if dead:
            wal.bury(cfg.destination, [(row, self._blamed_by) for row in dead])
            self.stats["dead_lettered"] += len(dead)
            self._logs.warning("dead", "llm-observe: %d span(s) (e.g. %s) made %s answer %s, alone and again; set "
                               "aside in %s (see `llm-observe wal list`)", len(dead), dead[0].span_id,
                               cfg.target, self._blamed_by, wal.dead_path)
        wal.release([row.id for row in kept])

    def _failed(self, outcome: str) -> None:
        """Back off: 'transient' and 'blamed' exponentially, 'auth' at the longest delay."""
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

    def _prepare_items(self, items: list, cfg: Config) -> list[tuple[str | None, bytes]]:
        return [r for r in (self._prepare(span, kind, cfg, when) for span, kind, when, _ in items) if r]

    def _done(self, items: list) -> None:
        """These spans are durable elsewhere: their spill records will not be replayed."""
        spill = self._spill
        if spill:
            spill.mark_done([item[3] for item in items if item[3] is not None])

    def _park(self, items: list, rows: list[tuple[str | None, bytes]], cfg: Config, *, from_exit: bool = False,
              reason: str = "down", attempts: int = 0) -> None:
        """Rows to the WAL; then, and only if that worked, their spill records are done."""
        if self._write_wal(rows, cfg, from_exit=from_exit, reason=reason, attempts=attempts):
            self._done(items)

    def _write_wal(self, rows: list[tuple[str | None, bytes]], cfg: Config, from_exit: bool = False,
                   reason: str = "down", attempts: int = 0) -> bool:
        if not rows:
            return True
        try:
            wal = self._get_wal(cfg, create=True)
            wal.append(cfg.destination, rows, attempts=attempts)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions: say so, keep going
            self.stats["dropped"] += len(rows)
            where = "the spill file keeps them for the next process" if self._spill else "they are lost"
            self._logs.warning("walfail", "llm-observe: could not write %d spans to the WAL %s (%s); %s",
                               len(rows), cfg.resolved_wal_path(), exc, where)
            return False
        self._backlog = True
        self.stats["wal_written"] += len(rows)
        if from_exit:
            return True
        if reason == "spill":
            self._logs.warning("spill", "llm-observe: more than %d spans waiting for %s; the excess is kept in %s",
                               cfg.queue_size, cfg.target, wal.path)
        elif self._retry_at > time.monotonic() or self.stats["failed_posts"]:
            self._logs.warning("wal", "llm-observe: %s not reachable; spans kept in %s and sent "
                               "when it is back", cfg.target, wal.path)
        return True

    def _adopt_orphans(self, cfg: Config) -> None:
        """Replay the spill files of dead processes that used this WAL path into the WAL, then remove them.

        Through the normal preparation (defaults, PII scan and redaction: what lands in the WAL
        is what the dead process would have written), with the recorded report time as the
        default timestamp. A file that cannot be read stays for the next look.
        """
        directory, _ = _spill.spill_directory(cfg.spill_dir)
        if directory is None:
            return
        for orphan in _spill.orphans(directory, _spill.spill_key(cfg.resolved_wal_path())):
            try:
                dest = orphan.meta.get("destination") or cfg.destination
                rows, offsets = [], []
                for offset, kind, when, payload in orphan.records():
                    offsets.append(offset)
                    try:
                        span = _loads(payload)
                    except ValueError:
                        self.stats["dropped"] += 1
                        continue
                    prepared = self._prepare(span, kind, cfg, when)
                    if prepared:
                        rows.append(prepared)
                if rows:
                    wal = self._get_wal(cfg, create=True)
                    for start in range(0, len(rows), WAL_CHUNK):
                        wal.append(dest, rows[start:start + WAL_CHUNK])
                    self._backlog = True
                    self.stats["spill_recovered"] += len(rows)
                    self.stats["wal_written"] += len(rows)
                    log.warning("llm-observe: %d span(s) of a process that ended without sending them (pid %s) "
                                "recovered from %s into the WAL", len(rows), orphan.meta.get("pid"), orphan.path)
                orphan.mark_done(offsets)
                orphan.remove()
            except Exception:  # noqa: BLE001
                log.exception("llm-observe: cannot replay the spill file %s", orphan.path)
            finally:
                orphan.close()

    def _send(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        """Deliver one batch with the configured transport: 'ok', 'transient' or 'auth' (keep the rows)."""
        scores, rows = _score_wire.split(rows)
        outcome = "ok"
        if rows:
            outcome = self._produce(rows, cfg) if cfg.kafka else self._post(rows, cfg)
        # Spans first: an appliance that fails on scores still gets them (a re-sent batch is deduplicated).
        if scores and outcome == "ok":
            outcome = self._post_scores(scores, cfg)
        return outcome

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
        """POST one batch. 'ok': every span is stored or rejected for good. Keep the rows on
        'transient' (no answer, or one about the appliance: 502/503/504/429...), 'auth' (401/403)
        and 'blamed' (a server error that may come from the batch's content: 500 and the rest)."""
        self._retry_after = None
        body = b"[" + b",".join(body for _, body in rows) + b"]"
        if len(body) > MAX_BODY_BYTES and len(rows) > 1:
            return self._post_halves(rows, cfg)
        try:
            reply = self._http(cfg).request("POST", "/v1/spans", body=body, gzip_body=True)
        except TransportError as exc:
            self._logs.warning("down", "llm-observe: cannot reach %s (%s); retrying with backoff", cfg.url, exc)
            return "transient"
        status, data = reply.status, reply.body
        if status == 202:
            self._accepted(rows, data)
            return "ok"
        if status == 413 and len(rows) > 1:
            return self._post_halves(rows, cfg)
        if status in (401, 403):
            self._logs.warning(f"auth{status}", "llm-observe: %s answered %s (%s): check LLM_OBSERVE_API_KEY; "
                               "spans are kept in the WAL", cfg.url, status, _error_text(data))
            return "auth"
        if status in TRANSIENT_STATUSES:
            self._retry_after = reply.retry_after
            self._logs.warning(f"http{status}", "llm-observe: %s answered %s (%s); retrying with backoff",
                               cfg.url, status, _error_text(data))
            return "transient"
        if status >= 500:
            self._retry_after = reply.retry_after
            self._blame_proof = self._oks != self._oks_at_blame
            self._oks_at_blame = self._oks
            self._blamed_by = f"HTTP {status}: {_error_text(data)}"
            self._logs.warning(f"http{status}", "llm-observe: %s answered %s (%s); retrying with backoff, then "
                               "looking for the span that causes it", cfg.url, status, _error_text(data))
            return "blamed"
        return self._refused(rows, status, data, cfg)

    def _http(self, cfg: Config) -> HttpTransport:
        transport = self._transport
        if transport is None or transport.base_url != cfg.url or transport.api_key != cfg.api_key:
            if transport is not None:
                transport.close()
            transport = self._transport = HttpTransport(cfg.url, cfg.api_key, cfg.timeout)
        return transport

    def _post_scores(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        """POST score rows to /v1/scores (over HTTP with the Kafka transport too: there is no scores topic).

        'ok' once each is stored or refused for good (a 4xx naming it, or an appliance without the
        route: 404/405, so that an older appliance does not hold the spans behind them); 'auth' and
        'transient' (no answer, 429, 5xx) keep the rows, like spans.
        """
        ids = _score_wire.score_ids(rows)

        def dropped(entries: list[dict], status: int, data: Any) -> None:
            # named like their WAL rows ("score:<id>") in stats, last_rejections and the log
            self._dropped_by_appliance([{**e, "span_id": f"{_score_wire.ROW_PREFIX}{e.get('id')}"} for e in entries],
                                       status, data, cfg)

        if not cfg.url:
            dropped([{"id": i, "rule": "no_url", "reason": "scores are sent over HTTP: set LLM_OBSERVE_URL"}
                     for i in ids], 0, None)
            return "ok"
        self._retry_after = None
        try:
            reply = self._http(cfg).request("POST", _score_wire.PATH, body=_score_wire.batch_body(rows), gzip_body=True)
        except TransportError as exc:
            self._logs.warning("down", "llm-observe: cannot reach %s (%s); retrying with backoff", cfg.url, exc)
            return "transient"
        status, data = reply.status, reply.body
        rejected = data.get("rejected") if isinstance(data, dict) and isinstance(data.get("rejected"), list) else []
        if status == 202:
            self._oks += 1
            self.stats["scores_sent"] = self.stats.get("scores_sent", 0) + len(rows) - len(rejected)
            if rejected:
                dropped(rejected, status, data)
            return "ok"
        if status in (401, 403):
            self._logs.warning(f"auth{status}", "llm-observe: %s answered %s (%s): check LLM_OBSERVE_API_KEY; "
                               "scores are kept in the WAL", cfg.url, status, _error_text(data))
            return "auth"
        if status in (404, 405) or (400 <= status < 500 and status not in TRANSIENT_STATUSES):
            named = {e.get("index"): e for e in rejected if isinstance(e, dict)}
            dropped([named.get(i) or {"id": score_id, "rule": f"http_{status}", "reason": _error_text(data)}
                     for i, score_id in enumerate(ids)], status, data)
            return "ok"
        self._retry_after = reply.retry_after
        self._logs.warning(f"http{status}", "llm-observe: %s answered %s to scores (%s); retrying with backoff",
                           cfg.url, status, _error_text(data))
        return "transient"

    def _post_halves(self, rows: list[tuple[str | None, bytes]], cfg: Config) -> str:
        half = len(rows) // 2
        first = self._post(rows[:half], cfg)
        return first if first != "ok" else self._post(rows[half:], cfg)

    def _refused(self, rows: list[tuple[str | None, bytes]], status: int, data: Any, cfg: Config) -> str:
        """A 4xx about the spans (400: no valid span, 413 for one span, ...): final for the spans it names.

        Nothing of a 4xx batch was stored. The spans named in `rejected` are dropped with their
        reasons; the others are sent again. A 4xx that names none is final for a lone span and
        splits a larger batch, so that one bad span does not cost the good ones.
        """
        rejected = data.get("rejected") if isinstance(data, dict) else None
        named: dict[int, dict] = {}
        if isinstance(rejected, list):
            positions = {span_id: i for i, (span_id, _) in enumerate(rows) if span_id is not None}
            for entry in rejected:
                if not isinstance(entry, dict):
                    continue
                index = entry.get("index")
                if not (isinstance(index, int) and 0 <= index < len(rows)):
                    index = positions.get(entry.get("span_id"))
                if index is not None:
                    named[index] = entry
        if len(rows) > 1 and len(named) < len(rows):
            if named:
                self._dropped_by_appliance(list(named.values()), status, data, cfg)
                return self._post([row for i, row in enumerate(rows) if i not in named], cfg)
            return self._post_halves(rows, cfg)
        entries = [named.get(i) or {"span_id": span_id, "rule": f"http_{status}", "reason": _error_text(data)}
                   for i, (span_id, _) in enumerate(rows)]
        self._dropped_by_appliance(entries, status, data, cfg)
        return "ok"

    def _dropped_by_appliance(self, entries: list[dict], status: int, data: Any, cfg: Config) -> None:
        self.stats["rejected"] += len(entries)
        self.last_rejections.extend(entries)
        self._logs.warning(f"reject{status}", "llm-observe: %s rejected %d span(s) with %s (%s), e.g. span %s: "
                           "%s; dropped", cfg.url, len(entries), status, _error_text(data),
                           entries[0].get("span_id"), entries[0].get("reason"))

    def _accepted(self, rows: list, data: Any) -> None:
        self._oks += 1
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

    def _prepare(self, span: dict, kind: int, cfg: Config, when: float | None = None) -> tuple[str | None, bytes] | None:
        try:
            return self._prepare_unsafe(span, kind, cfg, when)
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: dropping a span that cannot be serialised")
            self.stats["dropped"] += 1
            return None

    def _prepare_unsafe(self, span: dict, kind: int, cfg: Config, when: float | None) -> tuple[str | None, bytes]:
        """Defaults, timestamps, bounds, PII scan + redaction, JSON. Runs on the sender thread."""
        if _score_wire.is_score(span):
            return _score_wire.prepare(span, default_scanner(), _dumps)
        if not span.get("service_name"):
            span["service_name"] = self._overrides.get("service_name") or cfg.service_name
        if cfg.environment and not span.get("environment"):
            span["environment"] = cfg.environment
        ts = span.get("timestamp_utc")
        span["timestamp_utc"] = _iso(ts if ts is not None else (when or time.time()))
        if kind == EXTERNAL:
            self._normalise_external(span)
        elif "finish_reason" in span:
            span["finish_reason"] = normalise_finish_reason(span["finish_reason"])

        # Content: capture, render, scan, redact. PII never reaches the WAL or the wire unredacted.
        # Error text and metadata values too: a span with neither pays nothing for them.
        if "prompt" in span or "text" in span or "response" in span or span.get("error_message") \
                or span.get("metadata") or kind == EXTERNAL:
            self._scan_content(span, kind == INTERNAL_SCANNED, cfg, external=kind == EXTERNAL)
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
        SpanReporter._normalise_kind(span)
        models = span.get("attempted_models")
        if models is not None and not isinstance(models, list):
            span["attempted_models"] = [str(models)]

    @staticmethod
    def _normalise_kind(span: dict) -> None:
        """A kind in any case becomes the canonical one; one the appliance would reject, or a 1.8.1
        span_type naming none, is kept as metadata instead of costing the span. (A refused kind goes
        to metadata "unknown_kind", not "kind": the Kafka consumer promotes a metadata "kind" to the
        field, as the SDK's version-1 messages carry it there, and would refuse the span.)"""
        given = {key: span.pop(key) for key in ("kind", "span_type") if key in span}
        chosen = None
        for key, value in given.items():  # kind first: it wins over span_type
            if chosen is None and as_kind(value) is not None:
                chosen = key
                span["kind"] = as_kind(value)
        for key, value in given.items():
            if key != chosen and value is not None:
                meta = span.get("metadata")
                name = "unknown_kind" if key == "kind" else key
                span["metadata"] = {**(meta if isinstance(meta, dict) else {}), name: value}

    @staticmethod
    def _scan_content(span: dict, scanned: bool, cfg: Config, external: bool = False) -> None:
        scanner = default_scanner()
        known: dict = {}  # text -> its result: a metadata value repeating the prompt is not scanned again
        if cfg.capture_content:
            SpanReporter._scan_texts(span, scanned, cfg, scanner, known)
        else:
            for name in ("prompt", "text", "response"):
                span.pop(name, None)
        # Error text and metadata are sent with or without capture_content: scanned either way.
        # A dict from report() may carry keys of its own: the appliance keeps them as metadata.
        extra = [key for key in span if key not in _kafka._KNOWN] if external else ()
        if span.get("error_message") or span.get("metadata") or extra:
            SpanReporter._scan_fields(span, scanner, known, extra)

    @staticmethod
    def _scan_texts(span: dict, scanned: bool, cfg: Config, scanner, known: dict) -> None:
        for name in ("prompt", "text"):
            value = span.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                value = prompt_text(value)
            value = value[:cfg.max_text_chars]
            if not scanned or span.get("pii_detected"):
                result = known[value] = scanner.scan(value, redact=True)
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
            result = known[response] = scanner.scan(response, redact=True)
            if result.pii_detected:
                span["pii_detected"] = True
                response = result.redacted
                meta = span.get("metadata")
                span["metadata"] = {**(meta if isinstance(meta, dict) else {}), "response_pii_redacted": True}
            span["response"] = response

    @staticmethod
    def _scan_fields(span: dict, scanner, known: dict, extra) -> None:
        """Error text, every string value of the metadata (any depth, bounded) and of unknown keys,
        redacted in place: the appliance's walk (instrumentation_sdk._fields), so what the topic, the
        WAL and the wire carry is no rawer than what the appliance would store."""
        error = span.get("error_message")
        if error is not None and not isinstance(error, str):
            span["error_message"] = str(error)
        verdict = Verdict()
        redact_values(scanner, span, verdict, drop=False, labels=("error_message",),
                      metadata=isinstance(span.get("metadata"), dict), known=known)
        if extra:
            holder = {"metadata": {key: span[key] for key in extra}}
            redact_values(scanner, holder, verdict, drop=False, known=known)
            span.update(holder["metadata"])
        if verdict.pii:
            span["pii_detected"] = True
        if verdict.injection:
            span["injection_attempt"] = True

    # -- fork -----------------------------------------------------------------------

    def _after_fork(self) -> None:
        # The child starts empty: the parent still owns (and sends) what it had queued.
        overrides, source, cached = self._overrides, self._cfg_source, self._cfg_cached
        wal, wal_for = self._wal, self._wal_for
        if self._spill:
            self._spill.abandon_in_child()  # the parent's files and lock stay the parent's; ours come at the first span
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
            if reporter._pid == os.getpid() and (reporter._thread is not None or reporter._overflow):
                reporter.close()
        except Exception:  # noqa: BLE001
            log.exception("llm-observe: flush at exit failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def iter_reporters() -> Iterable[SpanReporter]:
    return list(_REPORTERS)
