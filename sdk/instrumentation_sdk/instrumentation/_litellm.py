"""litellm: completion / acompletion (plain and stream=True).

litellm calls the openai SDK for OpenAI-compatible providers; that inner call runs
inside this span (the in-call flag is set, and litellm copies the context into
its executor thread for acompletion), so it produces no second span.

`from litellm import completion` done before init keeps litellm's own function, which
the module patch cannot reach. For those calls a litellm callback (CustomLogger) is
registered too: it records, from litellm's logging payload, every completion that
the patch did not (each patched call carries its litellm_call_id, so the callback
skips it). Such spans have no parent (litellm logs from its own thread) and their
timing is litellm's (start, first chunk, end).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from instrumentation_sdk._config import get_config
from instrumentation_sdk._spans import _perf
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
        # The same dict is what litellm receives: its callback will know this call was recorded.
        call_id = kwargs.get("litellm_call_id")
        if not isinstance(call_id, str) or not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        _patched_calls.add(call_id)
        return self.span(args, kwargs)

    def span(self, args: tuple, kwargs: dict) -> AutoSpan:
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
    if done:
        _register_callback(litellm, patches)
    return done


def _module_sync(original, adapter):
    # module functions have no `self`: the module stands in as the bound instance
    import litellm

    return wrap_sync(original, adapter, bound_instance=litellm)


# --- the callback: completions the module patch could not see -------------------------------


class _CallIds:
    """The litellm_call_ids of patched calls, until litellm's callback for them has run (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, call_id: str) -> None:
        with self._lock:
            self._ids[call_id] = None
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def __contains__(self, call_id: object) -> bool:
        with self._lock:
            return call_id in self._ids


_patched_calls = _CallIds()
_logger = None  # one per process, reused by every init: litellm keeps it in several of its lists


def _as_utc(moment: Any) -> datetime | None:
    if not isinstance(moment, datetime):
        return None
    return moment.astimezone(timezone.utc)  # litellm's are naive local times (datetime.now())


def _record(kwargs: dict, response: Any, start: Any, end: Any, error: BaseException | None) -> None:
    if not _logger.active or not get_config().enabled:
        return
    if kwargs.get("call_type") not in ("completion", "acompletion") or kwargs.get("litellm_call_id") in _patched_calls:
        return
    adapter = ACompletion() if kwargs.get("call_type") == "acompletion" else Completion()
    params = kwargs.get("litellm_params") or {}
    call = {"model": kwargs.get("model"), "messages": kwargs.get("messages"), "stream": kwargs.get("stream"),
            "user": kwargs.get("user"), "api_base": params.get("api_base"),
            "custom_llm_provider": kwargs.get("custom_llm_provider") or params.get("custom_llm_provider")}
    span = adapter.span((), call)
    span.metadata["recorded_by"] = "litellm_callback"
    span.start()
    started, ended, first = _as_utc(start), _as_utc(end), _as_utc(kwargs.get("completion_start_time"))
    if started is not None:
        span.data["timestamp_utc"] = started.timestamp()
        if ended is not None:
            span._t0 = _perf() - max(0.0, (ended - started).total_seconds())
            if call["stream"] and first is not None:
                span._first = span._t0 + max(0.0, (first - started).total_seconds())
    if error is None and response is not None:
        adapter.finish(span, response, {})
    span.end(error)


def _register_callback(litellm: Any, patches: Patches) -> None:
    global _logger
    try:
        from litellm.integrations.custom_logger import CustomLogger
    except ImportError:
        return
    if _logger is None:
        class LLMObserveCallback(CustomLogger):
            active = False

            def _safe(self, kwargs, response, start, end, error):
                try:
                    _record(kwargs, response, start, end, error)
                except Exception:  # noqa: BLE001 - never break the caller's litellm
                    import logging

                    logging.getLogger(__name__).debug("llm-observe: litellm callback failed", exc_info=True)

            def log_success_event(self, kwargs, response_obj, start_time, end_time):
                self._safe(kwargs, response_obj, start_time, end_time, None)

            async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
                self._safe(kwargs, response_obj, start_time, end_time, None)

            def log_failure_event(self, kwargs, response_obj, start_time, end_time):
                self._safe(kwargs, None, start_time, end_time, _failure(kwargs))

            async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
                self._safe(kwargs, None, start_time, end_time, _failure(kwargs))

        _logger = LLMObserveCallback()
    _logger.active = True
    if _logger not in litellm.callbacks:
        litellm.callbacks.append(_logger)

    def unregister() -> None:
        _logger.active = False  # litellm may have copied it into its other callback lists
        if _logger in litellm.callbacks:
            litellm.callbacks.remove(_logger)

    patches.on_restore(unregister)


def _failure(kwargs: dict) -> BaseException:
    error = kwargs.get("exception")
    return error if isinstance(error, BaseException) else RuntimeError(str(error or "litellm call failed"))
