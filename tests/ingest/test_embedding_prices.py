"""Embedding models in the shipped price table: loaded by load_config, priced on input tokens only."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.conf import settings

from ingest.models import ModelPrice
from ingest.services.config_load import prices_load
from ingest.services.pricing import price_table, price_table_reset

PRICES = Path(settings.BASE_DIR) / "config" / "model_prices.yaml"

# (provider, model, USD per 1M input tokens) as written in config/model_prices.yaml
EMBEDDING_PRICES = [
    ("openai", "text-embedding-3-small", "0.02"),
    ("openai", "text-embedding-3-large", "0.13"),
    ("openai", "text-embedding-ada-002", "0.10"),
    ("cohere", "embed-english-v3.0", "0.10"),
    ("cohere", "embed-multilingual-v3.0", "0.10"),
    ("cohere", "embed-v4.0", "0.12"),
    ("voyage", "voyage-3.5", "0.06"),
    ("voyage", "voyage-3.5-lite", "0.02"),
    ("voyage", "voyage-3-large", "0.18"),
    ("google", "gemini-embedding-001", "0.15"),
    ("mistral", "mistral-embed", "0.10"),
]


@pytest.fixture
def shipped(db):
    prices_load(path=PRICES)
    price_table_reset()
    yield price_table()
    price_table_reset()


def test_the_shipped_file_has_each_embedding_model_with_a_version_and_no_output_price():
    rows = {(r["provider"], r["model"]): r for r in yaml.safe_load(PRICES.read_text(encoding="utf-8"))}
    for provider, model, price in EMBEDDING_PRICES:
        row = rows[(provider, model)]
        assert f"{row['input_price_per_1m']:.2f}" == price, (provider, model)
        assert row["output_price_per_1m"] == 0 and "cached_input_price_per_1m" not in row
        assert row["version"] and row["effective_date"]


def test_embedding_rows_load_into_the_model_price_table(shipped):
    for provider, model, price in EMBEDDING_PRICES:
        row = ModelPrice.objects.get(provider=provider, model=model)
        assert row.input_price_per_1m == Decimal(price)
        assert row.output_price_per_1m == 0


@pytest.mark.parametrize("provider, model, price", EMBEDDING_PRICES)
def test_an_embedding_span_is_priced_on_its_input_tokens(shipped, provider, model, price):
    # 1M input tokens cost the per-1M price: in micro-USD, price x 1e6
    cost = shipped.cost(provider=provider, model=model, prompt_tokens=1_000_000, completion_tokens=0)
    assert cost is not None and cost.cost_usd_micro == round(float(price) * 1_000_000)
    assert cost.provider == provider and cost.price_version == "2026-12-03"


def test_an_embedding_span_without_completion_tokens_is_priced(shipped):
    # what an embeddings call reports: input tokens, no completion at all
    cost = shipped.cost(provider="openai", model="text-embedding-3-small", prompt_tokens=12_345,
                        completion_tokens=None)
    assert cost.cost_usd_micro == 247  # 12,345 x $0.02/1M = 246.9 micro-USD, rounded half up


def test_output_tokens_of_an_embedding_model_cost_nothing(shipped):
    cost = shipped.cost(provider="voyage", model="voyage-3.5", prompt_tokens=1000, completion_tokens=5000)
    assert cost.cost_usd_micro == 60


@pytest.mark.parametrize("provider, model, expected", [
    (None, "voyage-3-large", "voyage"),  # one provider has it: the name alone finds it
    (None, "embed-v4.0", "cohere"),
    ("gemini", "models/gemini-embedding-001", "google"),
    ("azure", "text-embedding-3-large", "openai"),
    ("mistralai", "mistral-embed", "mistral"),
])
def test_embedding_models_resolve_like_chat_models(shipped, provider, model, expected):
    price = shipped.lookup(provider=provider, model=model)
    assert price is not None and price.provider == expected


def test_vertex_per_character_embeddings_are_not_priced_per_token(shipped):
    # text-embedding-005 is billed per character on Vertex AI: no per-token row, so no made-up cost
    assert shipped.cost(provider="google", model="text-embedding-005", prompt_tokens=1000, completion_tokens=0) is None
