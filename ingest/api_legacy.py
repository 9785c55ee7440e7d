"""The REST routes of instrumentation-sdk 1.8.1, same paths and shapes, now authenticated and real.

1.8.1 answered these without auth and stored nothing. Here every route needs an
API key, and the test calls go through a fake provider built into the appliance:
the call makes a real span that is scanned, priced, stored and visible in the
console, so a user can check the whole path without an LLM account.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import orjson
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from ninja import Router, Schema, Status
from pydantic import ConfigDict, Field, field_validator, model_validator

from ingest.auth import API_KEY_AUTH
from ingest.bodies import BodyError, read_body, read_json_spans, require_json
from ingest.metrics import metrics_exposition, metrics_state
from ingest.schemas import ErrorOut, RejectedSpan, SpanIn
from ingest.services.pricing import price_table
from ingest.services.sampling import should_sample
from ingest.services.spans import spans_ingest

log = logging.getLogger(__name__)

router = Router(auth=API_KEY_AUTH)

PROVIDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
TEST_MODEL = "llm-observe-test"
TEST_SERVICE = "llm-observe-test"
MAX_STREAM_MS = 10_000
_FAKE_REPLY = ("Hello from the llm-observe test provider. This answer was streamed by the appliance itself, "
               "and the call is stored as a span you can find in the console.")


def _ex(*examples: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


def _unavailable(what: str) -> Status:
    return Status(503, {"error": f"{what} is not available in this appliance build", "rule": "unavailable"})


# --- schemas ------------------------------------------------------------------------
def _check_encodable(value: Any, depth: int = 0) -> None:
    # The body parser lets lone UTF-16 surrogates through; they could not be stored nor answered.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds an unpaired surrogate (invalid Unicode)") from None
    elif isinstance(value, dict) and depth < 64:
        for key, item in value.items():
            _check_encodable(key, depth + 1)
            _check_encodable(item, depth + 1)
    elif isinstance(value, list) and depth < 64:
        for item in value:
            _check_encodable(item, depth + 1)


class _In(Schema):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_encodable(data)
        return data


class SuccessOut(Schema):
    model_config = _ex({"success": True, "message": "instrumentation runs in your application"})
    success: bool
    message: str


class DetectIn(_In):
    model_config = _ex({"url": "https://api.openai.com/v1/chat/completions",
                        "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}})
    url: str = Field(..., max_length=4000)
    body: dict[str, Any] | str | None = None


class DetectOut(Schema):
    model_config = _ex({"provider": "openai", "model": "gpt-4o"})
    provider: str
    model: str | None


class TestCallIn(_In):
    model_config = _ex({"method": "chat.completions.create", "provider": "openai"})
    method: str = Field("chat", min_length=1, max_length=200)
    provider: str = Field("openai", pattern=PROVIDER_PATTERN)


class TestCallOut(SuccessOut):
    model_config = _ex({"success": True, "message": "test call through the built-in fake openai provider "
                        "stored as span 0b6f2c1e-...", "span_id": "0b6f2c1e-5f0a-4c43-9d0c-2f1e8b7a6c5d",
                        "trace_id": "1f0e9d8c-7b6a-4c5d-8e9f-0a1b2c3d4e5f"})
    span_id: str
    trace_id: str


class StreamIn(_In):
    model_config = _ex({"provider": "openai", "chunks": ["Hello", " world", "!"]}, {"provider": "anthropic",
                                                                                     "chunks": 5})
    provider: str = Field("openai", pattern=PROVIDER_PATTERN)
    chunks: list[str] | int | None = Field(None, description="texts to stream, or how many chunks of the default "
                                           "answer (1-200)")
    delay_ms: int = Field(20, ge=0, le=1000, description="pause between chunks")
    first_chunk_delay_ms: int = Field(100, ge=0, le=10_000, description="time to first chunk")

    @field_validator("chunks")
    @classmethod
    def _bounded(cls, value):
        if isinstance(value, int) and not 1 <= value <= 200:
            raise ValueError("chunks must be between 1 and 200")
        if isinstance(value, list):
            if not 1 <= len(value) <= 200:
                raise ValueError("between 1 and 200 chunks")
            if sum(len(c) for c in value) > 100_000:
                raise ValueError("at most 100,000 characters in all chunks")
        return value

    @model_validator(mode="after")
    def _short(self):
        # A test call holds a web thread while it streams: keep it short.
        count = len(_chunks(self.chunks))
        if self.first_chunk_delay_ms + (count - 1) * self.delay_ms > MAX_STREAM_MS:
            raise ValueError(f"the stream would last over {MAX_STREAM_MS} ms; fewer chunks or a shorter delay")
        return self


class CountIn(_In):
    model_config = _ex({"prompt": "hello world", "model": "gpt-4"},
                       {"prompt": [{"role": "user", "content": "hello"}], "model": "gpt-4o"})
    prompt: str | list[dict[str, Any]] = Field(..., description="text or chat messages")
    model: str | None = Field(None, max_length=200)

    @field_validator("prompt")
    @classmethod
    def _size(cls, value):
        if isinstance(value, str) and len(value) > 2_000_000 or isinstance(value, list) and len(value) > 10_000:
            raise ValueError("prompt too large")
        return value


class CountOut(Schema):
    model_config = _ex({"tokens": 2, "method": "tiktoken"})
    tokens: int
    method: str


class ScanIn(_In):
    model_config = _ex({"prompt": "my email is test@example.com"})
    prompt: str | list[dict[str, Any]] = Field(..., description="text or chat messages")


class ScanOut(Schema):
    model_config = _ex({"pii_detected": True, "injection_attempt": False})
    pii_detected: bool
    injection_attempt: bool


class SampleIn(_In):
    model_config = _ex({"span_id": "test-span-id"})
    span_id: str = Field(..., min_length=1, max_length=128)


class SampleOut(Schema):
    model_config = _ex({"is_sampled": False})
    is_sampled: bool


class EmbedIn(_In):
    model_config = _ex({"text": "your text here"})
    text: str = Field(..., min_length=1, max_length=100_000)


class EmbedOut(Schema):
    model_config = _ex({"embedding": [0.0123, -0.0456, 0.0789]})
    embedding: list[float] = Field(..., description="384 floats (all-MiniLM-L6-v2, normalised)")


class MetricsStateOut(Schema):
    model_config = _ex({"initialized": True, "message": "Prometheus metrics of every appliance process at "
                        "GET /metrics"})
    initialized: bool
    message: str


class RecordOut(Schema):
    model_config = _ex({"recorded": True, "cost_usd_micro": 4500, "price_version": "2026-11-26"})
    recorded: bool
    cost_usd_micro: int | None
    price_version: str | None


class RecordBatchOut(Schema):
    model_config = _ex({"recorded_count": 2, "rejected": []})
    recorded_count: int
    rejected: list[RejectedSpan] = Field(default_factory=list)


_SPAN_SCHEMA = SpanIn.model_json_schema(ref_template="#/components/schemas/{model}")
_SPAN_SCHEMA.pop("$defs", None)
_RECORD_EXAMPLE = {"span_id": "3f1c2a9e-8d1b-4a57-9c0e-1f2d3c4b5a69", "model": "gpt-4o", "provider": "openai",
                   "service_name": "payment-bot", "prompt_tokens": 1000, "completion_tokens": 200,
                   "latency_ms_total": 812.5, "status": "success"}


def _body(schema: dict, example: Any) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema,
                                                                                "example": example}}}}


# --- instrumentation ------------------------------------------------------------------
_INSTRUMENT_MESSAGE = ("Auto-instrumentation runs inside your application: call "
                       "instrumentation_sdk.{call}() there. The appliance is {state}: spans are received at "
                       "POST /v1/spans and POST /v1/traces (OTLP).")


@router.post("/instrumentation/init", response={200: SuccessOut}, tags=["instrumentation"],
             summary="1.8.1: start auto-instrumentation (acknowledged; it runs in the client)")
def instrumentation_init(request):
    return {"success": True, "message": _INSTRUMENT_MESSAGE.format(call="init_auto_instrumentation",
                                                                   state="ready")}


@router.post("/instrumentation/uninstrument", response={200: SuccessOut}, tags=["instrumentation"],
             summary="1.8.1: stop auto-instrumentation (acknowledged; it runs in the client)")
def instrumentation_uninstrument(request):
    return {"success": True, "message": _INSTRUMENT_MESSAGE.format(call="uninstrument_all",
                                                                   state="still receiving spans")}


_HOSTS = (
    ("api.openai.com", "openai"), (".openai.azure.com", "azure_openai"), ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "google"), ("aiplatform.googleapis.com", "vertex_ai"),
    ("bedrock-runtime.", "bedrock"), ("api.mistral.ai", "mistral"), ("api.cohere.", "cohere"),
    ("api.groq.com", "groq"), ("openrouter.ai", "openrouter"), ("api.deepseek.com", "deepseek"),
    ("api.together.xyz", "together"), ("api.together.ai", "together"), ("api.x.ai", "xai"),
    ("api.fireworks.ai", "fireworks"), ("api.perplexity.ai", "perplexity"),
)
_PATH_MODEL = (
    re.compile(r"/models/([^/:]+)(?::|$)"),  # Gemini: /v1beta/models/gemini-1.5-pro:generateContent
    re.compile(r"/model/([^/]+)/"),  # Bedrock: /model/anthropic.claude-3-haiku-20240307-v1:0/invoke
    re.compile(r"/deployments/([^/]+)/"),  # Azure OpenAI deployment
)


def _provider_of(host: str, port: int | None, path: str) -> str:
    for needle, name in _HOSTS:
        if needle.startswith(".") and host.endswith(needle) or needle.endswith(".") and host.startswith(needle) \
                or host == needle:
            return name
    if port == 11434 or "/api/chat" in path or "/api/generate" in path:
        return "ollama"
    if path.endswith(("/chat/completions", "/completions", "/embeddings")):
        return "openai_compatible"
    if path.endswith("/messages"):
        return "anthropic_compatible"
    return "unknown"


def detect_llm_call(url: str, body: Any) -> dict:
    try:
        parsed = urlparse(url if "//" in url else f"//{url}")
        host, port, path = (parsed.hostname or "").lower(), parsed.port, parsed.path or ""
    except ValueError:  # a bracket without its pair, a port that is not one
        host, port, path = "", None, ""
    provider = _provider_of(host, port, path)
    if isinstance(body, str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            body = None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        model = None
        for pattern in _PATH_MODEL:
            match = pattern.search(path)
            if match:
                model = match.group(1)
                break
    return {"provider": provider, "model": model[:200] if model else None}


@router.post("/instrumentation/detect", response={200: DetectOut}, tags=["instrumentation"],
             summary="1.8.1: which provider and model an HTTP call goes to")
def instrumentation_detect(request, payload: DetectIn):
    return detect_llm_call(payload.url, payload.body)


def _fake_span(*, provider: str, method: str, prompt: str, response: str, started: float, ttft_ms: float | None,
               finish_reason: str, streamed: bool) -> dict:
    return {
        "span_id": str(uuid.uuid4()),
        "trace_id": str(uuid.uuid4()),
        "timestamp_utc": datetime.fromtimestamp(started, tz=timezone.utc),
        "model": TEST_MODEL,
        "provider": provider,
        "service_name": TEST_SERVICE,
        "endpoint": method,
        "status": "success" if finish_reason in ("stop", "length") else "error",
        "finish_reason": finish_reason,
        "latency_ms_total": round((time.time() - started) * 1000, 3),
        "latency_ms_ttft": ttft_ms,
        "prompt": prompt,
        "response": response,
        "metadata": {"test_call": True, "fake_provider": True, "streamed": streamed},
    }


def _count(text: str, model: str | None) -> tuple[int, str]:
    counter = _token_counter()
    if counter is not None:
        try:
            return counter(text, model)
        except Exception:  # noqa: BLE001 - a count is a nice-to-have on a test call
            log.exception("count_tokens failed")
    return max(1, round(len(text) / 4)) if text else 0, "estimated"


def _store_test_span(project, span: dict, model_hint: str | None = None) -> dict:
    prompt_tokens, _ = _count(span["prompt"] or "", model_hint)
    completion_tokens, method = _count(span["response"] or "", model_hint)
    span.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, token_count_method=method)
    spans_ingest(project=project, items=[span])
    return span


@router.post("/instrumentation/test-call", response={200: TestCallOut, 400: ErrorOut, 503: ErrorOut},
             tags=["instrumentation"],
             summary="1.8.1: make a test call through the appliance's built-in fake provider",
             description="The fake provider answers at once; the call is stored as a real span (model "
             f"`{TEST_MODEL}`, service `{TEST_SERVICE}`), visible through GET /v1/spans and the console.")
def instrumentation_test_call(request, payload: TestCallIn):
    started = time.time()
    prompt = f"llm-observe test call ({payload.method})"
    span = _fake_span(provider=payload.provider.lower(), method=payload.method, prompt=prompt, response=_FAKE_REPLY,
                      started=started, ttft_ms=None, finish_reason="stop", streamed=False)
    _store_test_span(request.auth.project, span)
    return {"success": True, "span_id": span["span_id"], "trace_id": span["trace_id"],
            "message": f"test call through the built-in fake {span['provider']} provider stored as span "
                       f"{span['span_id']}"}


# --- streaming -------------------------------------------------------------------------
def _chunks(spec: list[str] | int | None) -> list[str]:
    if isinstance(spec, list):
        return spec
    words = re.findall(r"\S+\s*", _FAKE_REPLY)
    if spec is None:
        return words
    # n chunks of the default answer, each a run of words
    n = min(spec, len(words))
    size = -(-len(words) // n)
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def _stream(project, payload: StreamIn, started: float, method: str):
    provider = payload.provider.lower()
    chunks = _chunks(payload.chunks)
    span_id = str(uuid.uuid4())
    sent: list[str] = []
    ttft_ms: float | None = None
    finish = "client_disconnect"
    try:
        for index, text in enumerate(chunks):
            time.sleep((payload.first_chunk_delay_ms if index == 0 else payload.delay_ms) / 1000)
            if ttft_ms is None:
                ttft_ms = round((time.time() - started) * 1000, 3)
            sent.append(text)
            yield _sse({"id": span_id, "index": index, "provider": provider, "model": TEST_MODEL, "content": text,
                        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        finish = "stop"
        span = _fake_span(provider=provider, method=method, prompt=f"llm-observe test stream call ({provider})",
                          response="".join(sent), started=started, ttft_ms=ttft_ms, finish_reason="stop",
                          streamed=True)
        span["span_id"] = span_id
        _store_test_span(project, span)
        yield _sse({"id": span_id, "done": True, "finish_reason": "stop", "span_id": span_id,
                    "trace_id": span["trace_id"], "latency_ms_ttft": ttft_ms,
                    "latency_ms_total": span["latency_ms_total"], "completion_tokens": span["completion_tokens"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield _sse(b"[DONE]")
    except Exception as exc:  # noqa: BLE001 - the stream is already 200: say it in the stream
        log.exception("test stream call failed")
        finish = "done"
        yield b"event: error\n" + _sse({"error": f"the test stream failed: {type(exc).__name__}",
                                        "rule": "unavailable"})
    finally:
        if finish == "client_disconnect":
            # The client went away mid-stream: what was generated so far is still a span.
            span = _fake_span(provider=provider, method=method, prompt=f"llm-observe test stream call ({provider})",
                              response="".join(sent), started=started, ttft_ms=ttft_ms,
                              finish_reason="client_disconnect", streamed=True)
            span["span_id"] = span_id
            try:
                _store_test_span(project, span)
            except Exception:  # noqa: BLE001
                log.exception("storing the interrupted test stream failed")


_STREAM_OPENAPI = {
    "responses": {
        "200": {
            "description": "Server-sent events: one `data:` event per chunk, then a `done` event naming the stored "
                           "span, then `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example":
                'data: {"index":0,"content":"Hello","choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
                'data: {"done":true,"span_id":"0b6f2c1e-...","latency_ms_ttft":101.2}\n\n'
                'data: [DONE]\n\n'}},
        },
    },
}


def _stream_route(request, payload: StreamIn):
    started = time.time()
    response = StreamingHttpResponse(_stream(request.auth.project, payload, started, request.path),
                                     content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # no proxy buffering: TTFT is the point
    return response


for _path in ("/v1/streaming/test-stream-call", "/streaming/test-stream-call"):
    router.add_api_operation(
        _path, ["POST"], _stream_route, response={400: ErrorOut}, tags=["streaming"],
        summary="1.8.1: a streamed test call through the built-in fake provider (SSE)",
        description="Streams the fake provider's answer as server-sent events; the call is stored as a span with "
        "its time to first chunk (latency_ms_ttft). A client that disconnects mid-stream gets a span with "
        "finish_reason client_disconnect.",
        openapi_extra=_STREAM_OPENAPI, operation_id=f"test_stream_call{_path.replace('/', '_').replace('-', '_')}",
    )


# --- utilities --------------------------------------------------------------------------
def _token_counter():
    try:
        from instrumentation_sdk.tokens import count_tokens
    except ImportError:
        try:
            from instrumentation_sdk import count_tokens
        except ImportError:
            return None
    return count_tokens


@router.post("/v1/token-counting/count", response={200: CountOut, 400: ErrorOut, 503: ErrorOut},
             tags=["utilities"], summary="1.8.1: count the tokens of a prompt for a model")
def token_count(request, payload: CountIn):
    counter = _token_counter()
    if counter is None:
        return _unavailable("token counting (instrumentation_sdk.tokens)")
    try:
        tokens, method = counter(payload.prompt, payload.model)
    except Exception as exc:  # noqa: BLE001 - a message shape the counter does not read is the caller's
        log.info("count_tokens refused a prompt: %r", exc)
        return Status(400, {"error": f"cannot count this prompt: {type(exc).__name__}: {exc}",
                            "rule": "invalid_request", "field": "prompt"})
    return {"tokens": int(tokens), "method": method}


def _prompt_text(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    pieces: list[str] = []
    for message in prompt:
        for value in message.values():
            if isinstance(value, str):
                pieces.append(value)
            elif isinstance(value, list):
                pieces += [p.get("text") or p.get("content") or "" for p in value if isinstance(p, dict)
                           and isinstance(p.get("text") or p.get("content") or "", str)]
    return "\n".join(pieces)


@router.post("/v1/pii-injection/scan", response={200: ScanOut, 400: ErrorOut}, tags=["utilities"],
             summary="1.8.1: does a prompt hold PII or a prompt-injection attempt",
             description="The same patterns (DetectionPattern table) that scan every stored span.")
def pii_injection_scan(request, payload: ScanIn):
    from ingest.services.scanning import scan_text

    result = scan_text(_prompt_text(payload.prompt))
    return {"pii_detected": bool(result.pii_detected), "injection_attempt": bool(result.injection_attempt)}


@router.post("/v1/sampling/should-sample", response={200: SampleOut, 400: ErrorOut}, tags=["utilities"],
             summary="1.8.1: whether a span_id is sampled (prompt hash + embedding)",
             description="Deterministic per span_id, with your project's sampling rate (default: "
             "sha256(span_id) % 100 == 0, about 1 %); the SDK and the appliance always agree.")
def sampling_should_sample(request, payload: SampleIn):
    return {"is_sampled": should_sample(payload.span_id, request.auth.project.sampling_rate)}


def _embedder():
    try:
        from ingest.services.embeddings import embed_texts
    except ImportError:
        return None
    return embed_texts


@router.post("/v1/embeddings/embed", response={200: EmbedOut, 400: ErrorOut, 503: ErrorOut}, tags=["utilities"],
             summary="1.8.1: the 384-d MiniLM embedding of a text")
def embeddings_embed(request, payload: EmbedIn):
    embed_texts = _embedder()
    if embed_texts is None:
        return _unavailable("embedding (embed_texts)")
    try:
        vectors = embed_texts([payload.text])
    except Exception:  # noqa: BLE001 - the model may be missing or fail to load
        log.exception("embedding failed")
        return _unavailable("the embedding model")
    return {"embedding": [float(x) for x in vectors[0]]}


# --- metrics ---------------------------------------------------------------------------
@router.post("/v1/metrics/init", response={200: MetricsStateOut}, tags=["metrics"],
             summary="1.8.1: initialise the metrics pipeline (always on in the appliance)")
def metrics_init(request):
    initialized, message = metrics_state()
    return {"initialized": initialized, "message": message}


@router.get("/v1/metrics/health", response={200: MetricsStateOut}, tags=["metrics"],
            summary="1.8.1: state of the metrics pipeline")
def metrics_health(request):
    initialized, message = metrics_state()
    return {"initialized": initialized, "message": message}


def _record_error(result) -> Status:
    first = result.rejected[0]
    return Status(400, {"error": f"no valid span: {first.reason}", "rule": first.rule, "field": first.field,
                        "rejected": [r.as_dict() for r in result.rejected]})


@router.post("/v1/metrics/record", response={200: RecordOut, 400: ErrorOut, 413: ErrorOut, 415: ErrorOut,
                                             503: ErrorOut},
             tags=["metrics"], openapi_extra=_body(_SPAN_SCHEMA, _RECORD_EXAMPLE),
             summary="1.8.1: record one span's metrics",
             description="The span is stored like POST /v1/spans (so it counts in /metrics, costs and the "
             "console exactly once; re-sent span_ids are not counted twice). Answers its cost.")
def metrics_record(request):
    try:
        require_json(request)
        data = read_body(request)
        item = orjson.loads(data) if data.strip() else None
    except BodyError as exc:
        return Status(exc.status, {"error": exc.message, "rule": exc.rule})
    except orjson.JSONDecodeError as exc:
        return Status(400, {"error": f"body is not valid JSON: {exc}", "rule": "invalid_json"})
    if not isinstance(item, dict):
        return Status(400, {"error": "body must be one span object", "rule": "invalid_body"})
    result = spans_ingest(project=request.auth.project, items=[item])
    if result.accepted == 0:
        return _record_error(result)
    span = SpanIn.model_validate(item)
    cost = price_table().cost(provider=span.provider, model=span.model, prompt_tokens=span.prompt_tokens,
                              completion_tokens=span.completion_tokens, cached_tokens=span.cached_tokens)
    return {"recorded": True, "cost_usd_micro": cost.cost_usd_micro if cost else None,
            "price_version": cost.price_version if cost else None}


@router.post("/v1/metrics/record-batch", response={200: RecordBatchOut, 400: ErrorOut, 413: ErrorOut,
                                                   415: ErrorOut, 503: ErrorOut},
             tags=["metrics"],
             openapi_extra=_body({"type": "array", "items": _SPAN_SCHEMA, "minItems": 1, "maxItems": 1000},
                                 [_RECORD_EXAMPLE]),
             summary="1.8.1: record the metrics of a batch of spans",
             description="An array of spans (or `{\"spans\": [...]}`), stored like POST /v1/spans.")
def metrics_record_batch(request):
    try:
        items = read_json_spans(request)
    except BodyError as exc:
        return Status(exc.status, {"error": exc.message, "rule": exc.rule})
    result = spans_ingest(project=request.auth.project, items=items)
    if result.accepted == 0:
        return _record_error(result)
    return {"recorded_count": result.accepted, "rejected": [r.as_dict() for r in result.rejected]}


# --- GET /metrics ------------------------------------------------------------------------
metrics_router = Router(tags=["metrics"])


def _scrape_allowed(request) -> bool:
    token = getattr(settings, "METRICS_AUTH_TOKEN", None)
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


@metrics_router.get(
    "/metrics", summary="Prometheus metrics (text exposition)",
    description="Counters and histograms of stored spans (llm_spans_total, llm_tokens_total, "
    "llm_cost_usd_micro_total, llm_latency_ms_total, llm_latency_ms_ttft, llm_pii_detected_total, "
    "llm_injection_attempts_total, llm_finish_reason_total), ingest and queue metrics, summed over every "
    "appliance process. Open unless METRICS_AUTH_TOKEN is set (then `Authorization: Bearer <token>`).",
    openapi_extra={"responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {
        "schema": {"type": "string"},
        "example": '# TYPE llm_spans_total counter\nllm_spans_total{model="gpt-4o",provider="openai",'
                   'service_name="payment-bot",status="success"} 42.0\n'}}},
        "401": {"description": "METRICS_AUTH_TOKEN is set and the bearer token is missing or wrong"}}},
)
def metrics_scrape(request):
    if not _scrape_allowed(request):
        response = HttpResponse(b"missing or wrong metrics token\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="llm-observe metrics"'
        return response
    body, content_type = metrics_exposition()
    return HttpResponse(body, content_type=content_type)


# --- examples for the routes whose schemas carry none --------------------------------------
_SPAN_OUT_EXAMPLE = {
    "span_id": "eee19b7ec3c1b174", "trace_id": "5b8efff798038103d269b633813fc60c",
    "parent_span_id": "eee19b7ec3c1b173", "timestamp_utc": "2026-11-26T10:15:00.123456Z", "schema_version": 1,
    "model": "gpt-4o-2024-08-06", "provider": "openai", "service_name": "payment-bot", "endpoint": "/chat",
    "environment": "production", "user_id": "u-42", "session_id": "conv-7", "status": "success",
    "finish_reason": "stop", "prompt_tokens": 812, "completion_tokens": 164, "cached_tokens": 512,
    "reasoning_tokens": None, "token_count_method": "provider", "latency_ms_ttft": 412.0,
    "latency_ms_total": 1834.2, "cost_usd_micro": 3030, "price_version": "2026-11-26", "is_sampled": False,
    "retry_count": 0, "attempted_models": None, "pii_detected": True, "injection_attempt": False,
    "matched_patterns": ["email"], "scan_status": "ok", "prompt": "Mail the invoice to <EMAIL>",
    "response": "Done.", "prompt_hash": None, "error_type": None, "error_message": None,
    "metadata": {"team": "billing"}, "received_at": "2026-11-26T10:15:01.002000Z",
}
_EXAMPLES = {
    ("/healthz", "get"): {"status": "ok", "database": "ok", "broker": "ok", "worker": "ok"},
    ("/v1/spans", "get"): {"items": [_SPAN_OUT_EXAMPLE], "next_cursor": "WyIyMDI2LTExLTI2VDEwOjE1OjAwIiwiZWVlIl0"},
    ("/v1/traces/{trace_id}", "get"): {"trace_id": "5b8efff798038103d269b633813fc60c", "span_count": 1,
                                       "roots": [{**_SPAN_OUT_EXAMPLE, "parent_span_id": None, "children": []}]},
}


def _merge_status_keys(schema: dict) -> None:
    # ninja keys responses by int, openapi_extra by string: both would be written as "200", a JSON
    # object with a duplicate key, which Swagger UI refuses. One entry, the route's own text winning.
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses") if isinstance(operation, dict) else None
            for code in [k for k in responses or () if isinstance(k, int) and str(k) in responses]:
                responses[str(code)] = {**responses.pop(code), **responses[str(code)]}


def openapi_add_examples(schema: dict) -> dict:
    """Put a 200 example on the operations listed above, unless they have one already."""
    _merge_status_keys(schema)
    for (path, method), example in _EXAMPLES.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if not operation:
            continue
        responses = operation.get("responses", {})
        ok = responses.get(200, responses.get("200", {}))  # ninja keys them by int until rendered
        content = ok.get("content", {}).get("application/json")
        if content is not None and "example" not in content and "examples" not in content:
            content["example"] = example
    return schema
