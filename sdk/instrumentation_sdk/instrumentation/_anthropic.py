"""anthropic: messages.create (sync, async, stream=True) and the messages.stream() helper."""

from __future__ import annotations

import json
from typing import Any

from instrumentation_sdk.instrumentation._common import (
    _IN_CALL, Adapter, AsyncStreamProxy, AutoSpan, Patches, SyncStreamProxy, _begin, get, in_call, wrap_async,
    wrap_sync,
)
from instrumentation_sdk.instrumentation._detect import provider_from_url

RAW_HEADER = "X-Stainless-Raw-Response"


def _provider(instance: Any) -> str:
    client = getattr(instance, "_client", None)
    name = type(client).__name__ if client is not None else ""
    if "Bedrock" in name:
        return "bedrock"
    if "Vertex" in name:
        return "vertex_ai"
    base_url = getattr(client, "base_url", None)
    found = provider_from_url(str(base_url)) if base_url is not None else "anthropic"
    return "anthropic" if found == "openai" else found  # a local/proxy URL speaking the Messages API


def _usage(span: AutoSpan, usage: Any, state: dict | None = None) -> None:
    if usage is None:
        return
    input_tokens = get(usage, "input_tokens")
    cache_read = get(usage, "cache_read_input_tokens")
    cache_write = get(usage, "cache_creation_input_tokens")
    output = get(usage, "output_tokens")
    if state is not None:  # streaming: message_start then cumulative message_delta values
        for key, value in (("input", input_tokens), ("cache_read", cache_read), ("cache_write", cache_write),
                           ("output", output)):
            if isinstance(value, int):
                state[key] = value
        return
    _apply(span, input_tokens, cache_read, cache_write, output)


def _apply(span: AutoSpan, input_tokens: Any, cache_read: Any, cache_write: Any, output: Any) -> None:
    # Anthropic's input_tokens exclude cached ones; the span's prompt_tokens count every input token.
    prompt = None
    if isinstance(input_tokens, int):
        prompt = input_tokens + (cache_read if isinstance(cache_read, int) else 0) \
            + (cache_write if isinstance(cache_write, int) else 0)
    span.set_usage_fields(prompt, output if isinstance(output, int) else None,
                          cache_read if isinstance(cache_read, int) else None, None)
    if isinstance(cache_write, int) and cache_write:
        span.metadata["cache_creation_input_tokens"] = cache_write


def _message_text(message: Any) -> str | None:
    parts = []
    for block in get(message, "content") or ():
        kind = get(block, "type")
        if kind == "text":
            parts.append(get(block, "text") or "")
        elif kind == "tool_use":
            parts.append(json.dumps({"name": get(block, "name"), "input": get(block, "input")}, default=str))
    return "".join(parts) or None


def _prompt_obj(kwargs: dict) -> Any:
    messages = kwargs.get("messages")
    system = kwargs.get("system")
    if not system:
        return messages
    return [{"role": "system", "content": system}] + list(messages or [])


class Messages(Adapter):
    operation = "anthropic.messages"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        span = AutoSpan(provider=_provider(instance), model=kwargs.get("model"), operation=self.operation,
                        prompt=kwargs.get("messages"), system=kwargs.get("system"),
                        stream=bool(kwargs.get("stream")), prompt_obj=_prompt_obj(kwargs))
        user = get(kwargs.get("metadata"), "user_id")
        if isinstance(user, str) and user:
            span.data["user_id"] = user
        return span

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        headers = kwargs.get("extra_headers") or {}
        return bool(kwargs.get("stream")) and not (isinstance(headers, dict) and headers.get(RAW_HEADER))

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        headers = kwargs.get("extra_headers") or {}
        if isinstance(headers, dict) and headers.get(RAW_HEADER):
            if headers.get(RAW_HEADER) != "true" or kwargs.get("stream"):
                return
            result = result.parse()
        span.set_actual_model(get(result, "model"))
        text = _message_text(result)
        if text is not None:
            span.data["response"] = text
        span.data["finish_reason"] = get(result, "stop_reason")
        _usage(span, get(result, "usage"))

    def on_chunk(self, span: AutoSpan, state: dict, item: Any) -> None:
        kind = get(item, "type")
        if kind == "content_block_delta":
            delta = get(item, "delta")
            dtype = get(delta, "type")
            if dtype == "text_delta":
                span.record_chunk(get(delta, "text") or "")
            elif dtype == "input_json_delta":
                span.record_chunk(get(delta, "partial_json") or "")
            elif dtype == "thinking_delta":
                span.record_chunk(None)
                state["thinking"] = True
        elif kind == "message_start":
            message = get(item, "message")
            state["model"] = get(message, "model")
            _usage(span, get(message, "usage"), state)
        elif kind == "message_delta":
            reason = get(get(item, "delta"), "stop_reason")
            if reason:
                state["finish_reason"] = reason
            _usage(span, get(item, "usage"), state)

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        span.set_actual_model(state.get("model"))
        if "input" in state or "output" in state:
            _apply(span, state.get("input"), state.get("cache_read"), state.get("cache_write"), state.get("output"))
        if state.get("finish_reason"):
            span.data["finish_reason"] = state["finish_reason"]


class _StreamManagerProxy:
    """messages.stream(...) returns a manager; the request happens when it is entered."""

    def __init__(self, manager: Any, adapter: Messages, instance: Any, kwargs: dict, is_async: bool) -> None:
        self._manager = manager
        self._adapter = adapter
        self._instance = instance
        self._kwargs = kwargs
        self._async = is_async

    def _wrap(self, message_stream: Any, span: AutoSpan) -> Any:
        raw = getattr(message_stream, "_raw_stream", None)
        if raw is None:
            span.end()
            return message_stream
        proxy_cls = AsyncStreamProxy if self._async else SyncStreamProxy
        message_stream._raw_stream = proxy_cls(raw, span, self._adapter)
        span.end()  # reported when the raw stream ends or is closed
        return message_stream

    def __enter__(self):
        span = _begin(self._adapter, self._instance, (), dict(self._kwargs, stream=True))
        if span is None:
            return self._manager.__enter__()
        with in_call(span):
            stream = self._manager.__enter__()
        return self._wrap(stream, span)

    def __exit__(self, *exc):
        return self._manager.__exit__(*exc)

    async def __aenter__(self):
        span = _begin(self._adapter, self._instance, (), dict(self._kwargs, stream=True))
        if span is None:
            return await self._manager.__aenter__()
        with in_call(span):
            stream = await self._manager.__aenter__()
        return self._wrap(stream, span)

    async def __aexit__(self, *exc):
        return await self._manager.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        manager = self.__dict__.get("_manager")
        if manager is None:
            raise AttributeError(name)
        return getattr(manager, name)


def _wrap_stream_helper(original, adapter: Messages, is_async: bool, bound_instance: Any = None):
    import functools

    from instrumentation_sdk._config import get_config

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        manager = original(*args, **kwargs)
        if _IN_CALL.get() or not get_config().enabled:
            return manager
        instance = bound_instance if bound_instance is not None else (args[0] if args else None)
        return _StreamManagerProxy(manager, adapter, instance, kwargs, is_async)

    wrapper.__llm_observe_original__ = original
    return wrapper


def instrument(patches: Patches) -> bool:
    try:
        from anthropic.resources.messages import messages as mod
    except ImportError:
        return False
    adapter = Messages()
    done = patches.patch(mod.Messages, "create", lambda f: wrap_sync(f, adapter))
    done |= patches.patch(mod.AsyncMessages, "create", lambda f: wrap_async(f, adapter))
    done |= patches.patch(mod.Messages, "stream", lambda f: _wrap_stream_helper(f, adapter, False))
    done |= patches.patch(mod.AsyncMessages, "stream", lambda f: _wrap_stream_helper(f, adapter, True))
    return done


def instrument_instance(client: Any, patches: Patches) -> bool:
    import inspect

    resource = getattr(client, "messages", None)
    if resource is None:
        return False
    adapter = Messages()
    for name in ("create", "stream"):
        func = getattr(type(resource), name, None)
        if func is None or name in resource.__dict__:
            continue
        original = getattr(func, "__llm_observe_original__", func)
        bound = original.__get__(resource, type(resource))
        if name == "stream":
            wrapper = _wrap_stream_helper(bound, adapter, "Async" in type(resource).__name__, resource)
        else:
            wrapper = (wrap_async if inspect.iscoroutinefunction(original) else wrap_sync)(bound, adapter, resource)
        patches.patch(resource, name, lambda _f, w=wrapper: w, force=True)
    return True
