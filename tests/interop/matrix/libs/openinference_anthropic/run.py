"""openinference-instrumentation-anthropic + anthropic (plain, stream, error)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ANTHROPIC_URL, SERVICE, anthropic_calls, otel_env  # noqa: E402

otel_env()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _PROTOCOL, as in the shell

import anthropic  # noqa: E402
from openinference.instrumentation.anthropic import AnthropicInstrumentor  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

tracer_provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(tracer_provider)  # the anthropic SDK's own spans go to the global provider
AnthropicInstrumentor().instrument(tracer_provider=tracer_provider)

anthropic_calls(anthropic, anthropic.Anthropic(base_url=ANTHROPIC_URL, api_key="sk-ant-fake", max_retries=0))
tracer_provider.shutdown()
