"""Seeding ModelPrice and DetectionPattern from config/*.yaml, idempotently.

A row that came from the config file is updated when the file changes; a row
edited in the admin (source=admin) is left alone, so an operator's fix survives
upgrades and restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import yaml
from django.core.exceptions import ValidationError
from django.db import transaction

from ingest.models import DetectionPattern, ModelPrice


class ConfigFileError(ValueError):
    pass


@dataclass
class LoadSummary:
    created: int = 0
    updated: int = 0
    kept: int = 0


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {exc}") from None


def _decimal(value, where: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ConfigFileError(f"{where}: {value!r} is not a number") from None


def _apply(model_cls, lookup: dict, values: dict, where: str, summary: LoadSummary) -> None:
    existing = model_cls.objects.filter(**lookup).first()
    if existing is not None and existing.source == ModelPrice.Source.ADMIN:
        summary.kept += 1
        return
    obj = existing or model_cls(**lookup)
    before = {key: getattr(obj, key) for key in values} if existing is not None else None
    for key, value in values.items():
        setattr(obj, key, value)
    obj.source = ModelPrice.Source.CONFIG
    try:
        obj.full_clean(validate_unique=False)  # also turns YAML strings into dates and decimals
    except ValidationError as exc:
        raise ConfigFileError(f"{where}: {'; '.join(f'{k}: {v[0]}' for k, v in exc.message_dict.items())}") from None
    if before is not None and all(getattr(obj, key) == before[key] for key in values):
        summary.kept += 1
        return
    obj.save()
    if existing is None:
        summary.created += 1
    else:
        summary.updated += 1


@transaction.atomic
def prices_load(*, path: Path) -> LoadSummary:
    rows = _read_yaml(path)
    if not isinstance(rows, list):
        raise ConfigFileError(f"{path}: expected a list of prices")
    summary, seen = LoadSummary(), set()
    for i, row in enumerate(rows):
        where = f"{path.name} entry {i + 1}"
        if not isinstance(row, dict) or not row.get("model") or not row.get("provider"):
            raise ConfigFileError(f"{where}: needs model and provider")
        key = (str(row["provider"]).strip().lower(), str(row["model"]).strip().lower())
        if key in seen:
            raise ConfigFileError(f"{where}: {key[0]}/{key[1]} appears twice")
        seen.add(key)
        values = {
            "input_price_per_1m": _decimal(row.get("input_price_per_1m"), where),
            "output_price_per_1m": _decimal(row.get("output_price_per_1m"), where),
            "cached_input_price_per_1m": _decimal(row.get("cached_input_price_per_1m"), where),
            "version": str(row.get("version") or ""),
            "effective_date": row.get("effective_date") or None,
        }
        if values["input_price_per_1m"] is None or values["output_price_per_1m"] is None:
            raise ConfigFileError(f"{where}: input_price_per_1m and output_price_per_1m are required")
        _apply(ModelPrice, {"provider": key[0], "model": key[1]}, values, where, summary)
    return summary


@transaction.atomic
def patterns_load(*, path: Path) -> LoadSummary:
    data = _read_yaml(path)
    rows = data.get("patterns") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ConfigFileError(f"{path}: expected `patterns:` with a list")
    summary, seen = LoadSummary(), set()
    for i, row in enumerate(rows):
        where = f"{path.name} pattern {i + 1}"
        if not isinstance(row, dict) or not row.get("name") or not row.get("type"):
            raise ConfigFileError(f"{where}: needs name and type")
        if row["name"] in seen:
            raise ConfigFileError(f"{where}: the name {row['name']!r} appears twice")
        seen.add(row["name"])
        if row["type"] not in DetectionPattern.Kind.values:
            raise ConfigFileError(f"{where}: type must be one of {', '.join(DetectionPattern.Kind.values)}")
        phrases = row.get("phrases") or []
        if not isinstance(phrases, list):
            raise ConfigFileError(f"{where}: phrases must be a list of strings (use `- phrase` lines)")
        anchors = row.get("anchors") or []
        if not isinstance(anchors, list):
            raise ConfigFileError(f"{where}: anchors must be a list of strings")
        context = row.get("context") or []
        exclude_context = row.get("exclude_context") or []
        if not isinstance(context, list) or not isinstance(exclude_context, list):
            raise ConfigFileError(f"{where}: context and exclude_context must be lists of strings")
        context_window = row.get("context_window") or 0
        if not isinstance(context_window, int) or context_window < 0:
            raise ConfigFileError(f"{where}: context_window must be a whole number of characters")
        enabled = row.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigFileError(f"{where}: enabled must be true or false, not {enabled!r}")
        values = {
            "type": row["type"],
            "regex": row.get("regex") or "",
            "phrases": phrases,
            "validator": row.get("validator") or "",
            "anchors": anchors,
            "context": context,
            "exclude_context": exclude_context,
            "context_window": context_window,
            "placeholder": row.get("placeholder") or "",
            "enabled": enabled,
            "description": row.get("description") or "",
        }
        _apply(DetectionPattern, {"name": row["name"]}, values, where, summary)
    return summary
