"""Configuration: environment variables, overridden by `configure(...)`.

Read lazily and cheaply: the hot paths (`report()`, decorators) only touch the
already-built `Config` object, never `os.environ`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("instrumentation_sdk")

_TRUE = {"1", "true", "yes", "on"}
TRANSPORTS = ("http", "kafka")
DEFAULT_KAFKA_TOPIC = "llm.spans.raw"
# LLM_OBSERVE_KAFKA_<NAME> -> librdkafka setting, for the usual security settings; anything
# else goes through configure(kafka_config={...}).
_KAFKA_ENV = {
    "SECURITY_PROTOCOL": "security.protocol",
    "SASL_MECHANISM": "sasl.mechanism",
    "SASL_USERNAME": "sasl.username",
    "SASL_PASSWORD": "sasl.password",
    "SSL_CA_LOCATION": "ssl.ca.location",
    "SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "SSL_KEY_LOCATION": "ssl.key.location",
}


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw.rstrip("%"))
    except ValueError:
        log.warning("llm-observe: ignoring %s=%r (not a number)", name, raw)
        return default


def _env_int(name: str, default: int) -> int:
    value = _env_float(name, None)
    return default if value is None else int(value)


def default_data_dir() -> Path:
    """Per-user data folder (XDG on Linux, ~/Library on macOS, %LOCALAPPDATA% on Windows)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "llm-observe"


def default_cache_dir() -> Path:
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "llm-observe" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llm-observe"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-observe"


def _default_service() -> str:
    name = os.environ.get("LLM_OBSERVE_SERVICE") or os.environ.get("LLM_OBSERVE_SERVICE_NAME") \
        or os.environ.get("OTEL_SERVICE_NAME")
    if name:
        return name
    argv0 = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    return argv0 or "unknown-service"


@dataclass(frozen=True)
class Config:
    """Everything the SDK reads. Frozen: `configure()` swaps the whole object atomically."""

    url: str | None = None                 # appliance base URL, e.g. http://127.0.0.1:8000
    api_key: str | None = None
    service_name: str = "unknown-service"
    environment: str | None = None
    sampling: float | None = None          # percent of spans flagged is_sampled; None: the seed's 1 %
    enabled: bool = True
    capture_content: bool = True           # send prompt/response text (redacted when PII is found)
    wal_path: str | None = None            # None: <user data dir>/llm-observe/spans-wal.sqlite3
    queue_size: int = 10_000               # in-memory spans before spilling to the WAL
    batch_size: int = 500                  # spans per POST (server limit 1,000)
    flush_interval: float = 0.2            # seconds a span may wait in memory before being sent
    timeout: float = 10.0                  # HTTP timeout per request
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    exit_flush_timeout: float = 5.0        # bound on the flush at interpreter exit
    wal_max_rows: int = 1_000_000          # oldest rows are dropped (with a warning) beyond this
    max_text_chars: int = 1_000_000        # prompt/response longer than this are cut
    # Answers with a server error (500, not 502/503/504) a batch may get before it is split to
    # find the span that causes them; that span goes to the dead-letter file.
    server_error_retries: int = 3
    spill: bool = True                     # write each span to a memory-backed spill file in report()
    spill_dir: str | None = None           # None: /dev/shm (or $XDG_RUNTIME_DIR) when memory-backed, else no spill
    spill_max_bytes: int = 64 * 1024 * 1024  # per process; past it report() keeps spans in memory only
    # "http" or "kafka"; None: kafka when kafka_bootstrap_servers is set, http otherwise.
    transport: str | None = None
    kafka_bootstrap_servers: str | None = None   # e.g. "kafka-1:9092,kafka-2:9092" (the `kafka` extra)
    kafka_topic: str = DEFAULT_KAFKA_TOPIC
    kafka_config: dict[str, Any] = field(default_factory=dict)  # more librdkafka settings (SASL, TLS, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kafka(self) -> bool:
        """True when spans are produced straight to Kafka instead of POSTed to the appliance."""
        if self.transport:
            return self.transport == "kafka"
        return bool(self.kafka_bootstrap_servers)

    @property
    def has_destination(self) -> bool:
        return bool(self.kafka_bootstrap_servers) if self.kafka else bool(self.url)

    @property
    def destination(self) -> str:
        """Where the spans go: WAL rows are replayed only to the destination they were meant for
        (with whatever key is configured then, so a rotated key does not strand them)."""
        if self.kafka:
            return f"kafka://{(self.kafka_bootstrap_servers or '').strip()}/{self.kafka_topic}"
        return (self.url or "").rstrip("/")

    @property
    def target(self) -> str:
        """The destination as said in log lines."""
        if self.kafka:
            return f"Kafka {self.kafka_bootstrap_servers} (topic {self.kafka_topic})"
        return str(self.url)

    def resolved_wal_path(self) -> Path:
        return Path(self.wal_path) if self.wal_path else default_data_dir() / "spans-wal.sqlite3"


def _env_transport() -> str | None:
    raw = (os.environ.get("LLM_OBSERVE_TRANSPORT") or "").strip().lower()
    if not raw:
        return None
    if raw not in TRANSPORTS:
        log.warning("llm-observe: ignoring LLM_OBSERVE_TRANSPORT=%r (one of %s)", raw, ", ".join(TRANSPORTS))
        return None
    return raw


def _env_kafka_config() -> dict[str, Any]:
    config = {}
    for suffix, name in _KAFKA_ENV.items():
        value = os.environ.get(f"LLM_OBSERVE_KAFKA_{suffix}")
        if value:
            config[name] = value
    return config


def config_from_env() -> Config:
    env = os.environ.get
    return Config(
        url=(env("LLM_OBSERVE_URL") or "").strip().rstrip("/") or None,
        api_key=(env("LLM_OBSERVE_API_KEY") or "").strip() or None,
        service_name=_default_service(),
        environment=env("LLM_OBSERVE_ENVIRONMENT") or env("DEPLOYMENT_ENV") or None,
        sampling=_env_float("LLM_OBSERVE_SAMPLING", None),
        enabled=(env("LLM_OBSERVE_DISABLED", "") or "").strip().lower() not in _TRUE,
        capture_content=(env("LLM_OBSERVE_CAPTURE_CONTENT", "true") or "true").strip().lower() in _TRUE,
        wal_path=env("LLM_OBSERVE_WAL_PATH") or None,
        queue_size=_env_int("LLM_OBSERVE_QUEUE_SIZE", 10_000),
        batch_size=max(1, min(1000, _env_int("LLM_OBSERVE_BATCH_SIZE", 500))),
        flush_interval=_env_float("LLM_OBSERVE_FLUSH_INTERVAL", 0.2) or 0.2,
        timeout=_env_float("LLM_OBSERVE_TIMEOUT", 10.0) or 10.0,
        backoff_max=_env_float("LLM_OBSERVE_BACKOFF_MAX", 30.0) or 30.0,
        exit_flush_timeout=_env_float("LLM_OBSERVE_EXIT_FLUSH_TIMEOUT", 5.0) or 0.0,
        wal_max_rows=_env_int("LLM_OBSERVE_WAL_MAX_ROWS", 1_000_000),
        server_error_retries=max(1, _env_int("LLM_OBSERVE_SERVER_ERROR_RETRIES", 3)),
        spill=(env("LLM_OBSERVE_SPILL", "true") or "true").strip().lower() in _TRUE,
        spill_dir=env("LLM_OBSERVE_SPILL_DIR") or None,
        spill_max_bytes=_env_int("LLM_OBSERVE_SPILL_MAX_BYTES", 64 * 1024 * 1024),
        transport=_env_transport(),
        kafka_bootstrap_servers=(env("LLM_OBSERVE_KAFKA_BOOTSTRAP_SERVERS") or "").strip() or None,
        kafka_topic=(env("LLM_OBSERVE_KAFKA_TOPIC") or "").strip() or DEFAULT_KAFKA_TOPIC,
        kafka_config=_env_kafka_config(),
    )


_lock = threading.Lock()
_config: Config | None = None
_ALIASES = {"service": "service_name", "key": "api_key", "endpoint_url": "url", "sampling_rate": "sampling"}
_FIELDS = {f.name for f in fields(Config)}


def get_config() -> Config:
    global _config
    current = _config
    if current is None:
        with _lock:
            if _config is None:
                _config = config_from_env()
            current = _config
    return current


def configure(**options: Any) -> Config:
    """Override settings for this process (unset options keep their environment/default value).

    configure(url="http://127.0.0.1:8000", api_key="llmo_...", service_name="billing",
              environment="production", sampling=5)
    configure(transport="kafka", kafka_bootstrap_servers="kafka:9092", api_key="llmo_...")
    """
    global _config
    changes: dict[str, Any] = {}
    for name, value in options.items():
        name = _ALIASES.get(name, name)
        if name not in _FIELDS:
            raise TypeError(f"configure() got an unknown option {name!r}")
        if name == "url" and value:
            value = str(value).strip().rstrip("/")
        if name == "transport" and value is not None:
            value = str(value).strip().lower() or None
            if value is not None and value not in TRANSPORTS:
                raise ValueError(f"configure(transport=...) must be one of {', '.join(TRANSPORTS)}, got {value!r}")
        if name == "kafka_config":
            value = dict(value or {})
        changes[name] = value
    with _lock:
        _config = replace(_config or config_from_env(), **changes)
        current = _config
    from instrumentation_sdk._reporter import _config_changed  # late: avoid an import cycle

    _config_changed(current)
    return current


def reset_config() -> None:
    """Forget `configure()` calls and re-read the environment (tests)."""
    global _config
    with _lock:
        _config = None
