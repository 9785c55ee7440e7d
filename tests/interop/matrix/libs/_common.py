"""Shared by every library script (run with that library's own venv python, so nothing from the appliance).

Environment (set by the matrix test or the capture run): APPLIANCE_URL, API_KEY, FAKE_OPENAI_URL (ends in /v1),
FAKE_ANTHROPIC_URL, SERVICE_NAME. Each script prints one JSON line per call, {"call": label, ...}, in order.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

APPLIANCE_URL = os.environ["APPLIANCE_URL"].rstrip("/")
API_KEY = os.environ["API_KEY"]
OPENAI_URL = os.environ.get("FAKE_OPENAI_URL", "")
ANTHROPIC_URL = os.environ.get("FAKE_ANTHROPIC_URL", "")
SERVICE = os.environ.get("SERVICE_NAME", "interop-matrix")

SYSTEM = "You are a terse assistant."
QUESTION = {"plain": "Say hello (plain call)", "stream": "Say hello (streamed call)",
            "error": "Say hello (failing call)", "embedding": "Embed this sentence",
            "agent": "What is the weather in Paris?"}


def otel_env() -> None:
    """The standard OpenTelemetry exporter variables, as a user would export them in the shell."""
    os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", APPLIANCE_URL)
    os.environ.setdefault("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{API_KEY}")
    os.environ.setdefault("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    os.environ.setdefault("OTEL_SERVICE_NAME", SERVICE)


def call(label: str, fn, *, expect_error: type | tuple = ()) -> None:
    """Run one provider call; print what happened as one JSON line."""
    out: dict = {"call": label}
    try:
        result = fn()
        out["ok"] = True
        if result is not None:
            out["result"] = str(result)[:200]
    except expect_error as exc:  # the 400 we asked for
        out.update(ok=False, error=type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - reported, then the script fails
        traceback.print_exc()
        out.update(ok=False, error=type(exc).__name__, unexpected=True)
    print(json.dumps(out), flush=True)
    if out.get("unexpected"):
        sys.exit(3)


def openai_calls(openai, client, *, prefix: str = "", model: str = "gpt-4o-mini") -> None:
    """plain, stream (no include_usage: tokens must be estimated), error (a 400)."""
    def messages(label):
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION[label]}]

    call(prefix + "plain", lambda: client.chat.completions.create(model=model, messages=messages("plain"))
         .choices[0].message.content)
    call(prefix + "stream", lambda: "".join(
        chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=messages("stream"), stream=True) if chunk.choices))
    call(prefix + "error", lambda: client.chat.completions.create(model=f"{model}-error-400",
                                                                  messages=messages("error")),
         expect_error=openai.BadRequestError)


def anthropic_calls(anthropic, client, *, prefix: str = "", model: str = "claude-haiku-4-5") -> None:
    def create(label, **kwargs):
        return client.messages.create(model=kwargs.pop("model", model), max_tokens=256, system=SYSTEM,
                                      messages=[{"role": "user", "content": QUESTION[label]}], **kwargs)

    call(prefix + "plain", lambda: create("plain").content[0].text)
    call(prefix + "stream", lambda: "".join(
        event.delta.text for event in create("stream", stream=True)
        if event.type == "content_block_delta" and getattr(event.delta, "text", None)))
    call(prefix + "error", lambda: create("error", model=f"{model}-error-400"),
         expect_error=anthropic.BadRequestError)
