"""pydantic-ai with its built-in OpenTelemetry instrumentation (no logfire): an agent with one tool call."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import OPENAI_URL, QUESTION, SERVICE, call, otel_env  # noqa: E402

otel_env()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _PROTOCOL, as in the shell

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402
from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.exceptions import ModelHTTPError  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402

tracer_provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(tracer_provider)
Agent.instrument_all()  # every agent reports to the global tracer provider (same as Agent(..., instrument=True))

provider = OpenAIProvider(base_url=OPENAI_URL, api_key="sk-fake")
agent = Agent(OpenAIChatModel("gpt-4o-mini-tools", provider=provider), name="weather_agent",
              instructions="You answer weather questions.")


@agent.tool_plain
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


async def streamed():
    async with agent.run_stream(QUESTION["stream"], model=OpenAIChatModel("gpt-4o-mini", provider=provider)) as run:
        return "".join([chunk async for chunk in run.stream_text(delta=True)])


import asyncio  # noqa: E402

call("plain", lambda: agent.run_sync(QUESTION["agent"]).output)
call("stream", lambda: asyncio.run(streamed()))
call("error", lambda: agent.run_sync(QUESTION["error"], model=OpenAIChatModel("gpt-4o-mini-error-400",
                                                                               provider=provider)),
     expect_error=ModelHTTPError)
tracer_provider.shutdown()
