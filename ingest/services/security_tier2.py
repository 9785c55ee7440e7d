"""Tier-2 (semantic) prompt-injection flags, raised by a worker after the spans are stored.

After each commit, one task per project and chunk names the new spans whose prompt tier 1
did not flag (injection_tier2_enqueue, called from embeddings_enqueue). The worker reads
their stored prompts (already redacted), classifies each distinct prompt once
(ingest.services.injection_classifier; the vector of a prompt that has one in
ingest_embedding is reused), and flags the spans of the prompts at or over the threshold:
injection_attempt set, "semantic_injection" added to matched_patterns, the hourly roll-up's
`injections` and the metrics counted by tier.

While the worker keeps up every prompt is read; a task that starts more than
INJECTION_TIER2_MAX_LAG_SECONDS after its spans were committed reads only a deterministic
sample (INJECTION_TIER2_SAMPLE_RATE of the span ids), so a backlog drains instead of growing.
A retried task changes nothing twice: a span is updated (and counted) only while it is not
flagged, and only if its prompt is still the one that was classified.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone

import numpy as np
import orjson
from django.conf import settings
from django.db import connection, transaction

from ingest.metrics import metrics_record_injection_tier2
from ingest.services.embeddings import MODEL_NAME, content_key
from ingest.services.injection_classifier import LABEL, classifier, normalise, views
from ingest.services.rollups import rollups_change

log = logging.getLogger(__name__)

TASK_NAME = "enrichment.classify_injections"
# Span ids per task: a bounded message and a bounded transaction.
CHUNK = 500


def enabled() -> bool:
    return bool(getattr(settings, "INJECTION_TIER2_ENABLED", True))


def _sampled(span_id: str, rate: float) -> bool:
    """Deterministic per span id, independent of the embedding sample (another salt)."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    digest = hashlib.sha256(b"tier2:" + span_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2 ** 64


def injection_tier2_tasks(*, rows: list[dict], committed_at: datetime) -> list[dict]:
    """The task arguments for freshly stored rows: their project, span ids and time range, by chunk.
    Rows without a span id (updates that only name a prompt hash) or already flagged are left out."""
    by_project: dict[int, list[dict]] = {}
    for row in rows:
        if row.get("span_id") and row.get("prompt") and not row.get("injection_attempt"):
            by_project.setdefault(row["project_id"], []).append(row)
    tasks = []
    for project_id, items in sorted(by_project.items()):
        items.sort(key=lambda r: r["span_id"])
        for i in range(0, len(items), CHUNK):
            chunk = items[i:i + CHUNK]
            times = [r["timestamp_utc"] for r in chunk]
            tasks.append({"project_id": project_id, "span_ids": [r["span_id"] for r in chunk],
                          "start": min(times).isoformat(), "end": max(times).isoformat(),
                          "committed_at": committed_at.isoformat()})
    return tasks


def injection_tier2_enqueue(*, rows: list[dict]) -> None:
    """After the spans' commit: tier-2 classification of their prompts (never fails the caller)."""
    if not enabled():
        return
    try:
        tasks = injection_tier2_tasks(rows=rows, committed_at=datetime.now(timezone.utc))
        if not tasks:
            return
        from appliance.celery import app

        for kwargs in tasks:
            # By name: ingest does not import workers (the task lives there).
            app.send_task(TASK_NAME, kwargs=kwargs)
    except Exception:  # noqa: BLE001 - the spans are stored; tier 1 already ran on them
        log.exception("could not enqueue tier-2 injection classification")


_PENDING_SQL = """
    SELECT span_id, timestamp_utc, prompt FROM ingest_span
    WHERE project_id = %s AND timestamp_utc >= %s AND timestamp_utc <= %s AND span_id = ANY(%s)
      AND NOT injection_attempt AND prompt IS NOT NULL AND prompt <> ''
    ORDER BY span_id"""

# Flags the spans whose prompt is still the classified one and that no one flagged meanwhile; returns
# them as they are now, with what the roll-ups read.
_FLAG_SQL = f"""
    UPDATE ingest_span s SET injection_attempt = true,
        matched_patterns = coalesce(s.matched_patterns, '[]'::jsonb) || '["{LABEL}"]'::jsonb
    FROM jsonb_to_recordset(%s::jsonb) AS x(s text, t timestamptz, h text)
    WHERE s.project_id = %s AND s.timestamp_utc >= %s AND s.timestamp_utc <= %s
      AND s.span_id = x.s AND s.timestamp_utc = x.t AND NOT s.injection_attempt AND md5(s.prompt) = x.h
    RETURNING s.project_id, s.timestamp_utc, s.service_name, s.model, s.provider, s.status, s.prompt_tokens,
        s.completion_tokens, s.cost_usd_micro, s.latency_ms_total, s.latency_ms_ttft, s.pii_detected,
        s.injection_attempt, s.user_id, s.kind, s.duplicate_of"""
_FLAG_COLUMNS = ("project_id", "timestamp_utc", "service_name", "model", "provider", "status", "prompt_tokens",
                 "completion_tokens", "cost_usd_micro", "latency_ms_total", "latency_ms_ttft", "pii_detected",
                 "injection_attempt", "user_id", "kind", "duplicate_of")


def _stored_vectors(project_id: int, keys: list[str]) -> dict[str, np.ndarray]:
    if not keys:
        return {}
    with connection.cursor() as cur:
        cur.execute("SELECT content_key, embedding::real[] FROM ingest_embedding "
                    "WHERE project_id = %s AND content_key = ANY(%s) AND model_name = %s",
                    [project_id, keys, MODEL_NAME])
        return {key: np.asarray(vector, dtype=np.float64) for key, vector in cur.fetchall()}


def injection_tier2_classify(*, project_id: int, span_ids: list[str], start: datetime, end: datetime,
                             committed_at: datetime | None = None) -> dict:
    """Classify the prompts of these stored spans and flag the injections; returns what was done."""
    outcome = {"classified": 0, "cached": 0, "skipped_lag": 0, "flagged": 0}
    if not enabled() or not span_ids:
        return outcome
    now = datetime.now(timezone.utc)
    lag = (now - (committed_at or end)).total_seconds()
    behind = lag > float(getattr(settings, "INJECTION_TIER2_MAX_LAG_SECONDS", 60))
    with connection.cursor() as cur:
        cur.execute(_PENDING_SQL, [project_id, start, end, list(span_ids)])
        spans = cur.fetchall()
    if behind:
        rate = float(getattr(settings, "INJECTION_TIER2_SAMPLE_RATE", 0.1))
        kept = [s for s in spans if _sampled(s[0], rate)]
        outcome["skipped_lag"] = len(spans) - len(kept)
        log.info("tier 2 is %.0fs behind: %d of %d prompt(s) of project %s classified (sample)", lag, len(kept),
                 len(spans), project_id)
        spans = kept
    if not spans:
        metrics_record_injection_tier2(outcomes=outcome, flagged_services=[], seconds=None)
        return outcome

    # One classification per distinct prompt; the stored vector of a prompt embedded for search is its
    # first window's, when normalising leaves the prompt as it is (the embedder reads the raw prompt).
    prompts = sorted({prompt for _, _, prompt in spans})
    keys = {p: content_key(p) for p in prompts}
    texts = [normalise(p) for p in prompts]
    stored = _stored_vectors(project_id, sorted({keys[p] for p, t in zip(prompts, texts) if t == p}))
    known = {i: stored[keys[p]] for i, (p, t) in enumerate(zip(prompts, texts)) if t == p and keys[p] in stored}
    clf = classifier()
    started = time.perf_counter()
    scores = dict(zip(prompts, clf.predict_windows([views(p) for p in prompts], known)))
    seconds = time.perf_counter() - started
    cached_prompts = {prompts[i] for i in known}
    for _, _, prompt in spans:
        outcome["cached" if prompt in cached_prompts else "classified"] += 1

    hits = [{"s": span_id, "t": ts.isoformat(), "h": hashlib.md5(prompt.encode("utf-8")).hexdigest()}
            for span_id, ts, prompt in spans if scores[prompt] >= clf.threshold]
    services: list[str | None] = []
    if hits:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(_FLAG_SQL, [orjson.dumps(hits).decode(), project_id, start, end])
            changes = []
            for values in cur.fetchall():
                after = dict(zip(_FLAG_COLUMNS, values))
                changes.append(({**after, "injection_attempt": False}, after))
                services.append(after["service_name"])
            # Only what this run flagged: a retry finds the spans flagged and counts nothing again.
            rollups_change(cur, changes)
        outcome["flagged"] = len(services)
    metrics_record_injection_tier2(outcomes=outcome, flagged_services=services, seconds=seconds)
    if services:
        log.info("tier 2 flagged %d span(s) of project %s as prompt injection (%s, threshold %.3f)",
                 len(services), project_id, clf.version, clf.threshold)
    return outcome

