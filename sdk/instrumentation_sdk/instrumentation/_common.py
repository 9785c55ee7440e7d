"""Shared machinery of the client integrations: spans of one LLM call, stream proxies, patching.

One span per user-visible call: every integration sets `_IN_CALL` while the
wrapped library runs, and an integration entered while it is set passes straight
through. litellm -> openai, LangChain -> openai, and openai's own `.stream()`
helper -> `.create()` therefore each yield exactly one span.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Callable

from instrumentation_sdk._config import get_config
from instrumentation_sdk._spans import StreamingSpan, StreamProxyBase, SyncClosing
from instrumentation_sdk._tokens import count_tokens

log = logging.getLogger("instrumentation_sdk")

_IN_CALL: ContextVar[bool] = ContextVar("llm_observe_in_instrumented_call", default=False)
ORIGINAL_ATTR = "__llm_observe_original__"


def inside_instrumented_call() -> bool:
    return _IN_CALL.get()


def get(obj: Any, name: str, default: Any = None) -> Any:
    """obj[name] for dicts, obj.name otherwise."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    kind = get(part, "type")
    if kind in ("text", "input_text", "output_text"):
        return get(part, "text") or ""
    if kind in ("image_url", "input_image", "image"):
        return "[image]"
    if kind == "tool_result":
        return content_text(get(part, "content"))
    if kind in ("tool_use", "function_call"):
        arguments = json.dumps(get(part, "input", get(part, "arguments", "")), default=str)
        return f"[{kind} {get(part, 'name', '')}({arguments})]"
    text = get(part, "text")
    return text if isinstance(text, str) else ""


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(_part_text(p) for p in content)
    return _part_text(content)


def render_prompt(messages: Any, system: Any = None) -> str | None:
    """Readable text of a prompt: "role: content" lines; a lone user message is its text alone."""
    lines: list[str] = []
    if system:
        lines.append(f"system: {content_text(system)}")
    if messages is None:
        pass
    elif isinstance(messages, str):
        if not lines:
            return messages
        lines.append(f"user: {messages}")
    else:
        items = list(messages) if isinstance(messages, (list, tuple)) else [messages]
        if len(items) == 1 and not lines:
            role = get(items[0], "role") or get(items[0], "type")
            if role in ("user", "human", None):
                return content_text(get(items[0], "content"))
        for message in items:
            role = get(message, "role") or get(message, "type") or "user"
            text = content_text(get(message, "content"))
            if not text and get(message, "tool_calls"):
                text = json.dumps([get(get(c, "function"), "name") for c in get(message, "tool_calls")], default=str)
            lines.append(f"{role}: {text}")
    return "\n".join(lines) if lines else None


class AutoSpan(StreamingSpan):
    """The span of one auto-instrumented call. Never becomes the "current" span."""

    __slots__ = ("prompt_obj",)

    def __init__(self, *, provider: str | None, model: str | None, operation: str, prompt: Any = None,
                 system: Any = None, stream: bool = False, prompt_obj: Any = None,
                 gen_ai_operation: str = "chat") -> None:
        StreamingSpan.__init__(self, model, activate=False)
        data = self.data
        if provider:
            data["provider"] = provider
        data["endpoint"] = operation
        # OpenTelemetry GenAI's span name: "{gen_ai.operation.name} {gen_ai.request.model}"
        data["kind"] = "EMBEDDING" if gen_ai_operation == "embeddings" else "LLM"
        data["name"] = (f"{gen_ai_operation} {model}" if isinstance(model, str) and model else gen_ai_operation)[:500]
        capture = get_config().capture_content
        if capture:
            text = render_prompt(prompt, system)
            if text is not None:
                data["prompt"] = text
        meta = data.setdefault("metadata", {})
        meta["instrumentation"] = operation
        if stream:
            meta["stream"] = True
        self.prompt_obj = prompt_obj if prompt_obj is not None else prompt

    def set_usage_fields(self, prompt: Any = None, completion: Any = None, cached: Any = None,
                         reasoning: Any = None) -> None:
        data = self.data
        seen = False
        for name, value in (("prompt_tokens", prompt), ("completion_tokens", completion),
                            ("cached_tokens", cached), ("reasoning_tokens", reasoning)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                data[name] = int(value)
                seen = True
        if seen:
            data["token_count_method"] = "provider"

    def set_actual_model(self, model: Any) -> None:
        if isinstance(model, str) and model and model != self.data.get("model"):
            if not self.data.get("model"):
                self.data["model"] = model
                name = self.data.get("name")
                if isinstance(name, str) and " " not in name:  # "chat" alone: now we know the model
                    self.data["name"] = f"{name} {model}"[:500]
            else:
                self.metadata["actual_model"] = model

    def _before_emit(self) -> None:
        StreamingSpan._before_emit(self)
        data = self.data
        if not get_config().capture_content:
            data.pop("response", None)
        if data.get("status") == "error" and data.get("prompt_tokens") is None:
            return
        methods = set()
        if data.get("prompt_tokens") is None and self.prompt_obj is not None:
            n, method = count_tokens(self.prompt_obj, data.get("model"))
            if method != "unspecified":
                data["prompt_tokens"] = n
                methods.add(method)
        response = data.get("response")
        if data.get("completion_tokens") is None and response:
            n, method = count_tokens(response, data.get("model"))
            if method != "unspecified":
                data["completion_tokens"] = n
                methods.add(method)
        if methods:
            # "provider" only when the provider reported everything; otherwise how we counted.
            data["token_count_method"] = "estimated" if "estimated" in methods else "tiktoken"
        self.prompt_obj = None


class Adapter:
    """Provider specifics: how to read a request, a response and a stream chunk."""

    operation = "call"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        raise NotImplementedError

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        return bool(kwargs.get("stream"))

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        """Fill the span from a complete (non-streamed) result."""

    def new_state(self) -> dict:
        return {}

    def on_chunk(self, span: AutoSpan, state: dict, item: Any) -> None:
        """Record one streamed item: call span.record_chunk(text) for content."""

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        """Stream over (any way): move what the state gathered into the span."""


def _safe(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - extraction bugs never reach the caller
        log.debug("llm-observe: extraction failed", exc_info=True)


class _StreamProxy(StreamProxyBase):
    """What both stream proxies of the auto-instrumentation share: the span's bookkeeping."""

    _proxied = "_inner"

    def __init__(self, inner: Any, span: AutoSpan, adapter: Adapter) -> None:
        self._inner = inner
        self._span = span
        self._adapter = adapter
        self._state = adapter.new_state()
        self._it = None
        self._done = False
        span._stream_opened()

    def _record(self, item: Any) -> Any:
        _safe(self._adapter.on_chunk, self._span, self._state, item)
        return item

    def _end(self, reason: str | None, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        _safe(self._adapter.end_stream, self._span, self._state)
        if reason is None:
            reason = self._state.get("finish_reason") or "stop"
        self._span._stream_closed(reason, exc)

    def _disconnect(self) -> None:
        if not self._done:
            self._end("client_disconnect", None)


class SyncStreamProxy(SyncClosing, _StreamProxy):
    """Transparent iterator proxy over a provider stream (attributes, context manager, close)."""

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self._inner)
        try:
            item = next(self._it)
        except StopIteration:
            self._end(None, None)
            raise
        except BaseException as exc:
            self._end("error", exc)
            raise
        return self._record(item)

    def _closable(self) -> Any:
        return self._inner


class AsyncStreamProxy(_StreamProxy):
    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._it is None:
            self._it = self._inner.__aiter__()
        try:
            item = await self._it.__anext__()
        except StopAsyncIteration:
            self._end(None, None)
            raise
        except BaseException as exc:
            import asyncio

            self._end("cancelled" if isinstance(exc, asyncio.CancelledError) else "error", exc)
            raise
        return self._record(item)

    async def close(self) -> None:
        self._disconnect()
        closer = getattr(self._inner, "close", None) or getattr(self._inner, "aclose", None)
        if callable(closer):
            result = closer()
            if hasattr(result, "__await__"):
                await result

    aclose = close

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.close()
        return False


def _begin(adapter: Adapter, instance: Any, args: tuple, kwargs: dict) -> AutoSpan | None:
    try:
        span = adapter.begin(instance, args, kwargs)
        span.start()
        return span
    except Exception:  # noqa: BLE001
        log.debug("llm-observe: could not start a span", exc_info=True)
        return None


def _complete(adapter: Adapter, span: AutoSpan, result: Any, args: tuple, kwargs: dict, is_async: bool) -> Any:
    try:
        if adapter.is_stream(args, kwargs, result):
            proxy = (AsyncStreamProxy if is_async else SyncStreamProxy)(result, span, adapter)
            span.end()  # reported when the stream ends
            return proxy
        adapter.finish(span, result, kwargs)
    except Exception:  # noqa: BLE001
        log.debug("llm-observe: could not read the result", exc_info=True)
    span.end()
    return result


@contextlib.contextmanager
def in_call(span: AutoSpan) -> Iterator[None]:
    """Around the provider call of a span: nested instrumented calls are not traced twice, and an
    exception ends the span with it before it reaches the caller unchanged."""
    token = _IN_CALL.set(True)
    try:
        yield
    except BaseException as exc:
        _IN_CALL.reset(token)
        span.end(exc)
        raise
    _IN_CALL.reset(token)


def _start(adapter: Adapter, bound_instance: Any, args: tuple, kwargs: dict) -> tuple[AutoSpan | None, tuple]:
    """The span of a wrapped call and the call's own arguments; no span when not traced."""
    if _IN_CALL.get() or not get_config().enabled:
        return None, args
    instance = bound_instance if bound_instance is not None else (args[0] if args else None)
    call_args = args if bound_instance is not None else args[1:]
    return _begin(adapter, instance, call_args, kwargs), call_args


def wrap_sync(original: Callable, adapter: Adapter, bound_instance: Any = None) -> Callable:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        span, call_args = _start(adapter, bound_instance, args, kwargs)
        if span is None:
            return original(*args, **kwargs)
        with in_call(span):
            result = original(*args, **kwargs)
        return _complete(adapter, span, result, call_args, kwargs, False)

    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper


def wrap_async(original: Callable, adapter: Adapter, bound_instance: Any = None) -> Callable:
    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        span, call_args = _start(adapter, bound_instance, args, kwargs)
        if span is None:
            return await original(*args, **kwargs)
        with in_call(span):  # CancelledError too: reported as cancelled, re-raised unchanged
            result = await original(*args, **kwargs)
        return _complete(adapter, span, result, call_args, kwargs, True)

    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper


def wrap_generator(original: Callable, adapter: Adapter) -> Callable:
    """For methods that are generators themselves (LangChain stream)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any):
        if _IN_CALL.get() or not get_config().enabled:
            yield from original(*args, **kwargs)
            return
        span = _begin(adapter, args[0] if args else None, args[1:], kwargs)
        if span is None:
            yield from original(*args, **kwargs)
            return
        state = adapter.new_state()
        span._stream_opened()
        span.end()
        gen = original(*args, **kwargs)
        reason, error = None, None
        try:
            while True:
                token = _IN_CALL.set(True)
                try:
                    item = next(gen)
                except StopIteration:
                    break
                finally:
                    _IN_CALL.reset(token)
                _safe(adapter.on_chunk, span, state, item)
                yield item
        except GeneratorExit:
            reason = "client_disconnect"
            gen.close()
            raise
        except BaseException as exc:
            reason, error = "error", exc
            raise
        finally:
            _safe(adapter.end_stream, span, state)
            span._stream_closed(reason or state.get("finish_reason") or "stop", error)

    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper


def wrap_async_generator(original: Callable, adapter: Adapter) -> Callable:
    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any):
        if _IN_CALL.get() or not get_config().enabled:
            async for item in original(*args, **kwargs):
                yield item
            return
        span = _begin(adapter, args[0] if args else None, args[1:], kwargs)
        if span is None:
            async for item in original(*args, **kwargs):
                yield item
            return
        state = adapter.new_state()
        span._stream_opened()
        span.end()
        agen = original(*args, **kwargs)
        reason, error = None, None
        try:
            while True:
                token = _IN_CALL.set(True)
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    _IN_CALL.reset(token)
                _safe(adapter.on_chunk, span, state, item)
                yield item
        except GeneratorExit:
            reason = "client_disconnect"
            await agen.aclose()
            raise
        except BaseException as exc:
            import asyncio

            reason, error = ("cancelled" if isinstance(exc, asyncio.CancelledError) else "error"), exc
            raise
        finally:
            _safe(adapter.end_stream, span, state)
            span._stream_closed(reason or state.get("finish_reason") or "stop", error)

    setattr(wrapper, ORIGINAL_ATTR, original)
    return wrapper


# --- patch registry --------------------------------------------------------------------------


class Patches:
    """Remembers every attribute we replaced, to put the originals back."""

    def __init__(self) -> None:
        self._applied: list[tuple[Any, str, Any, bool]] = []  # (owner, name, original, was_in_dict)
        self._undo: list[Callable[[], None]] = []

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Something other than an attribute to put back (a registered callback)."""
        self._undo.append(undo)

    def patch(self, owner: Any, name: str, make: Callable[[Callable], Callable], *, force: bool = False) -> bool:
        current = getattr(owner, name, None)
        if current is None:
            return False
        if not force and getattr(current, ORIGINAL_ATTR, None) is not None:
            return False  # already ours
        in_dict = name in getattr(owner, "__dict__", {})
        raw = owner.__dict__[name] if in_dict and isinstance(owner, type) else current
        wrapper = make(current)
        setattr(owner, name, wrapper)
        self._applied.append((owner, name, raw, in_dict))
        return True

    def restore(self) -> int:
        count = 0
        while self._applied:
            owner, name, original, in_dict = self._applied.pop()
            try:
                if in_dict:
                    setattr(owner, name, original)
                else:
                    delattr(owner, name)
                count += 1
            except (AttributeError, TypeError):
                log.debug("llm-observe: could not restore %r.%s", owner, name, exc_info=True)
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
                count += 1
            except Exception:  # noqa: BLE001
                log.debug("llm-observe: could not undo %r", undo, exc_info=True)
        return count

    def __len__(self) -> int:
        return len(self._applied)
