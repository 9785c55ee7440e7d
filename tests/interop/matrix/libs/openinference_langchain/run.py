"""openinference-instrumentation-langchain + langchain-openai: prompt | model | StrOutputParser."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import OPENAI_URL, QUESTION, SERVICE, SYSTEM, call, otel_env  # noqa: E402

otel_env()  # OTEL_EXPORTER_OTLP_ENDPOINT / _HEADERS / _PROTOCOL, as in the shell

import openai  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from openinference.instrumentation.langchain import LangChainInstrumentor  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

tracer_provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
LangChainInstrumentor().instrument(tracer_provider=tracer_provider)

prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", "{question}")])


def chain(model):
    return prompt | ChatOpenAI(model=model, base_url=OPENAI_URL, api_key="sk-fake", max_retries=0) | StrOutputParser()


call("plain", lambda: chain("gpt-4o-mini").invoke({"question": QUESTION["plain"]}))
call("stream", lambda: "".join(chain("gpt-4o-mini").stream({"question": QUESTION["stream"]})))
call("error", lambda: chain("gpt-4o-mini-error-400").invoke({"question": QUESTION["error"]}),
     expect_error=openai.BadRequestError)
tracer_provider.shutdown()
