"""Seeding ModelPrice and DetectionPattern from YAML: idempotent, admin edits kept, bad files refused."""

from __future__ import annotations

import io
import re
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from ingest.models import DetectionPattern, ModelPrice
from ingest.services.config_load import ConfigFileError, patterns_load, prices_load

CONFIG_DIR = Path(settings.BASE_DIR) / "config"

PRICES = """
- model: gpt-4o
  provider: openai
  input_price_per_1m: 2.50
  output_price_per_1m: 10.00
  cached_input_price_per_1m: 1.25
  version: "2024-11-01"
- model: Claude-3-Haiku
  provider: Anthropic
  input_price_per_1m: 0.25
  output_price_per_1m: 1.25
  version: "2024-11-01"
  effective_date: 2024-11-01
"""

PATTERNS = """
patterns:
  - name: email
    type: PII_STRUCTURAL
    placeholder: EMAIL
    regex: '[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}'
  - name: ignore_previous
    type: INJECTION_ATTEMPT
    phrases: ["ignore all previous instructions", "disregard the above"]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- prices ----------------------------------------------------------------------------------


def test_prices_load_creates_rows(db, tmp_path):
    summary = prices_load(path=write(tmp_path, "model_prices.yaml", PRICES))
    assert (summary.created, summary.updated, summary.kept) == (2, 0, 0)
    gpt = ModelPrice.objects.get(provider="openai", model="gpt-4o")
    assert gpt.input_price_per_1m == Decimal("2.5") and gpt.output_price_per_1m == Decimal("10")
    assert gpt.cached_input_price_per_1m == Decimal("1.25")
    assert gpt.version == "2024-11-01" and gpt.source == ModelPrice.Source.CONFIG
    haiku = ModelPrice.objects.get(provider="anthropic", model="claude-3-haiku")  # normalised to lower case
    assert haiku.cached_input_price_per_1m is None
    assert str(haiku.effective_date) == "2024-11-01"


def test_prices_load_twice_is_idempotent(db, tmp_path):
    path = write(tmp_path, "model_prices.yaml", PRICES)
    prices_load(path=path)
    before = dict(ModelPrice.objects.values_list("id", "updated_at"))
    summary = prices_load(path=path)
    assert (summary.created, summary.updated, summary.kept) == (0, 0, 2)
    assert dict(ModelPrice.objects.values_list("id", "updated_at")) == before


def test_prices_load_with_quoted_effective_date_is_idempotent(db, tmp_path):
    path = write(tmp_path, "model_prices.yaml", """
        - model: gpt-4o
          provider: openai
          input_price_per_1m: 2.50
          output_price_per_1m: 10.00
          version: "2026-11-26"
          effective_date: "2026-11-26"
    """)
    prices_load(path=path)
    summary = prices_load(path=path)
    assert (summary.created, summary.updated) == (0, 0)


def test_a_changed_price_updates_a_config_row(db, tmp_path):
    prices_load(path=write(tmp_path, "model_prices.yaml", PRICES))
    summary = prices_load(path=write(tmp_path, "model_prices.yaml", PRICES.replace("2.50", "3.00")))
    assert (summary.created, summary.updated, summary.kept) == (0, 1, 1)
    row = ModelPrice.objects.get(provider="openai", model="gpt-4o")
    assert row.input_price_per_1m == Decimal("3") and row.source == ModelPrice.Source.CONFIG


def test_a_row_edited_in_the_admin_is_kept(db, tmp_path):
    prices_load(path=write(tmp_path, "model_prices.yaml", PRICES))
    ModelPrice.objects.filter(provider="openai", model="gpt-4o").update(
        input_price_per_1m=Decimal("2.00"), source=ModelPrice.Source.ADMIN)
    summary = prices_load(path=write(tmp_path, "model_prices.yaml", PRICES.replace("2.50", "3.00")))
    assert (summary.created, summary.updated, summary.kept) == (0, 0, 2)
    row = ModelPrice.objects.get(provider="openai", model="gpt-4o")
    assert row.input_price_per_1m == Decimal("2") and row.source == ModelPrice.Source.ADMIN


@pytest.mark.parametrize("text, fragments", [
    ("""
     - {model: gpt-4o, provider: openai, input_price_per_1m: 2.5, output_price_per_1m: 10, version: v1}
     - {model: gpt-4o-mini, provider: openai, input_price_per_1m: -0.15, output_price_per_1m: 0.6, version: v1}
     """, ["entry 2", "input_price_per_1m", "negative"]),
    ("""
     - {model: gpt-4o, provider: openai, input_price_per_1m: 2.5, output_price_per_1m: 10,
        cached_input_price_per_1m: -1, version: v1}
     """, ["entry 1", "cached_input_price_per_1m", "negative"]),
    ("""
     - {model: gpt-4o, provider: openai, input_price_per_1m: 2.5, output_price_per_1m: 10, version: v1}
     - {model: GPT-4o, provider: OpenAI, input_price_per_1m: 3, output_price_per_1m: 12, version: v1}
     """, ["entry 2", "openai/gpt-4o", "twice"]),
    ("""
     - {model: gpt-4o, provider: openai, input_price_per_1m: 2.5, output_price_per_1m: 10, version: v1}
     - {model: gpt-4o-mini, provider: openai, output_price_per_1m: 0.6, version: v1}
     """, ["entry 2", "input_price_per_1m", "required"]),
    ("""
     - {model: gpt-4o, provider: openai, input_price_per_1m: cheap, output_price_per_1m: 10, version: v1}
     """, ["entry 1", "'cheap'", "not a number"]),
    ("""
     - {model: gpt-4o, input_price_per_1m: 2.5, output_price_per_1m: 10, version: v1}
     """, ["entry 1", "provider"]),
    ("""
     - model: gpt-4o
       provider: [openai
     """, ["not valid YAML"]),
    ("""
     gpt-4o: {input_price_per_1m: 2.5}
     """, ["expected a list"]),
])
def test_bad_price_files_are_refused_with_the_entry_named(db, tmp_path, text, fragments):
    path = write(tmp_path, "model_prices.yaml", text)
    with pytest.raises(ConfigFileError) as info:
        prices_load(path=path)
    message = str(info.value)
    assert "model_prices.yaml" in message
    for fragment in fragments:
        assert fragment in message
    assert ModelPrice.objects.count() == 0  # all or nothing


def test_nan_price_is_a_config_file_error(db, tmp_path):
    path = write(tmp_path, "model_prices.yaml", """
        - {model: gpt-4o, provider: openai, input_price_per_1m: .nan, output_price_per_1m: 10, version: v1}
    """)
    with pytest.raises(ConfigFileError, match="entry 1"):
        prices_load(path=path)


def test_missing_file_is_a_config_file_error(db, tmp_path):
    with pytest.raises(ConfigFileError, match="nope.yaml"):
        prices_load(path=tmp_path / "nope.yaml")


# --- patterns --------------------------------------------------------------------------------


def test_patterns_load_creates_rows_and_is_idempotent(db, tmp_path):
    path = write(tmp_path, "patterns.yaml", PATTERNS)
    summary = patterns_load(path=path)
    assert (summary.created, summary.updated, summary.kept) == (2, 0, 0)
    email = DetectionPattern.objects.get(name="email")
    assert email.type == DetectionPattern.Kind.PII_STRUCTURAL and email.placeholder == "EMAIL"
    assert email.enabled and email.source == ModelPrice.Source.CONFIG
    assert DetectionPattern.objects.get(name="ignore_previous").phrases == [
        "ignore all previous instructions", "disregard the above"]
    summary = patterns_load(path=path)
    assert (summary.created, summary.updated, summary.kept) == (0, 0, 2)


def test_a_changed_pattern_is_updated_and_an_admin_edited_one_kept(db, tmp_path):
    patterns_load(path=write(tmp_path, "patterns.yaml", PATTERNS))
    DetectionPattern.objects.filter(name="email").update(enabled=False, source=ModelPrice.Source.ADMIN)
    changed = PATTERNS.replace("disregard the above", "disregard everything above").replace("EMAIL", "MAIL")
    summary = patterns_load(path=write(tmp_path, "patterns.yaml", changed))
    assert (summary.created, summary.updated, summary.kept) == (0, 1, 1)
    email = DetectionPattern.objects.get(name="email")
    assert email.placeholder == "EMAIL" and not email.enabled  # the operator's edit survives
    assert "disregard everything above" in DetectionPattern.objects.get(name="ignore_previous").phrases


@pytest.mark.parametrize("text, fragments", [
    ("""
     patterns:
       - {name: ok, type: PII_STRUCTURAL, regex: 'a+'}
       - {name: broken, type: PII_STRUCTURAL, regex: '(unclosed'}
     """, ["pattern 2", "regex", "does not compile"]),
    ("""
     patterns:
       - {name: email, type: PII_STRUCTURAL, regex: 'a+'}
       - {name: email, type: INJECTION_ATTEMPT, phrases: [x y]}
     """, ["pattern 2", "'email'", "twice"]),
    ("""
     patterns:
       - {name: secrets, type: SECRET, regex: 'sk-[a-z]+'}
     """, ["pattern 1", "type must be one of", "PII_STRUCTURAL"]),
    ("""
     patterns:
       - {name: nothing, type: INJECTION_ATTEMPT}
     """, ["pattern 1", "give a regex or at least one phrase"]),
    ("""
     patterns:
       - {type: INJECTION_ATTEMPT, regex: 'a'}
     """, ["pattern 1", "name"]),
    ("""
     - {name: a, type: INJECTION_ATTEMPT, regex: 'a'}
     """, ["expected `patterns:`"]),
    ("""
     patterns: [
     """, ["not valid YAML"]),
])
def test_bad_pattern_files_are_refused_with_the_entry_named(db, tmp_path, text, fragments):
    path = write(tmp_path, "patterns.yaml", text)
    with pytest.raises(ConfigFileError) as info:
        patterns_load(path=path)
    message = str(info.value)
    assert "patterns.yaml" in message
    for fragment in fragments:
        assert fragment in message
    assert DetectionPattern.objects.count() == 0


def test_phrases_given_as_a_string_are_not_split_into_letters(db, tmp_path):
    path = write(tmp_path, "patterns.yaml", """
        patterns:
          - {name: jb, type: INJECTION_ATTEMPT, phrases: jailbreak}
    """)
    try:
        patterns_load(path=path)
    except ConfigFileError:
        return
    assert DetectionPattern.objects.get(name="jb").phrases == ["jailbreak"]


# --- the shipped files -----------------------------------------------------------------------


def test_shipped_patterns_compile_have_unique_names_and_load(db):
    path = CONFIG_DIR / "patterns.yaml"
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))["patterns"]
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    for row in rows:
        assert row["type"] in DetectionPattern.Kind.values, row["name"]
        if row.get("regex"):
            re.compile(row["regex"], re.IGNORECASE)
        assert row.get("regex") or row.get("phrases"), row["name"]
    summary = patterns_load(path=path)
    assert summary.created == len(rows)
    assert DetectionPattern.objects.count() == len(rows)


def test_shipped_prices_load(db):
    path = CONFIG_DIR / "model_prices.yaml"
    if not path.exists():
        pytest.skip("config/model_prices.yaml is not written yet")
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))
    summary = prices_load(path=path)
    assert summary.created == len(rows) and ModelPrice.objects.count() == len(rows)
    assert not ModelPrice.objects.filter(input_price_per_1m__lt=0).exists()
    keys = [(str(r["provider"]).lower(), str(r["model"]).lower()) for r in rows]
    assert len(keys) == len(set(keys))


# --- manage.py load_config -------------------------------------------------------------------


def test_load_config_command_reports_counts(db, tmp_path):
    prices = write(tmp_path, "model_prices.yaml", PRICES)
    patterns = write(tmp_path, "patterns.yaml", PATTERNS)
    out = io.StringIO()
    call_command("load_config", prices=prices, patterns=patterns, stdout=out)
    assert out.getvalue().strip() == (
        "prices: 2 new, 0 updated, 0 unchanged or edited in the admin; "
        "patterns: 2 new, 0 updated, 0 unchanged or edited in the admin")
    out = io.StringIO()
    call_command("load_config", "--prices", str(prices), "--patterns", str(patterns), stdout=out)
    assert out.getvalue().strip() == (
        "prices: 0 new, 0 updated, 2 unchanged or edited in the admin; "
        "patterns: 0 new, 0 updated, 2 unchanged or edited in the admin")


def test_load_config_command_turns_a_bad_file_into_a_command_error(db, tmp_path):
    prices = write(tmp_path, "model_prices.yaml", PRICES)
    patterns = write(tmp_path, "patterns.yaml", """
        patterns:
          - {name: broken, type: PII_STRUCTURAL, regex: '[a-'}
    """)
    with pytest.raises(CommandError, match="pattern 1.*does not compile"):
        call_command("load_config", prices=prices, patterns=patterns, stdout=io.StringIO())
    assert DetectionPattern.objects.count() == 0  # the patterns file is loaded all or nothing


def test_load_config_command_with_the_shipped_files(db):
    if not (CONFIG_DIR / "model_prices.yaml").exists():
        pytest.skip("config/model_prices.yaml is not written yet")
    out = io.StringIO()
    call_command("load_config", stdout=out)
    match = re.fullmatch(r"prices: (\d+) new, 0 updated, 0 unchanged or edited in the admin; "
                         r"patterns: (\d+) new, 0 updated, 0 unchanged or edited in the admin", out.getvalue().strip())
    assert match, out.getvalue()
    assert int(match.group(1)) == ModelPrice.objects.count() > 0
    assert int(match.group(2)) == DetectionPattern.objects.count() > 0
