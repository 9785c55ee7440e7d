"""Embedding backends: the CTranslate2 int8 conversion against torch fp32, and the fallback (real model)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from ingest.services import embeddings
from ingest.services.embeddings import embed_texts, load_model, model_path, model_reset

TEXTS = [
    "refund my order",
    "Please give me my money back, the parcel arrived two weeks late",
    "How do I reverse a list in Python?",
    "Write a SQL query that counts orders per customer",
    "2025-03-14 12:01:33 ERROR retrying upstream call (attempt 3)",
    "Summarise this contract for the legal department. " * 40,  # cut at 256 tokens by both
]


@pytest.fixture(autouse=True)
def _fresh_model():
    model_reset()
    yield
    model_reset()  # the next test loads the configured model again


@pytest.fixture(scope="module")
def torch_fp32():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path(), device="cpu")
    return model.encode(TEXTS, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=False)


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_ctranslate2_int8_is_close_to_torch_fp32(settings, torch_fp32):
    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "auto"
    model = load_model()
    assert (model.backend, model.device, model.dtype) == ("ctranslate2", "cpu", "int8")
    vectors = embed_texts(TEXTS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cos = cosines(vectors, torch_fp32)
    assert cos.mean() >= 0.99, cos
    assert cos.min() >= 0.98, cos
    # Batching does not change a text's vector (no cross-text quantization scale).
    alone = embed_texts([TEXTS[2]])[0]
    assert cosines([alone], [vectors[2]])[0] > 0.9999


def test_auto_picks_ctranslate2_on_the_cpu_and_torch_for_bf16_or_cuda(settings):
    settings.EMBEDDING_BACKEND = "auto"
    settings.EMBEDDING_DEVICE = "cpu"
    settings.EMBEDDING_DTYPE = "auto"
    assert embeddings._choose() == ("ctranslate2", "cpu", "int8")
    settings.EMBEDDING_DTYPE = "fp32"
    assert embeddings._choose() == ("ctranslate2", "cpu", "fp32")
    settings.EMBEDDING_DTYPE = "bf16"
    assert embeddings._choose() == ("torch", "cpu", "bf16")
    settings.EMBEDDING_DEVICE = "cuda"
    settings.EMBEDDING_DTYPE = "auto"
    assert embeddings._choose() == ("torch", "cuda", "fp16")
    settings.EMBEDDING_BACKEND = "torch"
    settings.EMBEDDING_DEVICE = "cpu"
    settings.EMBEDDING_DTYPE = "int8"  # int8 is CTranslate2's: torch runs fp32
    assert embeddings._choose() == ("torch", "cpu", "fp32")


def test_falls_back_to_torch_fp32_when_the_conversion_cannot_be_built(settings, tmp_path, caplog, torch_fp32):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "auto"
    settings.EMBEDDING_CACHE_DIR = blocker / "models"  # cannot be created
    with caplog.at_level(logging.WARNING, logger="ingest.services.embeddings"):
        model = load_model()
    assert (model.backend, model.dtype) == ("torch", "fp32")
    assert any("falling back to torch fp32" in r.getMessage() for r in caplog.records)
    cos = cosines(embed_texts(TEXTS), torch_fp32)
    assert cos.min() > 0.9999


def test_a_conversion_that_fails_the_quality_check_is_not_kept(settings, tmp_path, caplog, monkeypatch):
    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "int8"
    settings.EMBEDDING_CACHE_DIR = tmp_path / "models"
    monkeypatch.setattr(embeddings, "MIN_MEAN_COSINE", 1.01)  # no quantized model can pass
    with caplog.at_level(logging.WARNING, logger="ingest.services.embeddings"):
        model = load_model()
    assert (model.backend, model.dtype) == ("torch", "fp32")
    assert any("too far from torch fp32" in r.getMessage() for r in caplog.records)
    # Nothing half-built is left to be picked up by the next start.
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]


def test_the_conversion_is_built_once_and_reused(settings, tmp_path, caplog):
    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "int8"
    settings.EMBEDDING_CACHE_DIR = tmp_path / "models"
    with caplog.at_level(logging.INFO, logger="ingest.services.embeddings"):
        first = embed_texts(TEXTS[:2])
        model_reset()
        second = embed_texts(TEXTS[:2])
    assert sum("converting the embedding model" in r.getMessage() for r in caplog.records) == 1
    (folder,) = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert (folder / "validated.json").exists()
    assert np.allclose(first, second, atol=1e-6)


def test_concurrent_callers_get_their_own_vectors(settings):
    """Web threads embed query texts at the same time as each other: no mixed-up rows."""
    from concurrent.futures import ThreadPoolExecutor

    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "int8"
    alone = [embed_texts([text])[0] for text in TEXTS]
    jobs = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))] * 3  # every rotation, three times
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(embed_texts, jobs))
    for job, vectors in zip(jobs, results):
        for text, vector in zip(job, vectors):
            assert cosines([vector], [alone[TEXTS.index(text)]])[0] > 0.9999


def test_embedding_threads_bound_the_replicas(settings):
    settings.EMBEDDING_BACKEND = "ctranslate2"
    settings.EMBEDDING_DTYPE = "int8"
    settings.EMBEDDING_THREADS = 1
    encoder = load_model().encoder
    assert encoder.model.num_encoders == 1 and encoder.pool is None
    model_reset()
    settings.EMBEDDING_THREADS = 0  # every core this process may use
    assert load_model().encoder.model.num_encoders == len(os.sched_getaffinity(0))
