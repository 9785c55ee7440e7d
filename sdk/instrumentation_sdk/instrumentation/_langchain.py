"""LangChain: BaseChatModel.invoke / ainvoke / stream / astream, for every chat model class.

ChatOpenAI and friends call the provider SDK inside; those inner calls run with
the in-call flag set and produce no span of their own.
"""

from __future__ import annotations

from typing import Any

from instrumentation_sdk.instrumentation._common import (
    Adapter, AutoSpan, Patches, content_text, get, wrap_async, wrap_async_generator, wrap_generator, wrap_sync,
)

_PROVIDERS = {"openai": "openai", "azure": "azure", "anthropic": "anthropic", "google_genai": "google",
              "google_vertexai": "vertex_ai", "bedrock": "bedrock", "amazon_bedrock": "bedrock"}


def _messages(model: Any, value: Any) -> list:
    try:
        return model._convert_input(value).to_messages()
    except Exception:  # noqa: BLE001
        return []


def _as_dicts(messages: list) -> list[dict]:
    role_map = {"human": "user", "ai": "assistant"}
    out = []
    for m in messages:
        role = getattr(m, "type", "user")
        out.append({"role": role_map.get(role, role), "content": getattr(m, "content", "")})
    return out


class ChatModel(Adapter):
    operation = "langchain.invoke"

    def __init__(self, operation: str, stream: bool = False) -> None:
        self.operation = operation
        self.stream = stream

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        value = args[0] if args else kwargs.get("input")
        params: dict = {}
        try:
            params = instance._get_ls_params(**{k: v for k, v in kwargs.items() if k in ("model", "stop")}) or {}
        except Exception:  # noqa: BLE001
            params = {}
        provider = params.get("ls_provider")
        model = params.get("ls_model_name") or getattr(instance, "model_name", None) or getattr(instance, "model", None)
        messages = _messages(instance, value)
        dicts = _as_dicts(messages)
        span = AutoSpan(provider=_PROVIDERS.get(provider, provider), model=model if isinstance(model, str) else None,
                        operation=self.operation, prompt=dicts, stream=self.stream)
        span.metadata["langchain_class"] = type(instance).__name__
        return span

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        return False

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        text = content_text(get(result, "content"))
        if text:
            span.data["response"] = text
        elif get(result, "tool_calls"):
            span.data["response"] = str([get(c, "name") for c in get(result, "tool_calls")])
        meta = get(result, "response_metadata") or {}
        reason = meta.get("finish_reason") or meta.get("stop_reason")
        if reason:
            span.data["finish_reason"] = reason
        span.set_actual_model(meta.get("model_name") or meta.get("model"))
        self._usage(span, get(result, "usage_metadata"))

    @staticmethod
    def _usage(span: AutoSpan, usage: Any, total: dict | None = None) -> None:
        if not usage:
            return
        inp = get(usage, "input_tokens")
        out = get(usage, "output_tokens")
        cached = get(get(usage, "input_token_details") or {}, "cache_read")
        reasoning = get(get(usage, "output_token_details") or {}, "reasoning")
        if total is not None:  # chunks carry parts of the usage; LangChain adds them up the same way
            for key, value in (("input", inp), ("output", out), ("cached", cached), ("reasoning", reasoning)):
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
            return
        span.set_usage_fields(inp, out, cached, reasoning)

    def new_state(self) -> dict:
        return {"usage": {}}

    def on_chunk(self, span: AutoSpan, state: dict, item: Any) -> None:
        text = content_text(get(item, "content"))
        if text:
            span.record_chunk(text)
        elif get(item, "tool_call_chunks"):
            span.record_chunk("".join(get(c, "args") or "" for c in get(item, "tool_call_chunks")))
        meta = get(item, "response_metadata") or {}
        reason = meta.get("finish_reason") or meta.get("stop_reason")
        if reason:
            state["finish_reason"] = reason
        if meta.get("model_name") or meta.get("model"):
            state["model"] = meta.get("model_name") or meta.get("model")
        self._usage(span, get(item, "usage_metadata"), state["usage"])

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        span.set_actual_model(state.get("model"))
        total = state.get("usage") or {}
        if total:
            span.set_usage_fields(total.get("input"), total.get("output"), total.get("cached"),
                                  total.get("reasoning"))
        if state.get("finish_reason"):
            span.data["finish_reason"] = state["finish_reason"]


def instrument(patches: Patches) -> bool:
    try:
        from langchain_core.language_models.chat_models import BaseChatModel
    except ImportError:
        return False
    done = patches.patch(BaseChatModel, "invoke", lambda f: wrap_sync(f, ChatModel("langchain.invoke")))
    done |= patches.patch(BaseChatModel, "ainvoke", lambda f: wrap_async(f, ChatModel("langchain.ainvoke")))
    done |= patches.patch(BaseChatModel, "stream", lambda f: wrap_generator(f, ChatModel("langchain.stream", True)))
    done |= patches.patch(BaseChatModel, "astream",
                          lambda f: wrap_async_generator(f, ChatModel("langchain.astream", True)))
    return done
