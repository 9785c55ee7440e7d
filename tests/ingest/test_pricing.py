"""Pricing: model-name normalisation, the price table and the refreshed per-process cache."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ingest.models import ModelPrice
from ingest.services.pricing import Price, PriceTable, normalize_model, normalize_provider, price_table


def P(provider, model, input_, output, cached=None, version="v1"):
    return Price(provider, model, Decimal(input_), Decimal(output), None if cached is None else Decimal(cached), version)


TABLE = PriceTable([
    P("openai", "gpt-4o", "2.50", "10.00", "1.25", "oa-2024"),
    P("openai", "gpt-4o-mini", "0.15", "0.60", "0.075", "oa-2024"),
    P("openai", "gpt-4", "30", "60", None, "oa-2024"),
    P("anthropic", "claude-3-5-sonnet", "3", "15", "0.30", "an-2024"),
    P("anthropic", "claude-3-haiku", "0.25", "1.25", "0.03", "an-2024"),
    P("google", "gemini-1.5-pro", "1.25", "5", None, "go-2024"),
])


def lookup(model, provider=None):
    price = TABLE.lookup(provider=provider, model=model)
    return None if price is None else (price.provider, price.model)


@pytest.mark.parametrize("model, expected", [
    ("gpt-4o-2024-08-06", ("openai", "gpt-4o")),
    ("claude-3-5-sonnet-20241022", ("anthropic", "claude-3-5-sonnet")),
    ("gpt-4-0613", ("openai", "gpt-4")),
    ("claude-3-5-sonnet@20240620", ("anthropic", "claude-3-5-sonnet")),
    ("gemini-1.5-pro-002", ("google", "gemini-1.5-pro")),
    ("gpt-4o-mini-2024-07-18", ("openai", "gpt-4o-mini")),
])
def test_dated_snapshot_names_resolve_to_the_base_model(model, expected):
    assert lookup(model) == expected


@pytest.mark.parametrize("model, hint, name", [
    ("openai/gpt-4o", "openai", "gpt-4o"),
    ("models/gemini-1.5-pro", None, "gemini-1.5-pro"),
    ("anthropic.claude-3-haiku-20240307-v1:0", "anthropic", "claude-3-haiku-20240307-v1:0"),
    ("us.anthropic.claude-3-haiku-20240307-v1:0", "anthropic", "claude-3-haiku-20240307-v1:0"),
    ("  Azure/GPT-4o  ", "openai", "gpt-4o"),
])
def test_normalize_model_strips_prefixes_and_case(model, hint, name):
    assert normalize_model(model) == (hint, name)


@pytest.mark.parametrize("model, expected", [
    ("openai/gpt-4o", ("openai", "gpt-4o")),
    ("models/gemini-1.5-pro", ("google", "gemini-1.5-pro")),
    ("models/gemini-1.5-pro-002", ("google", "gemini-1.5-pro")),
    ("anthropic.claude-3-haiku-20240307-v1:0", ("anthropic", "claude-3-haiku")),
    ("us.anthropic.claude-3-haiku-20240307-v1:0", ("anthropic", "claude-3-haiku")),
    ("eu.anthropic.claude-3-haiku-20240307-v1:0", ("anthropic", "claude-3-haiku")),
])
def test_prefixed_names_resolve(model, expected):
    assert lookup(model) == expected


@pytest.mark.parametrize("model, provider", [
    ("GPT-4o", "OpenAI"),
    ("Gpt-4O-2024-08-06", " OPENAI "),
    ("OpenAI/GPT-4o", None),
    ("CLAUDE-3-5-SONNET-20241022", "Anthropic"),
])
def test_case_and_whitespace_do_not_matter(model, provider):
    assert lookup(model, provider) in {("openai", "gpt-4o"), ("anthropic", "claude-3-5-sonnet")}


@pytest.mark.parametrize("alias, canonical", [
    ("azure", "openai"), ("azure_openai", "openai"), ("gemini", "google"),
    ("Claude", "anthropic"), ("some-new-vendor", "some-new-vendor"), ("", None), (None, None),
])
def test_provider_aliases(alias, canonical):
    assert normalize_provider(alias) == canonical


def test_aliased_provider_finds_the_price():
    assert lookup("gpt-4o", "azure") == ("openai", "gpt-4o")
    assert lookup("gemini-1.5-pro-002", "vertex_ai") == ("google", "gemini-1.5-pro")


def test_an_explicit_provider_that_has_no_such_model_is_unknown():
    assert lookup("gpt-4o", "anthropic") is None


def test_bedrock_provider_with_a_vendor_prefixed_model_id_uses_the_vendor_price():
    assert lookup("us.anthropic.claude-3-haiku-20240307-v1:0", "bedrock") == ("anthropic", "claude-3-haiku")


@pytest.mark.parametrize("model, expected", [
    ("gemini-1.5-pro-002", ("google", "gemini-1.5-pro")),
    ("claude-3-5-sonnet@20240620", ("anthropic", "claude-3-5-sonnet")),
    ("my-finetune", None),
])
def test_vertex_is_a_platform_the_model_name_decides_the_vendor(model, expected):
    assert lookup(model, provider="vertex_ai") == expected


def test_exact_match_only_mini_is_not_priced_as_its_big_sibling():
    table = PriceTable([P("openai", "gpt-4o", "2.50", "10.00")])
    assert table.lookup(provider="openai", model="gpt-4o-mini") is None
    assert table.lookup(provider=None, model="gpt-4o-mini-2024-07-18") is None
    assert table.cost(provider="openai", model="gpt-4o-mini", prompt_tokens=10, completion_tokens=10) is None
    # and the other way round: gpt-4o never takes a longer row's price
    table = PriceTable([P("openai", "gpt-4o-mini", "0.15", "0.60")])
    assert table.lookup(provider="openai", model="gpt-4o") is None


def test_same_model_for_two_providers_without_provider_is_ambiguous():
    table = PriceTable([P("openai", "llama-3-70b", "1", "1"), P("meta", "llama-3-70b", "2", "2")])
    assert table.lookup(provider=None, model="llama-3-70b") is None
    assert table.cost(provider=None, model="llama-3-70b", prompt_tokens=100, completion_tokens=0) is None
    assert table.lookup(provider="meta", model="llama-3-70b").input_per_1m == Decimal(2)
    assert table.lookup(provider=None, model="meta/llama-3-70b").input_per_1m == Decimal(2)


def test_unknown_model_costs_none_not_zero():
    assert TABLE.cost(provider="openai", model="my-private-model", prompt_tokens=100, completion_tokens=5) is None
    assert TABLE.cost(provider="selfhosted", model="gpt-4o", prompt_tokens=100, completion_tokens=5) is None
    assert TABLE.cost(provider="openai", model=None, prompt_tokens=100, completion_tokens=5) is None
    assert TABLE.cost(provider="openai", model="", prompt_tokens=100, completion_tokens=5) is None


def test_no_tokens_costs_none_but_zero_tokens_cost_zero():
    assert TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=None, completion_tokens=None) is None
    assert TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=None, completion_tokens=None,
                      cached_tokens=50) is None
    zero = TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=0, completion_tokens=0)
    assert zero is not None and zero.cost_usd_micro == 0


def test_cost_is_micro_usd_with_version_and_provider():
    cost = TABLE.cost(provider="azure", model="gpt-4o-2024-08-06", prompt_tokens=1000, completion_tokens=200)
    assert cost.cost_usd_micro == 1000 * 2.5 + 200 * 10  # 4500
    assert isinstance(cost.cost_usd_micro, int)
    assert cost.price_version == "oa-2024" and cost.provider == "openai"
    only_output = TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=None, completion_tokens=3)
    assert only_output.cost_usd_micro == 30


def test_cached_tokens_use_the_cached_price_and_are_not_counted_twice():
    cost = TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=1000, completion_tokens=200,
                      cached_tokens=400)
    # 600 uncached x 2.50 + 400 cached x 1.25 + 200 x 10.00
    assert cost.cost_usd_micro == 1500 + 500 + 2000
    # more cached than prompt tokens (a client bug) is capped at the prompt tokens
    capped = TABLE.cost(provider="openai", model="gpt-4o", prompt_tokens=100, completion_tokens=0,
                        cached_tokens=1000)
    assert capped.cost_usd_micro == 125


def test_missing_cached_price_falls_back_to_the_input_price():
    cost = TABLE.cost(provider="openai", model="gpt-4-0613", prompt_tokens=1000, completion_tokens=10,
                      cached_tokens=600)
    assert cost.cost_usd_micro == 1000 * 30 + 10 * 60


@pytest.mark.parametrize("input_price, tokens, expected", [
    ("0.5", 1, 1),  # .5 rounds up (banker's rounding would give 0)
    ("2.5", 1, 3),  # .5 rounds up (banker's rounding would give 2)
    ("0.15", 3, 0),  # 0.45
    ("0.15", 4, 1),  # 0.60
    ("0.075", 20, 2),  # 1.5
    ("0.000001", 499_999, 0),  # 0.499999
    ("0.000001", 500_000, 1),  # 0.5
])
def test_one_rounding_at_the_end_half_up(input_price, tokens, expected):
    table = PriceTable([P("openai", "m", input_price, "0")])
    cost = table.cost(provider="openai", model="m", prompt_tokens=tokens, completion_tokens=0)
    assert cost.cost_usd_micro == expected and isinstance(cost.cost_usd_micro, int)


def test_rounding_happens_once_not_per_part():
    # 1 x 0.4 + 1 x 0.4 (cached) + 1 x 0.4 = 1.2 -> 1; per-part rounding would give 0
    table = PriceTable([P("openai", "m", "0.4", "0.4", "0.4")])
    cost = table.cost(provider="openai", model="m", prompt_tokens=2, completion_tokens=1, cached_tokens=1)
    assert cost.cost_usd_micro == 1


# --- price_table(): the per-process cache over the ModelPrice table -------------------------


def test_price_table_reads_the_database(db):
    ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                              output_price_per_1m="10.00", version="2026-01")
    cost = price_table().cost(provider="openai", model="gpt-4o-2024-08-06", prompt_tokens=1000,
                              completion_tokens=0)
    assert cost.cost_usd_micro == 2500 and cost.price_version == "2026-01"


def test_price_table_picks_up_an_orm_edit_without_a_reset(db, settings):
    settings.CONFIG_REFRESH_SECONDS = 0
    row = ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                                    output_price_per_1m="10.00", version="v1")
    assert price_table().cost(provider="openai", model="gpt-4o", prompt_tokens=1000,
                              completion_tokens=0).cost_usd_micro == 2500
    row.input_price_per_1m = Decimal("5.00")
    row.version = "v2"
    row.save()
    cost = price_table().cost(provider="openai", model="gpt-4o", prompt_tokens=1000, completion_tokens=0)
    assert cost.cost_usd_micro == 5000 and cost.price_version == "v2"
    # a new row and a deleted row are seen too
    ModelPrice.objects.create(provider="anthropic", model="claude-3-haiku", input_price_per_1m="0.25",
                              output_price_per_1m="1.25", version="v1")
    assert price_table().lookup(provider="anthropic", model="claude-3-haiku-20240307") is not None
    row.delete()
    assert price_table().lookup(provider="openai", model="gpt-4o") is None


def test_price_table_is_cached_within_the_refresh_interval(db, settings, django_assert_num_queries):
    settings.CONFIG_REFRESH_SECONDS = 3600
    ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                              output_price_per_1m="10.00", version="v1")
    first = price_table()
    with django_assert_num_queries(0):
        assert price_table() is first


def test_price_table_sees_a_queryset_update(db, settings):
    settings.CONFIG_REFRESH_SECONDS = 0
    ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                              output_price_per_1m="10.00", version="v1")
    assert price_table().lookup(provider="openai", model="gpt-4o").input_per_1m == Decimal("2.5")
    ModelPrice.objects.filter(provider="openai", model="gpt-4o").update(input_price_per_1m=Decimal("5"))
    assert price_table().lookup(provider="openai", model="gpt-4o").input_per_1m == Decimal("5")
