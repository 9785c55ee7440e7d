"""Writing scores: validate against the project's score configs, scan the comment, store idempotently.

Scores are written to PostgreSQL directly in both ingest modes (they are small and few next to
spans; there is no scores topic). A score whose id is already stored is a duplicate, not a
second row, so the SDK's at-least-once delivery stores each score once.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, timezone
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils.dateparse import parse_datetime
from prometheus_client import Histogram

from ingest.metrics import BoundedLabel
from ingest.models import Project, Score, ScoreConfig
from ingest.services.partitions import DELETE_BATCH, delete_batched
from ingest.services.scanning import scanner

log = logging.getLogger(__name__)

MAX_BATCH = 1000
MAX_COMMENT = 2000
MAX_ID = 128
MAX_NAME = 200
SOURCES = ("api", "sdk", "annotation", "evaluator")
FUTURE_TOLERANCE = timedelta(days=1)
_FIELDS = {"id", "name", "value", "comment", "comment_pii", "source", "timestamp", "trace_id", "span_id", "session_id"}
_TARGETS = ("span_id", "trace_id", "session_id")
_TARGET_LIMITS = {"span_id": 128, "trace_id": 128, "session_id": 200}

# Scores mostly live in 0..1 (evaluators, feedback), 1..5 (ratings) or 0..100 (percentages).
SCORE_BUCKETS = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 3, 4, 5, 10, 25, 50, 75, 100)
SCORES = Histogram("llm_scores", "Values of stored numeric and boolean scores (boolean: 1 true, 0 false)",
                   ["name", "source"], buckets=SCORE_BUCKETS)
# Names come from clients: bounded like the span labels (ingest.metrics); sources are a closed set.
_name_label = BoundedLabel(100)


@dataclass
class ScoreRejection:
    index: int
    id: str | None
    rule: str
    field: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "rule": self.rule, "field": self.field, "reason": self.reason}


@dataclass
class ScoresResult:
    accepted: int = 0
    duplicates: int = 0
    ids: list[str] = field(default_factory=list)
    rejected: list[ScoreRejection] = field(default_factory=list)


class _Invalid(Exception):
    def __init__(self, rule: str, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.rule, self.field, self.reason = rule, field, reason


def _text(raw: dict, name: str, limit: int) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("invalid_type", name, "must be a string")
    value = value.strip()
    if "\x00" in value:
        raise _Invalid("invalid_value", name, "NUL characters are not allowed")
    if len(value) > limit:
        raise _Invalid("too_long", name, f"at most {limit} characters")
    return value or None


def _timestamp(raw: dict, now: datetime) -> datetime:
    value = raw.get("timestamp")
    if value is None:
        return now
    if not isinstance(value, str):
        raise _Invalid("invalid_type", "timestamp", "must be an ISO 8601 string")
    try:
        parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise _Invalid("invalid_value", "timestamp", "not an ISO 8601 date and time")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        parsed = parsed.astimezone(timezone.utc)
    except OverflowError:
        raise _Invalid("out_of_range", "timestamp", "out of range") from None
    if parsed < now - timedelta(days=settings.RETENTION_DAYS) or parsed > now + FUTURE_TOLERANCE:
        raise _Invalid("out_of_range", "timestamp", f"older than RETENTION_DAYS ({settings.RETENTION_DAYS}) or "
                       "more than a day ahead")
    return parsed


def _typed_value(value: Any, config: ScoreConfig | None) -> tuple[str, float, str | None]:
    """(data_type, numeric value, string value) of a score value, checked against the name's config."""
    kind = config.data_type if config else None
    if kind is None:
        if isinstance(value, bool):
            kind = ScoreConfig.DataType.BOOLEAN
        elif isinstance(value, (int, float)):
            kind = ScoreConfig.DataType.NUMERIC
        elif isinstance(value, str):
            raise _Invalid("unconfigured_categorical", "value", "a text value needs a categorical score config for "
                           "this name (admin: Score configs)")
        else:
            raise _Invalid("invalid_type", "value", "must be a number, true/false or a category")
    if kind == ScoreConfig.DataType.BOOLEAN:
        if isinstance(value, bool):
            return kind, float(value), "true" if value else "false"
        if isinstance(value, (int, float)) and value in (0, 1):
            return kind, float(value), "true" if value else "false"
        raise _Invalid("wrong_type", "value", "this score is boolean: send true or false")
    if kind == ScoreConfig.DataType.CATEGORICAL:
        if not isinstance(value, str):
            raise _Invalid("wrong_type", "value", "this score is categorical: send one of its categories")
        categories = list(config.categories or ()) if config else []
        if value not in categories:
            raise _Invalid("unknown_category", "value", f"not a category of this score; one of {', '.join(categories)}")
        return kind, float(categories.index(value)), value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid("wrong_type", "value", "this score is numeric: send a number")
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid("invalid_value", "value", "must be a finite number")
    if config is not None:
        if config.min_value is not None and number < config.min_value:
            raise _Invalid("out_of_range", "value", f"below this score's minimum ({config.min_value:g})")
        if config.max_value is not None and number > config.max_value:
            raise _Invalid("out_of_range", "value", f"above this score's maximum ({config.max_value:g})")
    return kind, number, None


def _row(raw: Any, *, project: Project, configs: dict[str, ScoreConfig], source: str, author: str | None,
         now: datetime, drop_text: bool) -> dict:
    if not isinstance(raw, dict):
        raise _Invalid("invalid_type", None, "a score must be a JSON object")
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise _Invalid("unknown_field", unknown[0], f"unknown field; allowed: {', '.join(sorted(_FIELDS))}")
    score_id = _text(raw, "id", MAX_ID) or str(uuid.uuid4())
    name = _text(raw, "name", MAX_NAME)
    if name is None:
        raise _Invalid("missing_field", "name", "a score needs a name")
    if "value" not in raw or raw["value"] is None:
        raise _Invalid("missing_field", "value", "a score needs a value")
    targets = {t: _text(raw, t, _TARGET_LIMITS[t]) for t in _TARGETS}
    if not any(targets.values()):
        raise _Invalid("missing_target", "trace_id", "give a span_id, trace_id or session_id")
    given_source = _text(raw, "source", 12)
    if given_source is not None and given_source not in SOURCES:
        raise _Invalid("invalid_value", "source", f"one of {', '.join(SOURCES)}")
    data_type, value, string_value = _typed_value(raw["value"], configs.get(name))
    comment = raw.get("comment")
    if comment is not None:
        if not isinstance(comment, str):
            raise _Invalid("invalid_type", "comment", "must be a string")
        if len(comment) > MAX_COMMENT:
            raise _Invalid("too_long", "comment", f"at most {MAX_COMMENT} characters")
        comment = comment.replace("\x00", "\ufffd") or None
    comment_pii = raw.get("comment_pii", False)
    if not isinstance(comment_pii, bool):
        raise _Invalid("invalid_type", "comment_pii", "must be true or false")
    row = {
        "project_id": project.id, "score_id": score_id, "name": name, "data_type": data_type, "value": value,
        "string_value": string_value, "comment": comment, "comment_pii": comment_pii,
        "source": given_source or source, "author": author, "created_at": _timestamp(raw, now), "received_at": now,
        **targets,
    }
    _scan_comment(row, drop_text=drop_text)
    return row


def _scan_comment(row: dict, *, drop_text: bool) -> None:
    """PII in a comment is redacted (dropped in a drop-mode project) before it is stored, like a span's prompt."""
    if not row["comment"]:
        return
    try:
        result = scanner().scan(row["comment"], redact=not drop_text, injection=False)
    except Exception:  # noqa: BLE001 - a comment nobody could scan is not stored
        log.exception("scanning the comment of score %s failed; comment withheld", row["score_id"])
        row["comment"] = None
        return
    if result.pii_detected:
        row["comment_pii"] = True
        row["comment"] = None if drop_text else result.redacted
    elif row["comment_pii"] and drop_text:
        row["comment"] = None  # the client redacted it already (the SDK does); drop mode keeps none of it


def scores_ingest(*, project: Project, items: list[Any], source: str = "api", author: str | None = None) -> ScoresResult:
    """Validate and store a batch; invalid items are listed, valid ones stored, re-sent ids counted as duplicates."""
    now = datetime.now(timezone.utc)
    names = {item["name"].strip() for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)
             and "\x00" not in item["name"]}  # PostgreSQL cannot even compare a NUL; such names are refused below
    configs = {c.name: c for c in ScoreConfig.objects.filter(project=project, name__in=names)}
    drop_text = project.redaction_mode == Project.Redaction.DROP
    result = ScoresResult()
    rows: dict[str, dict] = {}
    for index, raw in enumerate(items):
        try:
            row = _row(raw, project=project, configs=configs, source=source, author=author, now=now,
                       drop_text=drop_text)
        except _Invalid as exc:
            raw_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            result.rejected.append(ScoreRejection(index, raw_id, exc.rule, exc.field, exc.reason))
            continue
        result.ids.append(row["score_id"])
        if row["score_id"] in rows:
            result.duplicates += 1  # the same id twice in one batch: the first one counts
        else:
            rows[row["score_id"]] = row
    if rows:
        stored = scores_store(rows=list(rows.values()))
        result.duplicates += len(rows) - len(stored)
        for row in rows.values():
            if row["score_id"] in stored and row["data_type"] != ScoreConfig.DataType.CATEGORICAL:
                SCORES.labels(_name_label(row["name"]), row["source"]).observe(row["value"])
    result.accepted = len(result.ids)
    return result


_COLUMNS = ("project_id", "score_id", "name", "data_type", "value", "string_value", "comment", "comment_pii",
            "source", "author", "trace_id", "span_id", "session_id", "created_at", "received_at")


def scores_store(*, rows: list[dict]) -> set[str]:
    """Insert the rows whose (project, score_id) is new; returns the ids stored now."""
    placeholders = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    stored: set[str] = set()
    with transaction.atomic(), connection.cursor() as cur:
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            cur.execute(
                f"INSERT INTO ingest_score ({', '.join(_COLUMNS)}) VALUES {', '.join([placeholders] * len(chunk))} "
                "ON CONFLICT (project_id, score_id) DO NOTHING RETURNING score_id",
                [row[c] for row in chunk for c in _COLUMNS],
            )
            stored.update(r[0] for r in cur.fetchall())
    return stored


def score_delete(*, project_id: int, score_id: str) -> bool:
    deleted, _ = Score.objects.filter(project_id=project_id, score_id=score_id).delete()
    return bool(deleted)


def scores_delete_expired(*, today: datetime | None = None) -> int:
    """Retention for scores: older than RETENTION_DAYS, or a project's shorter retention_days."""
    today_date = (today or datetime.now(timezone.utc)).date()

    def cutoff(days: int) -> datetime:
        return datetime.combine(today_date - timedelta(days=days), time.min, tzinfo=timezone.utc)

    deleted = delete_batched(
        "DELETE FROM ingest_score WHERE id = ANY(ARRAY("
        f"SELECT id FROM ingest_score WHERE created_at < %s LIMIT {DELETE_BATCH}))",
        [cutoff(settings.RETENTION_DAYS)])
    for project_id, days in Project.objects.filter(retention_days__lt=settings.RETENTION_DAYS).values_list(
            "id", "retention_days"):
        deleted += delete_batched(
            "DELETE FROM ingest_score WHERE id = ANY(ARRAY(SELECT id FROM ingest_score "
            f"WHERE project_id = %s AND created_at < %s LIMIT {DELETE_BATCH}))", [project_id, cutoff(days)])
    return deleted
