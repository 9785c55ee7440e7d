"""Which provider and model an HTTP call goes to, from its URL and body."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

# host suffix -> provider
_HOSTS = (
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure"),
    ("cognitiveservices.azure.com", "azure"),
    ("services.ai.azure.com", "azure"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "google"),
    ("aiplatform.googleapis.com", "vertex_ai"),
    ("bedrock-runtime", "bedrock"),
    ("api.mistral.ai", "mistral"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("api.groq.com", "groq"),
    ("api.together.xyz", "together_ai"),
    ("api.together.ai", "together_ai"),
    ("api.deepseek.com", "deepseek"),
    ("openrouter.ai", "openrouter"),
    ("api.fireworks.ai", "fireworks_ai"),
    ("api.perplexity.ai", "perplexity"),
    ("api.x.ai", "xai"),
    ("inference.ai.azure.com", "azure_ai"),
    ("api-inference.huggingface.co", "huggingface"),
    ("router.huggingface.co", "huggingface"),
)
_PATHS = (
    (re.compile(r"/v1/messages(?:$|\?)"), "anthropic"),
    (re.compile(r"/api/(?:chat|generate)$"), "ollama"),
    (re.compile(r":(?:stream)?generatecontent", re.I), "google"),
    (re.compile(r"/model/[^/]+/(?:invoke|converse)", re.I), "bedrock"),
    (re.compile(r"/(?:chat/)?completions$|/responses$|/embeddings$"), "openai"),
)
_MODEL_IN_PATH = (
    re.compile(r"/models/([^/:]+):", re.I),               # Gemini / Vertex
    re.compile(r"/model/([^/]+)/(?:invoke|converse)", re.I),  # Bedrock
    re.compile(r"/deployments/([^/]+)/", re.I),            # Azure OpenAI deployment
)


def provider_from_url(url: str) -> str:
    """Provider of an OpenAI-compatible base URL; "openai" when nothing more specific is known."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    for suffix, provider in _HOSTS:
        if suffix in host:
            return provider
    if host.endswith(":11434") or urllib.parse.urlsplit(url).port == 11434:
        return "ollama"
    return "openai"


def detect_llm_call(url: str, body: Any = None) -> dict:
    """{"provider", "model"} of a request to an LLM API; "unknown"/None when it is not one."""
    provider = "unknown"
    model = None
    try:
        parts = urllib.parse.urlsplit(str(url or ""))
        host = (parts.hostname or "").lower()
        path = parts.path or ""
        for suffix, name in _HOSTS:
            if suffix in host:
                provider = name
                break
        else:
            if parts.port == 11434:
                provider = "ollama"
            else:
                for pattern, name in _PATHS:
                    if pattern.search(path):
                        provider = name
                        break
        for pattern in _MODEL_IN_PATH:
            m = pattern.search(path)
            if m:
                model = urllib.parse.unquote(m.group(1))
                break
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8", "replace")
        if isinstance(body, str):
            try:
                body = json.loads(body) if body.strip() else None
            except ValueError:
                body = None
        if isinstance(body, dict):
            value = body.get("model") or body.get("modelId")
            if isinstance(value, str) and value:
                model = value
            if provider == "unknown":
                if "messages" in body and "max_tokens" in body and "anthropic_version" in body:
                    provider = "anthropic"
                elif "messages" in body or "input" in body or "prompt" in body:
                    provider = "openai" if model else provider
    except Exception:  # noqa: BLE001 - detection never raises
        pass
    return {"provider": provider, "model": model}
