"""litellm: completion / acompletion (plain and stream=True).

litellm calls the openai SDK for OpenAI-compatible providers; that inner call runs
inside this span (the in-call flag is set, and litellm copies the context into
its executor thread for acompletion), so it produces no second span.
"""

from __future__ import annotations

from typing import Any

from instrumentation_sdk.instrumentation._common import Adapter, AutoSpan, Patches, get, wrap_async, wrap_sync
from instrumentation_sdk.instrumentation._openai import ChatCompletions, _usage


def _model_and_messages(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    model = kwargs.get("model", args[0] if args else None)
    messages = kwargs.get("messages", args[1] if len(args) > 1 else None)
    return model, messages


def _provider(model: Any, kwargs: dict) -> tuple[str | None, str | None]:
    provider = kwargs.get("custom_llm_provider")
    bare = model
    try:
        import litellm

        bare, provider, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=provider,
                                                         api_base=kwargs.get("api_base") or kwargs.get("base_url"))
    except Exception:  # noqa: BLE001 - unknown model names: fall back to the prefix
        if isinstance(model, str) and "/" in model:
            provider, bare = model.split("/", 1)
    return provider, bare


class Completion(Adapter):
    operation = "litellm.completion"

    def begin(self, instance: Any, args: tuple, kwargs: dict) -> AutoSpan:
        model, messages = _model_and_messages(args, kwargs)
        provider, bare = _provider(model, kwargs)
        span = AutoSpan(provider=provider, model=bare if isinstance(bare, str) else model, operation=self.operation,
                        prompt=messages, stream=bool(kwargs.get("stream")))
        if isinstance(model, str) and bare != model:
            span.metadata["litellm_model"] = model
        if isinstance(kwargs.get("user"), str) and kwargs["user"]:
            span.data["user_id"] = kwargs["user"]
        fallbacks = kwargs.get("fallbacks")
        if isinstance(fallbacks, list) and fallbacks:
            span.data["attempted_models"] = [str(model)] + [str(f.get("model") if isinstance(f, dict) else f)
                                                              for f in fallbacks][:99]
        return span

    def is_stream(self, args: tuple, kwargs: dict, result: Any) -> bool:
        return bool(kwargs.get("stream"))

    def finish(self, span: AutoSpan, result: Any, kwargs: dict) -> None:
        ChatCompletions.finish(self, span, result, {})  # a ModelResponse has the OpenAI shape
        hidden = getattr(result, "_hidden_params", None) or {}
        cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
        if isinstance(cost, (int, float)):
            span.metadata["litellm_response_cost_usd"] = cost

    new_state = ChatCompletions.new_state
    on_chunk = ChatCompletions.on_chunk

    def end_stream(self, span: AutoSpan, state: dict) -> None:
        span.set_actual_model(state.get("model"))
        usage = state.get("usage")
        if usage is not None and (get(usage, "prompt_tokens") or get(usage, "completion_tokens")):
            _usage(span, usage)
        if state.get("finish_reason"):
            span.data["finish_reason"] = state["finish_reason"]


class ACompletion(Completion):
    operation = "litellm.acompletion"


def instrument(patches: Patches) -> bool:
    try:
        import litellm
    except ImportError:
        return False
    done = patches.patch(litellm, "completion", lambda f: _module_sync(f, Completion()))
    done |= patches.patch(litellm, "acompletion", lambda f: wrap_async(f, ACompletion(), bound_instance=litellm))
    return done


def _module_sync(original, adapter):
    # module functions have no `self`: the module stands in as the bound instance
    import litellm

    return wrap_sync(original, adapter, bound_instance=litellm)
