"""Manual instrumentation: @llm_observe, llm_span, llm_span_with_tokens, llm_streaming_span, wrap_stream.

A span is a plain dict built at the end of the call and handed to the reporter
(`emit`); the hot path does no I/O, no formatting and no scanning (the reporter's
thread does those), except `set_metadata("prompt", ...)`, which scans at once so
`span.pii_detected` can be read right after.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from contextvars import ContextVar
from typing import Any, AsyncIterable, Callable, Iterable

from instrumentation_sdk._config import get_config
from instrumentation_sdk._kinds import as_kind, kind_or_raise, span_name
from instrumentation_sdk._reporter import emit, new_span_id
from instrumentation_sdk._tokens import TokenAccumulator, count_tokens
from instrumentation_sdk.scanning import prompt_text, scan_prompt

_perf = time.perf_counter
_now = time.time

# (trace_id, span_id) of the innermost open span of this thread / task.
_current: ContextVar[tuple[str, str] | None] = ContextVar("llm_observe_current_span", default=None)

SPAN_FIELDS = frozenset((
    "span_id", "trace_id", "parent_span_id", "model", "provider", "service_name", "endpoint", "environment",
    "user_id", "session_id", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "latency_ms_ttft", "latency_ms_total", "finish_reason", "cost_usd_micro", "price_version",
    "token_count_method", "is_sampled", "retry_count", "attempted_models", "pii_detected", "injection_attempt",
    "timestamp_utc", "status", "prompt", "text", "response", "error_type", "error_message", "schema_version",
    "name", "kind",
))


def _kind_from(kind: Any, metadata: dict) -> str | None:
    """`kind=` (checked now: a typo raises at the call), else 1.8.1's `span_type=` metadata when it names
    a kind (it then moves out of the metadata; any other span_type stays metadata, as in 1.8.1)."""
    if kind is not None:
        return kind_or_raise(kind)
    mapped = as_kind(metadata.get("span_type"))
    if mapped is not None:
        del metadata["span_type"]
    return mapped


def current_span_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the span the caller is inside, if any."""
    return _current.get()


def _error_fields(data: dict, exc: BaseException) -> None:
    data["status"] = "error"
    data["error_type"] = type(exc).__name__
    message = str(exc)
    if message:
        data["error_message"] = message[:10_000]
    if isinstance(exc, asyncio.CancelledError):
        data["finish_reason"] = "cancelled"
    elif isinstance(exc, GeneratorExit):
        data["status"] = "success"
        data.pop("error_type", None)
        data["finish_reason"] = "client_disconnect"
    elif not data.get("finish_reason"):
        data["finish_reason"] = "error"
    status_code = getattr(exc, "status_code", None)
    if isinstance(status_code, int):
        meta = data.setdefault("metadata", {})
        meta["http_status"] = status_code


# --- @llm_observe --------------------------------------------------------------------------


def llm_observe(service: str | Callable | None = None, endpoint: str | None = None, *, model: str | None = None,
                provider: str | None = None, kind: str | None = None, name: str | None = None, **metadata: Any):
    """Decorator for sync/async functions and generators: one span per call.

    @llm_observe(service="payment-bot", endpoint="gpt-4o")   # or bare @llm_observe
    @llm_observe(service="search-agent", kind="tool", name="web_search")

    The span's name is `name`, else the function's qualified name; its kind is `kind` (one of
    SPAN_KINDS, any case; a bad one raises ValueError here), else a 1.8.1 `span_type=` that names one,
    else left to the appliance.
    """
    if callable(service) and endpoint is None and not metadata and kind is None and name is None:
        return llm_observe()(service)
    metadata = dict(metadata)
    span_kind = _kind_from(kind, metadata)
    given_name = None if name is None else span_name(name)

    def decorate(fn: Callable) -> Callable:
        qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "call")
        ep = endpoint or qualname
        # a nested function's qualified name without its "outer.<locals>." part
        base: dict[str, Any] = {"endpoint": ep,
                                "name": given_name or span_name(str(qualname).rsplit(".<locals>.", 1)[-1])}
        if span_kind is not None:
            base["kind"] = span_kind
        if service:
            base["service_name"] = service
        if model:
            base["model"] = model
        if provider:
            base["provider"] = provider
        if metadata:
            base["metadata"] = dict(metadata)

        def start() -> tuple[dict, Any]:
            parent = _current.get()
            span_id = new_span_id()
            data = dict(base)
            data["span_id"] = span_id
            if parent is None:
                data["trace_id"] = new_span_id()
            else:
                data["trace_id"] = parent[0]
                data["parent_span_id"] = parent[1]
            if "metadata" in data:
                data["metadata"] = dict(data["metadata"])
            return data, _current.set((data["trace_id"], span_id))

        def finish(data: dict, token: Any, t0: float, exc: BaseException | None) -> None:
            data["latency_ms_total"] = (_perf() - t0) * 1000.0
            try:
                _current.reset(token)
            except ValueError:  # finished in another context (rare: a generator moved between tasks)
                pass
            if exc is None:
                data["status"] = "success"
            else:
                _error_fields(data, exc)
            emit(data)

        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def agen_wrapper(*args: Any, **kwargs: Any):
                data, token = start()
                data["timestamp_utc"] = _now()
                t0 = _perf()
                error: BaseException | None = None
                try:
                    async for item in fn(*args, **kwargs):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(data, token, t0, error)
            return agen_wrapper

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any):
                if not get_config().enabled:
                    return await fn(*args, **kwargs)
                data, token = start()
                data["timestamp_utc"] = _now()
                t0 = _perf()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:  # CancelledError included; re-raised unchanged
                    finish(data, token, t0, exc)
                    raise
                finish(data, token, t0, None)
                return result
            return async_wrapper

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any):
                data, token = start()
                data["timestamp_utc"] = _now()
                t0 = _perf()
                error: BaseException | None = None
                try:
                    yield from fn(*args, **kwargs)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(data, token, t0, error)
            return gen_wrapper

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any):
            if not get_config().enabled:
                return fn(*args, **kwargs)
            data, token = start()
            data["timestamp_utc"] = _now()
            t0 = _perf()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                finish(data, token, t0, exc)
                raise
            finish(data, token, t0, None)
            return result
        return sync_wrapper

    return decorate


# --- llm_span ------------------------------------------------------------------------------


class LLMSpan:
    """The object `llm_span(...)` yields. Sync and async context manager."""

    __slots__ = ("data", "_t0", "_token", "_reported", "_scanned", "_activate", "_kind_given")

    def __init__(self, model: str | None = None, user_id: str | None = None, *, activate: bool = True,
                 **fields: Any) -> None:
        data: dict[str, Any] = {}
        if model is not None:
            data["model"] = model
        if user_id is not None:
            data["user_id"] = user_id
        self.data = data
        self._t0 = 0.0
        self._token = None
        self._reported = False
        self._scanned = False
        self._activate = activate
        self._kind_given = False
        # kind= before span_type=, whatever the order they came in: an explicit kind wins
        for key in ("kind", "name"):
            if key in fields:
                self.set_metadata(key, fields.pop(key))
        for key, value in fields.items():
            self.set_metadata(key, value)

    # identity
    @property
    def span_id(self) -> str | None:
        return self.data.get("span_id")

    @property
    def trace_id(self) -> str | None:
        return self.data.get("trace_id")

    @property
    def parent_span_id(self) -> str | None:
        return self.data.get("parent_span_id")

    @property
    def metadata(self) -> dict:
        return self.data.setdefault("metadata", {})

    @property
    def pii_detected(self) -> bool:
        return bool(self.data.get("pii_detected"))

    @property
    def injection_attempt(self) -> bool:
        return bool(self.data.get("injection_attempt"))

    def __getattr__(self, name: str) -> Any:
        # span.model, span.prompt_tokens ... read through to the span fields
        data = object.__getattribute__(self, "data")
        if name in SPAN_FIELDS:
            return data.get(name)
        raise AttributeError(name)

    def set_metadata(self, key: str, value: Any) -> "LLMSpan":
        """Set a span field (model, prompt_tokens, response, ...) or a free metadata key.

        Setting "prompt" (or "text") scans it again for PII and injection. "kind" must name one of
        SPAN_KINDS (any case; ValueError otherwise); 1.8.1's "span_type" becomes the kind when it
        names one and no kind was given, else it stays metadata.
        """
        if key == "kind":
            if value is None:
                self.data.pop("kind", None)
                self._kind_given = False
            else:
                self.data["kind"] = kind_or_raise(value)
                self._kind_given = True
        elif key == "name":
            if value is None:
                self.data.pop("name", None)
            else:
                self.data["name"] = span_name(value)
        elif key == "span_type" and not self._kind_given and as_kind(value) is not None:
            self.data["kind"] = as_kind(value)
        elif key in ("prompt", "text"):
            text = value if isinstance(value, str) or value is None else prompt_text(value)
            self.data["prompt"] = text
            pii, injection = scan_prompt(text) if text else (False, False)
            self.data["pii_detected"] = pii
            self.data["injection_attempt"] = injection
            self._scanned = True
        elif key in SPAN_FIELDS:
            self.data[key] = value
        elif key == "metadata" and isinstance(value, dict):
            self.metadata.update(value)
        else:
            self.metadata[key] = value
        return self

    def set(self, **fields: Any) -> "LLMSpan":
        for key, value in fields.items():
            self.set_metadata(key, value)
        return self

    def set_response(self, text: Any) -> "LLMSpan":
        self.data["response"] = text if isinstance(text, str) or text is None else str(text)
        return self

    def set_usage(self, prompt_tokens: int | None = None, completion_tokens: int | None = None, *,
                  cached_tokens: int | None = None, reasoning_tokens: int | None = None,
                  method: str = "provider") -> "LLMSpan":
        for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                            ("cached_tokens", cached_tokens), ("reasoning_tokens", reasoning_tokens)):
            if value is not None:
                self.data[name] = value
        self.data["token_count_method"] = method
        return self

    # lifecycle
    def start(self) -> "LLMSpan":
        data = self.data
        parent = _current.get()
        data.setdefault("span_id", new_span_id())
        if parent is None:
            data.setdefault("trace_id", new_span_id())
        else:
            data.setdefault("trace_id", parent[0])
            data.setdefault("parent_span_id", parent[1])
        data["timestamp_utc"] = _now()
        if self._activate:
            self._token = _current.set((data["trace_id"], data["span_id"]))
        self._t0 = _perf()
        return self

    def _deactivate(self) -> None:
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:
                pass
            self._token = None

    def end(self, exc: BaseException | None = None) -> None:
        self._deactivate()
        self._finalise(exc)

    def _finalise(self, exc: BaseException | None) -> None:
        if self._reported:
            return
        self._reported = True
        data = self.data
        data["latency_ms_total"] = (_perf() - self._t0) * 1000.0
        if exc is not None:
            _error_fields(data, exc)
        else:
            data.setdefault("status", "success")
        self._before_emit()
        if data.get("metadata") == {}:
            del data["metadata"]
        emit(data, prompt_scanned=self._scanned)

    def _before_emit(self) -> None:
        pass

    def __enter__(self) -> "LLMSpan":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.end(exc)
        return False

    async def __aenter__(self) -> "LLMSpan":
        return self.start()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self.end(exc)
        return False


def llm_span(model: str | None = None, user_id: str | None = None, **metadata: Any) -> LLMSpan:
    """`with llm_span(model="gpt-4o", user_id="u-42") as span:` (or `async with`)."""
    return LLMSpan(model, user_id, **metadata)


class _TokenSpan(LLMSpan):
    __slots__ = ()

    def _before_emit(self) -> None:
        data = self.data
        response = data.get("response")
        if response and data.get("completion_tokens") is None:
            n, method = count_tokens(response, data.get("model"))
            if method != "unspecified":
                data["completion_tokens"] = n


def llm_span_with_tokens(model: str | None = None, provider: str | None = None, prompt: Any = None,
                         **kw: Any) -> LLMSpan:
    """llm_span that also counts the prompt: sets prompt_tokens and token_count_method."""
    return _with_prompt(_TokenSpan(model, kw.pop("user_id", None), **kw), model, provider, prompt,
                        count_without_prompt=True)


def _with_prompt(span: LLMSpan, model: str | None, provider: str | None, prompt: Any, *,
                 count_without_prompt: bool) -> LLMSpan:
    """Set the provider and the prompt of a new span, and count the prompt's tokens."""
    if provider is not None:
        span.data["provider"] = provider
    if prompt is not None:
        span.set_metadata("prompt", prompt)
    if prompt is not None or count_without_prompt:
        n, method = count_tokens(prompt, model)
        span.data["prompt_tokens"] = n
        span.data["token_count_method"] = method
    return span


# --- streaming -----------------------------------------------------------------------------


class StreamingSpan(LLMSpan):
    """A span whose completion comes from a stream; reported when both the block and its streams ended."""

    __slots__ = ("_first", "_acc", "_open", "_exited", "_exit_exc", "_stream_finish")

    def __init__(self, *args: Any, **kw: Any) -> None:
        LLMSpan.__init__(self, *args, **kw)
        self._first: float | None = None
        self._acc = TokenAccumulator()
        self._open = 0
        self._exited = False
        self._exit_exc: BaseException | None = None
        self._stream_finish: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self._first is None else (self._first - self._t0) * 1000.0

    @property
    def text(self) -> str:
        return self._acc.text()

    def record_chunk(self, text: str | None) -> None:
        if self._first is None:
            self._first = _perf()
        if text:
            self._acc.add(text)

    # a stream attached to this span
    def _stream_opened(self) -> None:
        self._open += 1

    def _stream_closed(self, finish_reason: str | None, exc: BaseException | None) -> None:
        self._open = max(0, self._open - 1)
        if finish_reason and (self._stream_finish is None or finish_reason != "stop"):
            self._stream_finish = finish_reason
        if exc is not None and self._exit_exc is None:
            self._exit_exc = exc
        if self._exited and self._open == 0:
            self._finalise(self._exit_exc)

    def end(self, exc: BaseException | None = None) -> None:
        self._deactivate()
        self._exited = True
        if exc is not None:
            self._exit_exc = exc
        if self._open == 0:
            self._finalise(self._exit_exc)
        # else: the stream outlives the block (returned to a web framework): reported when it ends

    def _before_emit(self) -> None:
        data = self.data
        if self._first is not None:
            data["latency_ms_ttft"] = (self._first - self._t0) * 1000.0
        text = self._acc.text()
        if text:
            if "response" not in data:
                data["response"] = text
            if data.get("completion_tokens") is None:
                n, method = self._acc.count(data.get("model"))
                data["completion_tokens"] = n
                if data.get("token_count_method") in (None, "unspecified"):
                    data["token_count_method"] = method
        elif data.get("completion_tokens") is None and self._first is not None:
            data["completion_tokens"] = 0
        if self._stream_finish and not data.get("finish_reason"):
            data["finish_reason"] = self._stream_finish


def llm_streaming_span(model: str | None = None, provider: str | None = None, prompt: Any = None,
                       **kw: Any) -> StreamingSpan:
    """Context for wrap_stream / wrap_async_stream: TTFT and completion tokens of a streamed answer."""
    return _with_prompt(StreamingSpan(model, kw.pop("user_id", None), **kw), model, provider, prompt,
                        count_without_prompt=False)


def default_extract_text(chunk: Any) -> str | None:
    """str chunks, dict "content", OpenAI choices[0].delta.content, `.content`, `.text`."""
    if isinstance(chunk, str):
        return chunk
    if isinstance(chunk, bytes):
        return chunk.decode("utf-8", "replace")
    if isinstance(chunk, dict):
        content = chunk.get("content")
        if isinstance(content, str):
            return content
        choices = chunk.get("choices")
        if choices and isinstance(choices, list) and isinstance(choices[0], dict):
            delta = choices[0].get("delta") or choices[0].get("message") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                return content
            text = choices[0].get("text")
            if isinstance(text, str):
                return text
        text = chunk.get("text") or chunk.get("delta")
        return text if isinstance(text, str) else None
    choices = getattr(chunk, "choices", None)
    if choices:
        try:
            first = choices[0]
            delta = getattr(first, "delta", None) or getattr(first, "message", None)
            content = getattr(delta, "content", None) if delta is not None else getattr(first, "text", None)
            if isinstance(content, str):
                return content
        except (IndexError, TypeError, KeyError):
            pass
        return None
    content = getattr(chunk, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # LangChain chunks with content blocks
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content) or None
    text = getattr(chunk, "text", None)
    return text if isinstance(text, str) else None


def _chunk_finish_reason(chunk: Any) -> str | None:
    try:
        if isinstance(chunk, dict):
            choices = chunk.get("choices")
            if choices and isinstance(choices[0], dict):
                return choices[0].get("finish_reason")
            return chunk.get("finish_reason")
        choices = getattr(chunk, "choices", None)
        if choices:
            return getattr(choices[0], "finish_reason", None)
    except (IndexError, TypeError, KeyError, AttributeError):
        return None
    return None


class StreamProxyBase:
    """A stream proxy: any other attribute is the wrapped stream's; one dropped unfinished is reported
    as a client disconnect. Subclasses set _proxied (the attribute holding the stream) and _disconnect."""

    _proxied = "_source"

    def _disconnect(self) -> None:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get(self._proxied)
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __del__(self) -> None:
        try:
            if "_done" in self.__dict__:
                self._disconnect()
        except Exception:  # noqa: BLE001
            pass


class SyncClosing(StreamProxyBase):
    """close() and `with` for a sync stream proxy: stopped early, what was generated so far is
    reported (finish_reason client_disconnect), then the stream itself is closed."""

    def _closable(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self._disconnect()
        closer = getattr(self._closable(), "close", None)
        if callable(closer):
            closer()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


class _StreamBase(StreamProxyBase):
    def __init__(self, source: Any, span_context: StreamingSpan | None, model: str | None,
                 extract_text_fn: Callable[[Any], str | None] | None, **span_fields: Any) -> None:
        self._source = source
        if span_context is not None and not isinstance(span_context, StreamingSpan):
            # a plain llm_span given as the context: the stream gets its own span, with its fields
            span_fields = {**{k: v for k, v in span_context.data.items()
                              if k in ("provider", "user_id", "session_id", "endpoint")}, **span_fields}
            model = model or span_context.data.get("model")
            span_context = None
        self._own = span_context is None
        if span_context is None:
            span_context = llm_streaming_span(model=model, **span_fields)
            span_context.start()
            span_context._deactivate()  # a stream has no "inside": it must not parent unrelated spans
        elif model and not span_context.data.get("model"):
            span_context.data["model"] = model
        self.span = span_context
        self._extract = extract_text_fn or default_extract_text
        self._done = False
        self._finish: str | None = None
        span_context._stream_opened()
        if self._own:
            span_context._exited = True

    def _on_item(self, item: Any) -> None:
        try:
            text = self._extract(item)
            self.span.record_chunk(text if isinstance(text, str) else (str(text) if text is not None else None))
            reason = _chunk_finish_reason(item)
            if reason:
                self._finish = str(reason)
        except Exception:  # noqa: BLE001 - an odd chunk must not break the user's stream
            self.span.record_chunk(None)

    def _close_span(self, finish_reason: str | None, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self.span._stream_closed(finish_reason, exc)

    def _disconnect(self) -> None:
        if not self._done:
            self._close_span("client_disconnect", None)


class WrappedStream(SyncClosing, _StreamBase):
    """Iterator proxy: records TTFT, text and finish; reports when exhausted, failed or closed."""

    def __init__(self, source: Iterable, span_context=None, model=None, extract_text_fn=None, **span_fields):
        super().__init__(source, span_context, model, extract_text_fn, **span_fields)
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._iter is None:
            self._iter = iter(self._source)
        try:
            item = next(self._iter)
        except StopIteration:
            self._close_span(self._finish or "stop", None)
            raise
        except BaseException as exc:
            self._close_span("error", exc)
            raise
        self._on_item(item)
        return item

    def _closable(self) -> Any:
        return self._iter if self._iter is not None else self._source


class WrappedAsyncStream(_StreamBase):
    def __init__(self, source: AsyncIterable, span_context=None, model=None, extract_text_fn=None, **span_fields):
        super().__init__(source, span_context, model, extract_text_fn, **span_fields)
        self._iter = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        if self._iter is None:
            self._iter = self._source.__aiter__()
        try:
            item = await self._iter.__anext__()
        except StopAsyncIteration:
            self._close_span(self._finish or "stop", None)
            raise
        except BaseException as exc:  # CancelledError stays CancelledError
            self._close_span("cancelled" if isinstance(exc, asyncio.CancelledError) else "error", exc)
            raise
        self._on_item(item)
        return item

    async def aclose(self) -> None:
        """Stop early: what was generated so far is reported (finish_reason client_disconnect)."""
        self._disconnect()
        target = self._iter if self._iter is not None else self._source
        closer = getattr(target, "aclose", None) or getattr(target, "close", None)
        if callable(closer):
            result = closer()
            if inspect.isawaitable(result):
                await result

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.aclose()
        return False


def wrap_stream(iterable: Iterable, span_context: StreamingSpan | None = None, model: str | None = None,
                extract_text_fn: Callable[[Any], str | None] | None = None, **span_fields: Any) -> WrappedStream:
    return WrappedStream(iterable, span_context, model, extract_text_fn, **span_fields)


def wrap_async_stream(aiterable: AsyncIterable, span_context: StreamingSpan | None = None, model: str | None = None,
                      extract_text_fn: Callable[[Any], str | None] | None = None,
                      **span_fields: Any) -> WrappedAsyncStream:
    return WrappedAsyncStream(aiterable, span_context, model, extract_text_fn, **span_fields)
