"""openinference-instrumentation-openai + openai: chat (plain, stream, error) and one embeddings call."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import OPENAI_URL, QUESTION, SERVICE, call, openai_calls, otel_env  # noqa: E402

otel_env()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _PROTOCOL, as in the shell

import openai  # noqa: E402
from openinference.instrumentation.openai import OpenAIInstrumentor  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

tracer_provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
OpenAIInstrumentor().instrument(tracer_provider=tracer_provider)

client = openai.OpenAI(base_url=OPENAI_URL, api_key="sk-fake", max_retries=0)

openai_calls(openai, client)
call("embedding", lambda: len(client.embeddings.create(model="text-embedding-3-small",
                                                       input=QUESTION["embedding"]).data[0].embedding))
tracer_provider.shutdown()
