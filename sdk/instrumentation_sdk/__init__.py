"""llm-observe client SDK: a drop-in for instrumentation-sdk 1.8.1 (see shared/seed-api.md).

    from instrumentation_sdk import configure, init_auto_instrumentation, llm_observe, llm_span
    configure(url="http://127.0.0.1:8000", api_key="llmo_...", service_name="billing")
    init_auto_instrumentation()   # openai / anthropic / litellm / LangChain calls become spans

Configuration by environment: LLM_OBSERVE_URL, LLM_OBSERVE_API_KEY, LLM_OBSERVE_SERVICE,
LLM_OBSERVE_ENVIRONMENT, LLM_OBSERVE_SAMPLING (percent), LLM_OBSERVE_WAL_PATH. With no URL
the SDK stays inert: spans are dropped after one warning, the application is unaffected.
The SDK imports nothing from the appliance.
"""

__version__ = "2.0.0.dev0"

from instrumentation_sdk._config import Config, configure, get_config  # noqa: E402
from instrumentation_sdk._embeddings import get_embedding, get_embedding_sync  # noqa: E402
from instrumentation_sdk._metrics import init_metrics_pipeline, metrics_snapshot, record_span_metrics  # noqa: E402
from instrumentation_sdk._reporter import SpanReporter, get_reporter, set_reporter  # noqa: E402
from instrumentation_sdk._spans import (  # noqa: E402
    LLMSpan, StreamingSpan, llm_observe, llm_span, llm_span_with_tokens, llm_streaming_span, wrap_async_stream,
    wrap_stream,
)
from instrumentation_sdk._tokens import count_tokens  # noqa: E402
from instrumentation_sdk.instrumentation import (  # noqa: E402
    detect_llm_call, init_auto_instrumentation, instrument_client, trigger_test_call, uninstrument_all,
)
from instrumentation_sdk.sampling import should_sample  # noqa: E402
from instrumentation_sdk.scanning import scan_prompt  # noqa: E402

__all__ = [
    "init_auto_instrumentation", "uninstrument_all", "instrument_client", "detect_llm_call", "trigger_test_call",
    "llm_observe", "llm_span", "llm_span_with_tokens", "llm_streaming_span", "wrap_stream", "wrap_async_stream",
    "get_reporter", "set_reporter", "SpanReporter", "count_tokens", "scan_prompt", "should_sample",
    "get_embedding", "get_embedding_sync", "init_metrics_pipeline", "record_span_metrics", "metrics_snapshot",
    "configure", "get_config", "Config", "LLMSpan", "StreamingSpan", "__version__",
]
