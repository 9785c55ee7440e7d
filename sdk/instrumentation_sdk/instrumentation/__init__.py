"""Auto-instrumentation of installed LLM client libraries."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
import time
from typing import Any, Callable

from instrumentation_sdk.instrumentation import _anthropic, _langchain, _litellm, _openai
from instrumentation_sdk.instrumentation._common import Patches, inside_instrumented_call
from instrumentation_sdk.instrumentation._detect import detect_llm_call, provider_from_url

log = logging.getLogger("instrumentation_sdk")

_INTEGRATIONS = (("openai", "openai", _openai.instrument), ("anthropic", "anthropic", _anthropic.instrument),
                 ("litellm", "litellm", _litellm.instrument),
                 ("langchain", "langchain_core.language_models.chat_models", _langchain.instrument))
_lock = threading.RLock()
_patches = Patches()
_instance_patches = Patches()
_active: list[str] = []
_pending: dict[str, str] = {}  # integration -> module whose import will trigger it


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module's first import.

    init_auto_instrumentation() patches libraries that are already imported at once, and the
    others when the application imports them: importing litellm at start-up just to patch it
    would cost seconds (it even fetches a price list from the network) in an application that
    may never use it.
    """

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[], None]] = {}
        self._local = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        callback = self.callbacks.get(fullname)
        if callback is None or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = importlib.util.find_spec(fullname) if "." not in fullname else None
            if spec is None:
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._local.busy = False
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            try:
                original(module)
            finally:
                try:
                    del loader.exec_module  # back to the class's method
                except AttributeError:
                    pass
            if self.callbacks.pop(fullname, None) is not None:
                callback()

        loader.exec_module = exec_module  # this spec's loader instance only
        return spec


_hook = _PostImportHook()


def _install(name: str, install: Callable[[Patches], bool]) -> None:
    with _lock:
        _pending.pop(name, None)
        try:
            if install(_patches) and name not in _active:
                _active.append(name)
        except Exception:  # noqa: BLE001 - one odd library version must not stop the others
            log.exception("llm-observe: could not instrument %s", name)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def init_auto_instrumentation(libraries: list[str] | None = None) -> dict:
    """Patch the installed clients (openai, anthropic, litellm, LangChain). Idempotent.

    Libraries already imported are patched now, the others when they get imported.
    Returns {"success", "message", "instrumented", "pending"}.
    """
    with _lock:
        for name, module, install in _INTEGRATIONS:
            if libraries is not None and name not in libraries:
                continue
            if name in _active:
                continue
            if module in sys.modules:
                _install(name, install)
            elif name not in _pending and _installed(module):
                _pending[name] = module
                _hook.callbacks[module] = lambda name=name, install=install: _install(name, install)
        if _hook.callbacks and _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)
        active, pending = list(_active), sorted(_pending)
    parts = []
    if active:
        parts.append(f"instrumented: {', '.join(active)}")
    if pending:
        parts.append(f"on import: {', '.join(pending)}")
    message = "; ".join(parts) or "no supported LLM client library is installed"
    return {"success": True, "message": message, "instrumented": active, "pending": pending}


def uninstrument_all() -> dict:
    """Put every patched function back. Idempotent."""
    with _lock:
        restored = _patches.restore() + _instance_patches.restore()
        _active.clear()
        _pending.clear()
        _hook.callbacks.clear()
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
    return {"success": True, "message": f"restored {restored} patched functions", "restored": restored}


def instrumented_libraries() -> list[str]:
    return list(_active)


def instrument_client(client: Any, provider: str | None = None) -> Any:
    """Instrument one client object only (no global patching). Returns the client.

    provider: "openai" (also Azure / OpenAI-compatible clients) or "anthropic"; guessed when None.
    """
    kind = (provider or "").lower()
    if not kind:
        module = type(client).__module__.split(".")[0]
        kind = "anthropic" if module == "anthropic" else "openai" if module == "openai" else module
    with _lock:
        if kind in ("anthropic", "bedrock", "vertex_ai") and hasattr(client, "messages"):
            _anthropic.instrument_instance(client, _instance_patches)
        elif hasattr(client, "chat") or hasattr(client, "responses"):
            _openai.instrument_instance(client, _instance_patches)
        else:
            raise TypeError(f"instrument_client: do not know how to instrument {type(client).__name__} ({kind})")
    return client


_TEST_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "litellm": "gpt-4o-mini",
                "langchain": "gpt-4o-mini", "google": "gemini-2.0-flash", "mistral": "mistral-small-latest"}


def trigger_test_call(method: str = "chat.completions.create", provider: str = "openai") -> dict:
    """Report one synthetic span as if `method` of `provider` had been called, and flush it.

    No provider is contacted. Returns {"success", "message", "span_id"}: success means the
    appliance acknowledged the span (or, when it is unreachable, that it is safe in the WAL).
    """
    from instrumentation_sdk._reporter import SpanReporter, get_reporter
    from instrumentation_sdk._spans import StreamingSpan

    provider = (provider or "openai").lower()
    span = StreamingSpan(_TEST_MODELS.get(provider, "test-model"), activate=False)
    span.data.update(provider=provider, endpoint=method, prompt="llm-observe test call",
                     response="llm-observe test answer", finish_reason="stop")
    span.metadata.update(test_call=True, instrumentation=f"{provider}.{method}")
    span.start()
    span.record_chunk("llm-observe test answer")
    span.data["prompt_tokens"], span.data["token_count_method"] = 5, "tiktoken"
    span.end()
    span_id = span.span_id
    reporter = get_reporter()
    if not isinstance(reporter, SpanReporter):
        return {"success": True, "message": f"test span {span_id} handed to {type(reporter).__name__}",
                "span_id": span_id}
    if not reporter.config.has_destination:
        return {"success": False, "message": "no appliance URL configured (LLM_OBSERVE_URL or configure(url=...))",
                "span_id": span_id}
    before = dict(reporter.stats)
    # Handed over (accepted, or kept in the WAL) is the answer here: with the appliance down,
    # flush() would wait the whole timeout for a delivery that cannot happen.
    flushed = reporter._drain(time.monotonic() + 10)
    sent = reporter.stats["sent"] > before["sent"]
    if sent:
        message = f"test span {span_id} ({provider} {method}) accepted by {reporter.config.target}"
    elif flushed:
        message = f"test span {span_id} kept in the WAL: {reporter.config.target} did not accept it yet"
    else:
        message = f"test span {span_id} still queued"
    return {"success": sent or flushed, "message": message, "span_id": span_id}


__all__ = ["init_auto_instrumentation", "uninstrument_all", "instrument_client", "detect_llm_call",
           "trigger_test_call", "instrumented_libraries", "inside_instrumented_call", "provider_from_url"]
