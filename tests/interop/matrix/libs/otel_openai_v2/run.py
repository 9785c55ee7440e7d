"""opentelemetry-instrumentation-openai-v2 + openai: spans to /v1/traces, prompt and response as logs to /v1/logs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import OPENAI_URL, SERVICE, openai_calls, otel_env  # noqa: E402

otel_env()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _PROTOCOL, as in the shell
import os  # noqa: E402

# per the instrumentation's docs: message content is only captured when asked for
os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")

import openai  # noqa: E402
from opentelemetry import _logs, trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor  # noqa: E402
from opentelemetry.sdk._logs import LoggerProvider  # noqa: E402
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

resource = Resource.create({"service.name": SERVICE})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(tracer_provider)
logger_provider = LoggerProvider(resource=resource)
logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
_logs.set_logger_provider(logger_provider)
OpenAIInstrumentor().instrument()

client = openai.OpenAI(base_url=OPENAI_URL, api_key="sk-fake", max_retries=0)

openai_calls(openai, client)
tracer_provider.shutdown()
logger_provider.shutdown()
