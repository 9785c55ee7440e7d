"""openlit with openai and anthropic."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ANTHROPIC_URL, API_KEY, APPLIANCE_URL, OPENAI_URL, SERVICE, anthropic_calls, openai_calls  # noqa: E402

import anthropic  # noqa: E402
import openai  # noqa: E402
import openlit  # noqa: E402

# per openlit's docs: the OTLP endpoint (base URL) and headers, here as init arguments
openlit.init(otlp_endpoint=APPLIANCE_URL, otlp_headers=f"Authorization=Bearer {API_KEY}",
             application_name=SERVICE, environment="interop", disable_batch=True,
             # openlit fetches its price list from GitHub at start-up; this machine has no such network
             pricing_json=str(Path(__file__).with_name("pricing.json")))

openai_calls(openai, openai.OpenAI(base_url=OPENAI_URL, api_key="sk-fake", max_retries=0), prefix="openai-")
anthropic_calls(anthropic, anthropic.Anthropic(base_url=ANTHROPIC_URL, api_key="sk-ant-fake", max_retries=0),
                prefix="anthropic-")
