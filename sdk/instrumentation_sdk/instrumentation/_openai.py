"""openai: chat.completions (create, parse, stream helper), responses (create, parse, stream helper) and
embeddings (create)."""

from __future__ import annotations

import json
from typing import Any

from instrumentation_sdk.instrumentation._common import Adapter, AutoSpan, Patches, get, wrap_async, wrap_sync
from instrumentation_sdk.instrumentation._detect import provider_from_url

RAW_HEADER = "X-Stainless-Raw-Response"


def _provider(instance: Any) -> str:
    client = getattr(instance, "_client", None)
    name = type(client).__name__ if client is not None else ""
    if "Azure" in name:
        return "azure"
    base_url = getattr(client, "base_url", None)
    return provider_from_url(str(base_url)) if base_url is not None else "openai"


def _user(span: AutoSpan, kwargs: dict) -> None:
    user = kwargs.get("user") or kwargs.get("safety_identifier")
    if isinstance(user, str) and user:
        span.data["user_id"] = user


def _raw_mode(kwargs: dict) -> str | None:
    headers = kwargs.get("extra_headers") or {}
    try:
        return headers.get(RAW_HEADER)
    except AttributeError:
        return None


def _unwrap_raw(result: Any, kwargs: dict) -> Any:
    """with_raw_response.create: the parsed object (cached by openai, so parsing twice is free)."""
    mode = _raw_mode(kwargs)
    if mode is None:
        return result
    if mode == "true" and not kwargs.get("stream") and callable(getattr(result, "parse", None)):
        return result.parse()
    return None  # streamed raw responses: reading them would consume the user's body


class _OpenAIAdapter(Adapter):
    """A raw-response call (with_raw_response / with_streaming_response) is read by finish, never as a stream."""

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        return bool(kwargs.get("stream")) and _raw_mode(kwargs) is None


class ChatCompletions(_OpenAIAdapter):
    operation = "openai.chat.completions"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        messages = kwargs.get("messages")
        span = AutoSpan(provider=_provider(instance), model=kwargs.get("model"), operation=self.operation,
                        prompt=messages, stream=bool(kwargs.get("stream")))
        _user(span, kwargs)
        return span

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        result = _unwrap_raw(result, kwargs)
        if result is None:
            return
        span.set_actual_model(get(result, "model"))
        choices = get(result, "choices") or []
        if choices:
            first = choices[0]
            message = get(first, "message")
            text = get(message, "content")
            tool_calls = get(message, "tool_calls")
            if not text and tool_calls:
                text = json.dumps([{"name": get(get(c, "function"), "name"),
                                    "arguments": get(get(c, "function"), "arguments")} for c in tool_calls])
            if isinstance(text, str):
                span.data["response"] = text
            span.data["finish_reason"] = get(first, "finish_reason")
        _usage(span, get(result, "usage"))

    def new_state(self) -> dict:
        return {"usage": None}

    def on_chunk(self, span: AutoSpan, state: dict, item: Any) -> None:
        if "model" not in state and get(item, "model"):
            state["model"] = get(item, "model")
        usage = get(item, "usage")
        if usage is not None:
            state["usage"] = usage
        choices = get(item, "choices") or []
        if not choices:
            return
        choice = choices[0]
        delta = get(choice, "delta")
        text = get(delta, "content")
        if text:
            span.record_chunk(text)
        else:
            for call in get(delta, "tool_calls") or ():
                args = get(get(call, "function"), "arguments")
                span.record_chunk(args or "")
        reason = get(choice, "finish_reason")
        if reason:
            state["finish_reason"] = reason

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        span.set_actual_model(state.get("model"))
        _usage(span, state.get("usage"))
        if state.get("finish_reason"):
            span.data["finish_reason"] = state["finish_reason"]


def _usage(span: AutoSpan, usage: Any) -> None:
    if usage is None:
        return
    prompt = get(usage, "prompt_tokens", get(usage, "input_tokens"))
    completion = get(usage, "completion_tokens", get(usage, "output_tokens"))
    prompt_details = get(usage, "prompt_tokens_details") or get(usage, "input_tokens_details")
    completion_details = get(usage, "completion_tokens_details") or get(usage, "output_tokens_details")
    span.set_usage_fields(prompt, completion, get(prompt_details, "cached_tokens"),
                          get(completion_details, "reasoning_tokens"))


def _response_text(response: Any) -> str | None:
    text = getattr(response, "output_text", None)
    if isinstance(text, str) and text:
        return text
    parts = []
    for item in get(response, "output") or ():
        kind = get(item, "type")
        if kind == "message":
            for content in get(item, "content") or ():
                if get(content, "type") == "output_text":
                    parts.append(get(content, "text") or "")
        elif kind == "function_call":
            parts.append(json.dumps({"name": get(item, "name"), "arguments": get(item, "arguments")}))
    return "".join(parts) or None


def _response_finish(response: Any) -> str | None:
    status = get(response, "status")
    if status == "completed":
        output = get(response, "output") or ()
        if any(get(item, "type") == "function_call" for item in output):
            return "tool_calls"
        return "stop"
    if status == "incomplete":
        reason = get(get(response, "incomplete_details"), "reason")
        return "content_filter" if reason == "content_filter" else "length"
    if status in ("failed",):
        return "error"
    if status in ("cancelled",):
        return "cancelled"
    return None


class Responses(_OpenAIAdapter):
    operation = "openai.responses"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        prompt = kwargs.get("input")
        span = AutoSpan(provider=_provider(instance), model=kwargs.get("model"), operation=self.operation,
                        prompt=prompt, system=kwargs.get("instructions"), stream=bool(kwargs.get("stream")),
                        prompt_obj=_count_input(prompt, kwargs.get("instructions")))
        _user(span, kwargs)
        return span

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        result = _unwrap_raw(result, kwargs)
        if result is None:
            return
        self._from_response(span, result)

    def _from_response(self, span: AutoSpan, response: Any) -> None:
        span.set_actual_model(get(response, "model"))
        text = _response_text(response)
        if text is not None:
            span.data["response"] = text
        reason = _response_finish(response)
        if reason:
            span.data["finish_reason"] = reason
        _usage(span, get(response, "usage"))
        error = get(response, "error")
        if error and get(response, "status") == "failed":
            span.data["status"] = "error"
            span.data["error_type"] = str(get(error, "code") or "response_failed")
            span.data["error_message"] = str(get(error, "message") or "")[:10_000]

    def on_chunk(self, span: AutoSpan, state: dict, item: Any) -> None:
        kind = get(item, "type")
        if kind in ("response.output_text.delta", "response.function_call_arguments.delta",
                    "response.refusal.delta"):
            span.record_chunk(get(item, "delta") or "")
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            state["final"] = get(item, "response")
        elif kind == "response.created":
            state["model"] = get(get(item, "response"), "model")
        elif kind == "error":
            state["error"] = item

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        span.set_actual_model(state.get("model"))
        final = state.get("final")
        if final is not None:
            streamed = span.data.pop("response", None)
            self._from_response(span, final)
            if "response" not in span.data and streamed:
                span.data["response"] = streamed
            if span.data.get("finish_reason"):
                state["finish_reason"] = span.data["finish_reason"]
        if state.get("error") is not None:
            span.data["status"] = "error"
            span.data["error_type"] = str(get(state["error"], "code") or "stream_error")
            span.data["error_message"] = str(get(state["error"], "message") or "")[:10_000]
            state["finish_reason"] = "error"


def _count_input(prompt: Any, instructions: Any) -> Any:
    """What count_tokens should see for a Responses input (string, or items as chat messages)."""
    if isinstance(prompt, str) and not instructions:
        return prompt
    messages = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, (list, tuple)):
        for item in prompt:
            if isinstance(item, dict) and "content" in item:
                messages.append({k: v for k, v in item.items() if k in ("role", "content", "name")})
    return messages or None


class Embeddings(_OpenAIAdapter):
    """embeddings.create: an EMBEDDING span priced on its input tokens (an embedding has no output)."""

    operation = "openai.embeddings"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        text = _embedding_text(kwargs.get("input"))
        span = AutoSpan(provider=_provider(instance), model=kwargs.get("model"), operation=self.operation,
                        prompt=text, prompt_obj=text, gen_ai_operation="embeddings")
        _user(span, kwargs)
        return span

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        return False

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        result = _unwrap_raw(result, kwargs)
        if result is None:
            return
        span.set_actual_model(get(result, "model"))
        prompt = get(get(result, "usage"), "prompt_tokens")
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            span.set_usage_fields(prompt, 0)


def _embedding_text(value: Any) -> str | None:
    """The text of an embeddings input: a string, or strings one a line; token-id inputs have none."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def instrument(patches: Patches) -> bool:
    try:
        from openai.resources.chat.completions import completions as chat_mod
    except ImportError:
        return False
    chat = ChatCompletions()
    done = False
    for name in ("create", "parse"):
        done |= patches.patch(chat_mod.Completions, name, lambda f: wrap_sync(f, chat))
        done |= patches.patch(chat_mod.AsyncCompletions, name, lambda f: wrap_async(f, chat))
    try:
        from openai.resources import embeddings as emb_mod
    except ImportError:
        pass
    else:
        embeddings = Embeddings()
        done |= patches.patch(emb_mod.Embeddings, "create", lambda f: wrap_sync(f, embeddings))
        done |= patches.patch(emb_mod.AsyncEmbeddings, "create", lambda f: wrap_async(f, embeddings))
    try:
        from openai.resources.responses import responses as resp_mod
    except ImportError:
        return done
    responses = Responses()
    for name in ("create", "parse"):
        done |= patches.patch(resp_mod.Responses, name, lambda f: wrap_sync(f, responses))
        done |= patches.patch(resp_mod.AsyncResponses, name, lambda f: wrap_async(f, responses))
    return done


def instrument_instance(client: Any, patches: Patches) -> bool:
    """Instance-level patching of one client (OpenAI, AsyncOpenAI, AzureOpenAI...)."""
    import inspect

    done = False
    targets = []
    chat = getattr(getattr(client, "chat", None), "completions", None)
    if chat is not None:
        targets.append((chat, ChatCompletions()))
    responses = getattr(client, "responses", None)
    if responses is not None:
        targets.append((responses, Responses()))
    embeddings = getattr(client, "embeddings", None)
    if embeddings is not None:
        targets.append((embeddings, Embeddings()))
    for resource, adapter in targets:
        for name in ("create", "parse"):
            func = getattr(type(resource), name, None)
            if func is None or name in resource.__dict__:
                continue
            original = getattr(func, "__llm_observe_original__", func)
            bound = original.__get__(resource, type(resource))
            wrapper = (wrap_async if inspect.iscoroutinefunction(original) else wrap_sync)(bound, adapter, resource)
            patches.patch(resource, name, lambda _f, w=wrapper: w, force=True)
            done = True
    return done
