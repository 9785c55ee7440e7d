"""traceloop-sdk (OpenLLMetry) with openai and anthropic."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ANTHROPIC_URL, API_KEY, APPLIANCE_URL, OPENAI_URL, SERVICE, anthropic_calls, openai_calls  # noqa: E402

import anthropic  # noqa: E402
import openai  # noqa: E402
from traceloop.sdk import Traceloop  # noqa: E402

# per Traceloop's docs for any OTLP backend: the base URL (the SDK appends /v1/traces) and the headers. Batched
# export, Traceloop's default (what users run): the spans of a call arrive in one request.
Traceloop.init(app_name=SERVICE, api_endpoint=APPLIANCE_URL, headers={"Authorization": f"Bearer {API_KEY}"},
               telemetry_enabled=False)

openai_calls(openai, openai.OpenAI(base_url=OPENAI_URL, api_key="sk-fake", max_retries=0), prefix="openai-")
anthropic_calls(anthropic, anthropic.Anthropic(base_url=ANTHROPIC_URL, api_key="sk-ant-fake", max_retries=0),
                prefix="anthropic-")
# Traceloop's atexit handler flushes the batch at exit (Traceloop has no flush())
