"""Cost of a span in integer micro-USD, from the ModelPrice table.

A price "per 1M tokens in USD" is exactly "micro-USD per token", so the cost is
tokens x price with one rounding at the end. Unknown model: cost None, never 0.
Every process keeps the table in memory and re-reads it when the table changes
(checked at most every CONFIG_REFRESH_SECONDS), so an admin edit applies to the
next span everywhere without a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from ingest.services.refresh import TableCache

PROVIDER_ALIASES = {
    "openai": "openai",
    "azure": "openai",
    "azure_openai": "openai",
    "azure-openai": "openai",
    "anthropic": "anthropic",
    "claude": "anthropic",
    "google": "google",
    "gemini": "google",
    "google_genai": "google",
    "google-genai": "google",
    "gcp.gemini": "google",
    "mistral": "mistral",
    "mistralai": "mistral",
    "mistral_ai": "mistral",
    "meta": "meta",
    "meta-llama": "meta",
    "meta_llama": "meta",
    "llama": "meta",
    "cohere": "cohere",
    "cohere_ai": "cohere",
    "voyage": "voyage",
    "voyageai": "voyage",
    "voyage_ai": "voyage",
}

_BEDROCK_REGIONS = {"us", "eu", "apac", "global"}
# Clouds that resell several vendors' models at the vendor's list price: the model
# name, not the platform, says whose price applies.
PLATFORMS = {"bedrock", "aws_bedrock", "aws.bedrock", "vertex_ai", "vertexai", "gcp.vertex_ai", "openrouter"}

# Suffixes that name a snapshot of a model, not a different model.
_SNAPSHOT_SUFFIXES = [
    re.compile(r"[-@](\d{4}-\d{2}-\d{2})$"),  # gpt-4o-2024-08-06
    re.compile(r"[-@](\d{8})$"),  # claude-3-5-sonnet-20241022, vertex @20240620
    re.compile(r"-(\d{4})$"),  # gpt-4-0613, mistral-large-2411
    re.compile(r"-(0\d\d)$"),  # gemini-1.5-pro-002
    re.compile(r"-latest$"),
    re.compile(r"-v\d+(:\d+)?$"),  # bedrock: ...-v1:0
    re.compile(r":\d+$"),
]


def normalize_provider(provider: str | None) -> str | None:
    if not provider:
        return None
    key = provider.strip().lower()
    return PROVIDER_ALIASES.get(key, key)


def normalize_model(model: str) -> tuple[str | None, str]:
    """(provider hint from a prefix, model name without provider prefix, snapshot or case)."""
    name = model.strip().lower()
    hint = None
    if name.startswith("models/"):  # Gemini REST names
        name = name[len("models/"):]
    if "/" in name:
        prefix, rest = name.split("/", 1)
        hint = normalize_provider(prefix)
        name = rest.rsplit("/", 1)[-1]
    else:  # Bedrock ids: [region.]vendor.model-v1:0
        parts = name.split(".")
        if len(parts) > 2 and parts[0] in _BEDROCK_REGIONS:
            parts = parts[1:]
        if len(parts) > 1 and parts[0] in PROVIDER_ALIASES:
            hint = normalize_provider(parts[0])
            name = ".".join(parts[1:])
    return hint, name


def _candidates(name: str) -> list[str]:
    seen = [name]
    current = name
    for _ in range(3):
        for pattern in _SNAPSHOT_SUFFIXES:
            stripped = pattern.sub("", current)
            if stripped != current:
                current = stripped
                seen.append(current)
                break
        else:
            break
    return seen


@dataclass(frozen=True)
class Price:
    provider: str
    model: str
    input_per_1m: Decimal
    output_per_1m: Decimal
    cached_input_per_1m: Decimal | None
    version: str


@dataclass(frozen=True)
class Cost:
    cost_usd_micro: int
    price_version: str
    provider: str


class PriceTable:
    def __init__(self, prices: list[Price]) -> None:
        self.by_key: dict[tuple[str, str], Price] = {(p.provider, p.model): p for p in prices}
        self.by_model: dict[str, list[Price]] = {}
        self._memo: dict[tuple[str | None, str], Price | None] = {}
        for price in prices:
            self.by_model.setdefault(price.model, []).append(price)

    def lookup(self, *, provider: str | None, model: str | None) -> Price | None:
        if not model:
            return None
        key = (provider, model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        if len(self._memo) > 50_000:  # model names come from clients: keep the memo bounded
            self._memo.clear()
        price = self._memo[key] = self._lookup(provider, model)
        return price

    def _lookup(self, provider: str | None, model: str) -> Price | None:
        hint, name = normalize_model(model)
        given = normalize_provider(provider)
        wanted = hint or (None if given in PLATFORMS else given)
        for candidate in _candidates(name):
            if wanted is not None:
                price = self.by_key.get((wanted, candidate))
                if price is not None:
                    return price
            else:
                matches = self.by_model.get(candidate, [])
                if len(matches) == 1:
                    return matches[0]
        return None

    def cost(self, *, provider: str | None, model: str | None, prompt_tokens: int | None,
             completion_tokens: int | None, cached_tokens: int | None = None) -> Cost | None:
        if prompt_tokens is None and completion_tokens is None:
            return None
        price = self.lookup(provider=provider, model=model)
        if price is None:
            return None
        prompt = prompt_tokens or 0
        cached = min(cached_tokens or 0, prompt)
        cached_price = price.cached_input_per_1m if price.cached_input_per_1m is not None else price.input_per_1m
        total = (prompt - cached) * price.input_per_1m + cached * cached_price + (completion_tokens or 0) * price.output_per_1m
        return Cost(int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP)), price.version, price.provider)


def _build() -> PriceTable:
    from ingest.models import ModelPrice

    return PriceTable([
        Price(r.provider, r.model, r.input_price_per_1m, r.output_price_per_1m, r.cached_input_price_per_1m, r.version)
        for r in ModelPrice.objects.all()
    ])


_cache = TableCache("ingest_modelprice", _build)


def price_table() -> PriceTable:
    """The current table, re-read when the ModelPrice rows changed."""
    return _cache.get()


def price_table_reset() -> None:
    """Forget the cached table (tests, and after a bulk load in this process)."""
    _cache.reset()
