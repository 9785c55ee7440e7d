"""Auto-instrumentation of the real openai, anthropic, litellm and LangChain clients against the fake provider."""

from __future__ import annotations

import asyncio
import time

import anthropic
import litellm
import openai
import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_openai import ChatOpenAI

import instrumentation_sdk as sdk
from instrumentation_sdk import detect_llm_call, init_auto_instrumentation, instrument_client, llm_observe, uninstrument_all
from tests.fakeprovider import ANSWER, USAGE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # litellm's pydantic models, at first use
USER = [{"role": "user", "content": "Say hello to the tester"}]
PROVIDER_USAGE = {"prompt_tokens": USAGE["prompt"], "completion_tokens": USAGE["completion"],
                  "cached_tokens": USAGE["cached"], "token_count_method": "provider"}


@pytest.fixture
def traced(memory):
    result = init_auto_instrumentation()
    assert set(result["instrumented"]) == {"openai", "anthropic", "litellm", "langchain"}
    yield memory
    uninstrument_all()


@pytest.fixture
def oai(fake):
    return openai.OpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def aoai(fake):
    return openai.AsyncOpenAI(base_url=fake.openai_url, api_key="sk-test", max_retries=0)


@pytest.fixture
def claude(fake):
    return anthropic.Anthropic(base_url=fake.anthropic_url, api_key="sk-ant-test", max_retries=0)


@pytest.fixture
def aclaude(fake):
    return anthropic.AsyncAnthropic(base_url=fake.anthropic_url, api_key="sk-ant-test", max_retries=0)


def one_span(memory, fake, requests_before):
    assert len(fake.requests) == requests_before + 1, "the provider was called once"
    assert len(memory.spans) == 1, [s.get("endpoint") for s in memory.spans]
    return memory.spans[0]


# --- openai ---------------------------------------------------------------------------------


def test_openai_chat(traced, fake, oai):
    before = len(fake.requests)
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=USER, user="u-7")
    assert reply.choices[0].message.content == ANSWER
    span = one_span(traced, fake, before)
    assert span["user_id"] == "u-7"
    assert span["provider"] == "openai" and span["model"] == "gpt-4o-mini"
    assert span["endpoint"] == "openai.chat.completions" and span["status"] == "success"
    assert span["prompt"] == "Say hello to the tester" and span["response"] == ANSWER
    assert {k: span[k] for k in PROVIDER_USAGE} == PROVIDER_USAGE
    assert span["reasoning_tokens"] == USAGE["reasoning"] and span["finish_reason"] == "stop"
    assert span["metadata"]["actual_model"] == "gpt-4o-mini-2024-fake"
    assert span["latency_ms_total"] > 0


def test_openai_stream_with_usage(traced, fake, oai):
    before = len(fake.requests)
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True,
                                         stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ANSWER
    span = one_span(traced, fake, before)
    assert span["response"] == ANSWER and {k: span[k] for k in PROVIDER_USAGE} == PROVIDER_USAGE
    assert 25 <= span["latency_ms_ttft"] <= span["latency_ms_total"]
    assert span["finish_reason"] == "stop" and span["metadata"]["stream"] is True


def test_openai_stream_without_usage_is_counted_locally(traced, fake, oai):
    with oai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True) as stream:
        for _ in stream:
            pass
    (span,) = traced.spans
    assert span["token_count_method"] == "tiktoken"
    assert span["completion_tokens"] == sdk.count_tokens(ANSWER, "gpt-4o-mini")[0]
    assert span["prompt_tokens"] == sdk.count_tokens(USER, "gpt-4o-mini")[0]


def test_openai_stream_closed_early(traced, fake, oai):
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    (span,) = traced.spans
    assert span["finish_reason"] == "client_disconnect"
    assert span["response"] and ANSWER.startswith(span["response"]) and span["response"] != ANSWER


def test_openai_stream_helper_and_raw_response(traced, fake, oai):
    before = len(fake.requests)
    with oai.chat.completions.stream(model="gpt-4o-mini", messages=USER) as stream:
        for _ in stream:
            pass
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    assert raw.parse().choices[0].message.content == ANSWER
    assert len(fake.requests) == before + 2 and len(traced.spans) == 2
    helper, raw_span = traced.spans
    assert helper["response"] == ANSWER and helper["latency_ms_ttft"] > 0
    assert raw_span["completion_tokens"] == USAGE["completion"] and raw_span["response"] == ANSWER


def test_openai_tool_calls(traced, oai):
    oai.chat.completions.create(model="gpt-4o-tools", messages=USER)
    assert traced.spans[0]["finish_reason"] == "tool_calls" and "get_weather" in traced.spans[0]["response"]


@pytest.mark.parametrize("model,error,status", [("error-429", openai.RateLimitError, 429),
                                                ("error-500", openai.InternalServerError, 500)])
def test_openai_errors(traced, oai, model, error, status):
    with pytest.raises(error):
        oai.chat.completions.create(model=model, messages=USER)
    (span,) = traced.spans
    assert span["status"] == "error" and span["error_type"] == error.__name__
    assert span["metadata"]["http_status"] == status and span["finish_reason"] == "error"


def test_openai_async_and_async_stream(traced, fake, aoai):
    async def main():
        reply = await aoai.chat.completions.create(model="gpt-4o-mini", messages=USER)
        stream = await aoai.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True,
                                                    stream_options={"include_usage": True})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return reply, text

    before = len(fake.requests)
    reply, text = asyncio.run(main())
    assert reply.choices[0].message.content == ANSWER == text
    assert len(fake.requests) == before + 2 and len(traced.spans) == 2
    plain, streamed = traced.spans
    assert plain["completion_tokens"] == streamed["completion_tokens"] == USAGE["completion"]
    assert streamed["latency_ms_ttft"] >= 25


def test_openai_async_cancellation_stays_cancelled_error(traced, aoai):
    async def main():
        task = asyncio.create_task(aoai.chat.completions.create(model="gpt-4o-slow", messages=USER))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    (span,) = traced.spans
    assert span["finish_reason"] == "cancelled" and span["error_type"] == "CancelledError"


def test_openai_responses(traced, fake, oai, aoai):
    before = len(fake.requests)
    reply = oai.responses.create(model="gpt-4.1-mini", input="Say hello", instructions="Be brief")
    assert reply.output_text == ANSWER
    for _ in oai.responses.create(model="gpt-4.1-mini", input="Say hello", stream=True):
        pass

    async def main():
        return await aoai.responses.create(model="gpt-4.1-mini", input=[{"role": "user", "content": "Say hello"}])

    asyncio.run(main())
    assert len(fake.requests) == before + 3 and len(traced.spans) == 3
    for span in traced.spans:
        assert span["endpoint"] == "openai.responses" and span["response"] == ANSWER
        assert {k: span[k] for k in PROVIDER_USAGE} == PROVIDER_USAGE and span["reasoning_tokens"] == USAGE["reasoning"]
        assert span["finish_reason"] == "stop"
    assert traced.spans[0]["prompt"] == "system: Be brief\nuser: Say hello"
    assert traced.spans[1]["latency_ms_ttft"] >= 25


# --- anthropic ------------------------------------------------------------------------------


ANTHROPIC_USAGE = {"prompt_tokens": USAGE["prompt"], "completion_tokens": USAGE["completion"],
                   "cached_tokens": USAGE["cached"], "token_count_method": "provider"}


def test_anthropic_messages(traced, fake, claude):
    before = len(fake.requests)
    message = claude.messages.create(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER,
                                     system="You are terse.")
    assert message.content[0].text == ANSWER
    span = one_span(traced, fake, before)
    assert span["provider"] == "anthropic" and span["endpoint"] == "anthropic.messages"
    assert span["prompt"] == "system: You are terse.\nuser: Say hello to the tester"
    assert {k: span[k] for k in ANTHROPIC_USAGE} == ANTHROPIC_USAGE  # input + cache reads = prompt tokens
    assert span["finish_reason"] == "end_turn"  # normalised to "stop" by the reporter
    assert span["response"] == ANSWER


def test_anthropic_streams(traced, fake, claude):
    before = len(fake.requests)
    for _ in claude.messages.create(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER, stream=True):
        pass
    with claude.messages.stream(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER) as stream:
        assert stream.get_final_text() == ANSWER
    assert len(fake.requests) == before + 2 and len(traced.spans) == 2
    for span in traced.spans:
        assert span["response"] == ANSWER and {k: span[k] for k in ANTHROPIC_USAGE} == ANTHROPIC_USAGE
        assert span["latency_ms_ttft"] >= 25 and span["finish_reason"] == "end_turn"


def test_anthropic_async(traced, fake, aclaude):
    async def main():
        await aclaude.messages.create(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER)
        async with aclaude.messages.stream(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER) as s:
            async for _ in s.text_stream:
                pass
        stream = await aclaude.messages.create(model="claude-3-5-haiku-latest", max_tokens=100, messages=USER,
                                               stream=True)
        async for _ in stream:
            pass

    before = len(fake.requests)
    asyncio.run(main())
    assert len(fake.requests) == before + 3 and len(traced.spans) == 3
    assert all(s["completion_tokens"] == USAGE["completion"] for s in traced.spans)


def test_anthropic_errors(traced, claude):
    with pytest.raises(anthropic.RateLimitError):
        claude.messages.create(model="claude-error-429", max_tokens=10, messages=USER)
    with pytest.raises(anthropic.APIStatusError):
        for _ in claude.messages.create(model="claude-midstream-error", max_tokens=10, messages=USER, stream=True):
            pass
    limited, broken = traced.spans
    assert limited["error_type"] == "RateLimitError" and limited["metadata"]["http_status"] == 429
    assert broken["status"] == "error" and broken["response"]  # what arrived before the error


# --- litellm --------------------------------------------------------------------------------


def test_litellm_one_span_per_call(traced, fake):
    kw = dict(model="openai/gpt-4o-mini", messages=USER, api_base=fake.openai_url, api_key="sk-test")
    before = len(fake.requests)
    reply = litellm.completion(**kw)
    assert reply.choices[0].message.content == ANSWER
    chunks = list(litellm.completion(**kw, stream=True))
    assert chunks

    async def main():
        await litellm.acompletion(**kw)
        stream = await litellm.acompletion(**kw, stream=True)
        async for _ in stream:
            pass

    asyncio.run(main())
    assert len(fake.requests) == before + 4
    assert [s["endpoint"] for s in traced.spans] == ["litellm.completion", "litellm.completion",
                                                     "litellm.acompletion", "litellm.acompletion"]
    plain, streamed, aplain, astreamed = traced.spans
    for span in traced.spans:
        assert span["provider"] == "openai" and span["model"] == "gpt-4o-mini"
        assert span["response"] == ANSWER and span["status"] == "success"
    assert plain["cached_tokens"] == USAGE["cached"] and plain["reasoning_tokens"] == USAGE["reasoning"]
    assert streamed["latency_ms_ttft"] > 0 and astreamed["latency_ms_ttft"] > 0
    assert streamed["completion_tokens"] > 0 and astreamed["completion_tokens"] > 0


def test_litellm_anthropic_route(traced, fake):
    reply = litellm.completion(model="anthropic/claude-3-5-haiku-latest", messages=USER, api_base=fake.url,
                               api_key="sk-ant-test", max_tokens=50)
    assert reply.choices[0].message.content == ANSWER
    (span,) = traced.spans
    assert span["provider"] == "anthropic" and span["completion_tokens"] == USAGE["completion"]


def test_litellm_error(traced, fake):
    with pytest.raises(Exception) as caught:
        litellm.completion(model="openai/error-429", messages=USER, api_base=fake.openai_url, api_key="x",
                           num_retries=0, max_retries=0)
    (span,) = traced.spans
    assert span["status"] == "error" and span["error_type"] == type(caught.value).__name__


# --- LangChain ------------------------------------------------------------------------------


def test_langchain_one_span_per_call(traced, fake):
    chat = ChatOpenAI(base_url=fake.openai_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0)
    before = len(fake.requests)
    assert chat.invoke("Say hello").content == ANSWER
    assert "".join(c.content for c in chat.stream("Say hello")) == ANSWER

    async def main():
        await chat.ainvoke("Say hello")
        async for _ in chat.astream("Say hello"):
            pass

    asyncio.run(main())
    assert len(fake.requests) == before + 4
    assert [s["endpoint"] for s in traced.spans] == ["langchain.invoke", "langchain.stream", "langchain.ainvoke",
                                                     "langchain.astream"]
    invoke, stream, ainvoke, astream = traced.spans
    assert invoke["provider"] == "openai" and invoke["model"] == "gpt-4o-mini"
    assert {k: invoke[k] for k in PROVIDER_USAGE} == PROVIDER_USAGE and invoke["reasoning_tokens"] == USAGE["reasoning"]
    assert invoke["prompt"] == "Say hello" and invoke["response"] == ANSWER
    assert stream["response"] == ANSWER and stream["latency_ms_ttft"] > 0 and stream["completion_tokens"] > 0
    assert stream["finish_reason"] == "stop"


# --- general --------------------------------------------------------------------------------


def test_spans_nest_under_the_callers_span(traced, oai):
    @llm_observe(service="bot", endpoint="answer")
    def answer():
        return oai.chat.completions.create(model="gpt-4o-mini", messages=USER)

    answer()
    call, outer = traced.spans
    assert call["parent_span_id"] == outer["span_id"] and call["trace_id"] == outer["trace_id"]


def test_idempotent_and_uninstrument_restores(memory, fake, oai):
    from openai.resources.chat.completions.completions import Completions

    original = Completions.create
    original_lc = BaseChatModel.invoke
    original_litellm = litellm.completion
    init_auto_instrumentation()
    init_auto_instrumentation()
    assert Completions.create is not original
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert len(memory.spans) == 1  # patched twice would mean two spans
    uninstrument_all()
    uninstrument_all()
    assert Completions.create is original and BaseChatModel.invoke is original_lc
    assert litellm.completion is original_litellm
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert len(memory.spans) == 1


def test_instrument_client_only_that_client(memory, fake):
    traced_client = instrument_client(openai.OpenAI(base_url=fake.openai_url, api_key="x", max_retries=0), "openai")
    plain = openai.OpenAI(base_url=fake.openai_url, api_key="x", max_retries=0)
    traced_client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    plain.chat.completions.create(model="gpt-4o-mini", messages=USER)
    claude = instrument_client(anthropic.Anthropic(base_url=fake.anthropic_url, api_key="x", max_retries=0))
    claude.messages.create(model="claude-3-5-haiku-latest", max_tokens=10, messages=USER)
    assert [s["provider"] for s in memory.spans] == ["openai", "anthropic"]
    uninstrument_all()
    traced_client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert len(memory.spans) == 2


@pytest.mark.parametrize("url,body,expected", [
    ("https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}, {"provider": "openai", "model": "gpt-4o"}),
    ("https://api.anthropic.com/v1/messages", b'{"model": "claude-3-5-sonnet"}', {"provider": "anthropic", "model": "claude-3-5-sonnet"}),
    ("https://generativelanguage.googleapis.com/v1beta/models/gemini-1.5-pro:generateContent", None,
     {"provider": "google", "model": "gemini-1.5-pro"}),
    ("https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku/invoke", "{}",
     {"provider": "bedrock", "model": "anthropic.claude-3-haiku"}),
    ("https://acme.openai.azure.com/openai/deployments/prod-gpt4o/chat/completions?api-version=1", {},
     {"provider": "azure", "model": "prod-gpt4o"}),
    ("http://localhost:11434/api/chat", {"model": "llama3"}, {"provider": "ollama", "model": "llama3"}),
    ("http://10.1.2.3:8000/v1/chat/completions", {"model": "my-vllm"}, {"provider": "openai", "model": "my-vllm"}),
    ("https://example.com/index.html", "not json", {"provider": "unknown", "model": None}),
])
def test_detect_llm_call(url, body, expected):
    assert detect_llm_call(url, body) == expected


def test_libraries_imported_later_are_patched_on_import(fake, tmp_path):
    """init before the import (the usual order): nothing heavy is imported at init, the patch lands at import."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import sys
        import instrumentation_sdk as sdk
        spans = []
        class Mem:
            def report(self, span):
                spans.append(span)
        sdk.set_reporter(Mem())
        result = sdk.init_auto_instrumentation()
        assert result["instrumented"] == [], result
        assert set(result["pending"]) == {{"openai", "anthropic", "litellm", "langchain"}}, result
        assert "openai" not in sys.modules and "litellm" not in sys.modules
        import openai
        client = openai.OpenAI(base_url="{fake.openai_url}", api_key="x", max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
        assert len(spans) == 1 and spans[0]["endpoint"] == "openai.chat.completions", spans
        assert sdk.instrumentation.instrumented_libraries() == ["openai"]
        sdk.uninstrument_all()
        assert not any(type(f).__name__ == "_PostImportHook" for f in sys.meta_path)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_litellm_bound_before_init_is_recorded_by_its_callback(memory, fake):
    """`from litellm import completion` before init keeps litellm's own function, which the module
    patch cannot reach: litellm's callback records those calls, and only those."""
    early, aearly = litellm.completion, litellm.acompletion
    assert set(init_auto_instrumentation()["instrumented"]) >= {"litellm"}
    kw = dict(model="openai/gpt-4o-mini", messages=USER, api_base=fake.openai_url, api_key="sk-test")
    try:
        assert litellm.completion is not early
        assert early(**kw, user="u-7").choices[0].message.content == ANSWER
        assert "".join(c.choices[0].delta.content or "" for c in early(**kw, stream=True)) == ANSWER
        early(model="anthropic/claude-3-5-haiku-latest", messages=USER, api_base=fake.url, api_key="x", max_tokens=20)
        with pytest.raises(Exception):
            early(model="openai/error-429", messages=USER, api_base=fake.openai_url, api_key="x", num_retries=0,
                  max_retries=0)
        litellm.completion(**kw)  # the patched function: recorded once, by the patch

        async def main():
            await aearly(**kw)
            stream = await aearly(**kw, stream=True)
            async for _ in stream:
                pass
            await asyncio.sleep(0.2)  # litellm logs async successes in a task

        asyncio.run(main())
        wait_for(lambda: len(memory.spans) >= 7)  # sync callbacks run in litellm's logging thread
    finally:
        uninstrument_all()
    spans = memory.spans
    assert len(spans) == 7, [(s["endpoint"], s.get("metadata")) for s in spans]
    by_callback = [s for s in spans if s.get("metadata", {}).get("recorded_by") == "litellm_callback"]
    assert len(by_callback) == 6
    plain = next(s for s in by_callback if s.get("user_id") == "u-7")
    assert plain["endpoint"] == "litellm.completion" and plain["provider"] == "openai"
    assert plain["model"] == "gpt-4o-mini" and plain["response"] == ANSWER and plain["prompt"] == USER[0]["content"]
    assert plain["prompt_tokens"] == USAGE["prompt"] and plain["latency_ms_total"] > 0
    streamed = [s for s in by_callback if s.get("metadata", {}).get("stream")]
    assert len(streamed) == 2 and all(s["response"] == ANSWER and s["latency_ms_ttft"] > 0 for s in streamed)
    assert {s["endpoint"] for s in streamed} == {"litellm.completion", "litellm.acompletion"}
    assert any(s["provider"] == "anthropic" for s in by_callback)
    (failed,) = [s for s in by_callback if s["status"] == "error"]
    assert failed["error_type"] == "RateLimitError"
    # After uninstrument_all() the callback records nothing more.
    early(**kw)
    time.sleep(0.5)
    assert len(memory.spans) == 7


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
