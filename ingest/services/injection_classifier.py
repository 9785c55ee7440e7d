"""Tier-2 prompt-injection detection: logistic regression over the MiniLM embeddings.

Tier 1 (instrumentation_sdk.scanning) is lexical and runs inline at ingest; this tier runs
in the worker after storage (ingest.services.security_tier2), on the vectors the
appliance computes anyway, so it catches paraphrases no phrase list has and adds no
latency to ingest. The weights (384 coefficients, an intercept and a threshold) ship in
ingest/data/injection_classifier.json and are made by `manage.py
train_injection_classifier` from the labelled corpus's train split; numpy only at run time.

A prompt is classified view by view, and its probability is the highest of its views':
- its windows: its start (MiniLM reads 256 tokens) and, for a prompt of more than 80 words,
  chunks of ~40 words of consecutive sentences spread over it up to its end (at most
  INJECTION_TIER2_MAX_WINDOWS views in all): a sentence hidden in a pasted document is lost in a
  256-token window;
- its folded form when tier 1's normaliser changes it (leetspeak, homoglyphs, letter-spaced
  words): MiniLM cannot read "1gn0r3 pr3v10us" any better than a regex can;
- the text of its base64, hex and URL-encoded segments that decode to text (at most
  MAX_DECODED_VIEWS), as tier 1 rescans them.
Measured on the corpus v2 (tests/security/corpus, 1,451 train / 637 held-out items, MiniLM int8 on
2 AVX2 cores): out-of-fold recall 0.45 at 0.9 % false positives on clean train prompts; held out,
tier 2 alone finds 42 % of the injections at 1.7 % false positives on clean prompts, and raises
tier 1's recall from 0.85 to 0.91 (false positives 0.9 % -> 2.5 %). Its strength is paraphrase
(overrides, persona jailbreaks, system-prompt extraction); indirect injection in documents,
tool-call smuggling and non-English text are tier 1's.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from instrumentation_sdk._normalize import decoded_segments, normalize

from ingest.services.embeddings import DIMENSIONS, embed_texts, model_path

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "data" / "injection_classifier.json"
LABEL = "semantic_injection"  # the matched_patterns entry of a tier-2 flag
# MiniLM's max_seq_length is 256 with [CLS] and [SEP].
WINDOW_TOKENS = 254
DEFAULT_MAX_WINDOWS = 8
CHUNK_WORDS = 40
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
MAX_DECODED_VIEWS = 4

_lock = threading.Lock()
_classifier: InjectionClassifier | None = None
_tokenizer = None


def normalise(text: str) -> str:
    """What the classifier reads: NFKC (fullwidth and compatibility forms folded) without format
    characters (zero-width spaces and joiners, bidi marks). The tokenizer lowercases and ignores
    whitespace itself, so a prompt this leaves unchanged has the vector its embedding already has."""
    text = unicodedata.normalize("NFKC", text)
    if any(unicodedata.category(ch) == "Cf" for ch in text):
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return text


def _token_offsets(text: str) -> list[tuple[int, int]]:
    global _tokenizer
    if _tokenizer is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(model_path()) / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _tokenizer = tokenizer
    return _tokenizer.encode(text, add_special_tokens=False).offsets


def windows(text: str, *, max_windows: int | None = None) -> list[str]:
    """The text's start (what MiniLM reads of it, WINDOW_TOKENS tokens) and, when it is longer than
    2 x CHUNK_WORDS words, chunks of consecutive sentences of at most CHUNK_WORDS words: an instruction
    hidden in a pasted document is a sentence or two, which a 256-token window dilutes past
    recognition. At most max_windows - 1 chunks, evenly spaced over the text (always its last one)."""
    if max_windows is None:
        max_windows = int(getattr(settings, "INJECTION_TIER2_MAX_WINDOWS", DEFAULT_MAX_WINDOWS))
    first = _start(text)
    if max_windows <= 1:
        return [first]
    # A short prompt is read whole: its sentences out of context look like attacks more often than
    # they hide one (corpus v1: cross-validated recall at 1 % false positives fell from 0.50 to 0.44).
    if len(text.split()) <= 2 * CHUNK_WORDS:
        return [first]
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    chunks, current, words = [], [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if current and words + n > CHUNK_WORDS:
            chunks.append(" ".join(current))
            current, words = [], 0
        current.append(sentence)
        words += n
    chunks.append(" ".join(current))
    if len(chunks) > max_windows - 1:
        last = len(chunks) - 1
        chunks = [chunks[i] for i in sorted({round(k * last / (max_windows - 2 or 1)) for k in range(max_windows - 1)})]
    return [first, *(c for c in chunks if c != first)]


def _start(text: str) -> str:
    # A token is at least one character: a text this short fits without tokenizing it.
    if len(text) <= WINDOW_TOKENS:
        return text
    # Tokens are rarely 16 characters long (a longer word is [UNK] past 100): a huge prompt is not tokenized whole.
    head = text[:WINDOW_TOKENS * 16]
    offsets = _token_offsets(head)
    return head if len(offsets) <= WINDOW_TOKENS else head[:offsets[WINDOW_TOKENS - 1][1]]


def _plain(text: str) -> str:
    """What the tokenizer makes of a text anyway (accents stripped, lower case, whitespace)."""
    stripped = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return " ".join(stripped.lower().split())


def views(text: str, *, max_windows: int | None = None) -> list[str]:
    """What the classifier reads of one prompt: its windows (the first is the prompt's start), its
    folded form if folding changes more than the tokenizer would, its decoded segments."""
    base = normalise(text or "")
    out = windows(base, max_windows=max_windows)
    folded, changed = normalize(base)
    if changed and folded != _plain(base):
        out.append(_start(folded))
    decoded = [d for _, _, _, d in decoded_segments(base, rot13=False) if d.strip()]
    out.extend(_start(d) for d in decoded[:MAX_DECODED_VIEWS])
    return out


@dataclass(frozen=True)
class InjectionClassifier:
    coef: np.ndarray  # (384,) over unit-length MiniLM vectors
    intercept: float
    threshold: float
    version: str
    embedder: str
    metadata: dict

    @classmethod
    def from_file(cls, path: Path) -> InjectionClassifier:
        data = json.loads(path.read_text(encoding="utf-8"))
        coef = np.asarray(data["coef"], dtype=np.float64)
        if coef.shape != (DIMENSIONS,):
            raise ValueError(f"{path}: coef has shape {coef.shape}, expected ({DIMENSIONS},)")
        threshold = getattr(settings, "INJECTION_TIER2_THRESHOLD", None)
        return cls(coef=coef, intercept=float(data["intercept"]),
                   threshold=float(threshold if threshold is not None else data["threshold"]),
                   version=str(data["version"]), embedder=str(data["embedder"]),
                   metadata={k: v for k, v in data.items() if k not in ("coef", "intercept")})

    def predict_vectors(self, vectors) -> np.ndarray:
        """Injection probabilities of unit-length embeddings, shape (n, 384) -> (n,)."""
        vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, DIMENSIONS)
        return 1.0 / (1.0 + np.exp(-(vectors @ self.coef + self.intercept)))

    def predict_texts(self, texts: list[str], *, max_windows: int | None = None) -> list[float]:
        """Injection probabilities of texts (the highest of each text's views), in order."""
        return self.predict_windows([views(text, max_windows=max_windows) for text in texts])

    def predict_windows(self, cut: list[list[str]], known: dict[int, np.ndarray] | None = None) -> list[float]:
        """The highest probability of each text's views (windows); known[i] is the vector of text i's
        first view when it is already at hand (a stored embedding), not computed again."""
        known = known or {}
        todo = [(i, j, piece) for i, pieces in enumerate(cut) for j, piece in enumerate(pieces)
                if not (j == 0 and i in known)]
        vectors = np.asarray(embed_texts([piece for *_, piece in todo]), dtype=np.float64).reshape(-1, DIMENSIONS)
        best = np.full(len(cut), -np.inf)
        if known:
            at = sorted(known)
            best[at] = self.predict_vectors(np.stack([known[i] for i in at]))
        if todo:
            scores = self.predict_vectors(vectors)
            np.maximum.at(best, [i for i, *_ in todo], scores)
        return [float(x) for x in best]


def classifier() -> InjectionClassifier:
    """The shipped classifier (INJECTION_TIER2_WEIGHTS overrides the path), loaded once per process."""
    global _classifier
    if _classifier is None:
        with _lock:
            if _classifier is None:
                path = getattr(settings, "INJECTION_TIER2_WEIGHTS", None) or WEIGHTS_PATH
                _classifier = InjectionClassifier.from_file(Path(path))
    return _classifier


def classifier_reset() -> None:
    """Forget the loaded weights (tests, a retrained file)."""
    global _classifier
    with _lock:
        _classifier = None
