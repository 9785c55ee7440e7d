"""The labelled security corpus (tests/security/corpus/corpus.jsonl), built by corpus/build_corpus.py.

    from tests.security.corpus import load
    heldout_injections = load("heldout", "injection")

Each item: id, text, kind ("pii" | "injection" | "clean"), cls, lang, format,
pii_values (raw substrings that must be redacted), split ("train" | "heldout"), family.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "corpus.jsonl"
SPLITS = ("train", "heldout")
KINDS = ("pii", "injection", "clean")


@lru_cache(maxsize=1)
def _all() -> tuple[dict, ...]:
    with CORPUS_PATH.open(encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load(split: str | None = None, kind: str | None = None) -> list[dict]:
    """Items of one split and/or kind (None: all). Returns copies, so callers may modify them."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return [dict(item, pii_values=list(item["pii_values"])) for item in _all()
            if (split is None or item["split"] == split) and (kind is None or item["kind"] == kind)]
