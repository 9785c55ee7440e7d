"""Redaction of every string value of a span's free-form fields: metadata at any depth, labels, error text.

Shared by the SDK (before a span leaves the application or is written to its WAL) and the appliance
(ingest/services/scanning.py, before a row is stored, and the Kafka consumers' dead-letter topic).
No Django here: plain dicts, lists and strings, and a Scanner.

The walk is bounded (depth, total characters, number of values): a value past a bound is not kept as
sent (it could hold PII nobody looked at) but replaced with UNSCANNED, and the metadata says how many
in UNSCANNED_KEY. All values are scanned joined, in one call; only when that finds something are the
values it touched scanned one by one and redacted (REDACTED in drop mode).
"""

from __future__ import annotations

import bisect
import json
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

from .scanning import ScanResult, Scanner

try:  # faster, optional
    import orjson

    def _loads(text: str):
        return orjson.loads(text)

    def _dumps(obj) -> str:
        return orjson.dumps(obj).decode()

    _DecodeError: Any = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is in the appliance and most installs
    _loads = json.loads

    def _dumps(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    _DecodeError = ValueError


class Limits(NamedTuple):
    depth: int = 64
    chars: int = 1_000_000
    values: int = 10_000
    # Injection patterns on metadata values too (PII always). Off by default: they cost most of the
    # scanning time on JSON-heavy metadata, and the prompt, response and error message are scanned for
    # injection anyway (metadata such as traceloop.entity.input mostly repeats them).
    injection: bool = False


DEFAULT_LIMITS = Limits()
# Integers this long may be a phone, card or account number sent as a number.
_NUMBER_SCANNED_FROM = 10**6
REDACTED = "[REDACTED]"  # a metadata value or label with PII, in drop mode
UNSCANNED = "[NOT SCANNED]"
UNSCANNED_KEY = "llm_observe.unscanned_values"
# Between the values of one combined scan: a line of its own that no PII pattern consumes.
_SEPARATOR = "\n|\n"
# How many nested JSON documents in strings (JSON in a string in JSON...) are read value by value.
_MAX_JSON_NESTING = 4

# Short values in which the scanner found nothing, by scanner: most metadata repeats from span to span
# (scopes, kinds, resource attributes, model names, URLs) and is not scanned again. Emptied when full.
_CLEAN_TEXT_CHARS = 256
_CLEAN_TEXTS = 8192
_clean: Tuple[Optional[Scanner], bool, Set[str]] = (None, False, set())


def _clean_texts(engine: Scanner, injection: bool) -> Set[str]:
    global _clean
    known_engine, known_injection, texts = _clean
    if known_engine is not engine or known_injection != injection:  # what was clean may not be
        texts = set()
        _clean = (engine, injection, texts)
    elif len(texts) >= _CLEAN_TEXTS:
        texts.clear()
    return texts


class Walk:
    """The strings (and long integers) of labels and metadata, within the bounds, with their paths."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.leaves: List[Tuple[tuple, str]] = []
        self.unscanned: List[tuple] = []  # paths of values past the bounds
        self.chars = 0

    def visit(self, value, path: tuple, depth: int) -> None:
        limits = self.limits
        if isinstance(value, str):
            if not value:
                return
            if self.chars + len(value) > limits.chars or len(self.leaves) >= limits.values:
                self.unscanned.append(path)
                return
            self.chars += len(value)
            self.leaves.append((path, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= _NUMBER_SCANNED_FROM and len(self.leaves) < limits.values:
                self.leaves.append((path, str(value)))
        elif isinstance(value, (dict, list)):
            if depth >= limits.depth:
                self.unscanned.append(path)
                return
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                self.visit(child, (*path, key), depth + 1)


def _replace(root, path: tuple, value):
    """A copy of `root` with the value at `path` replaced; containers off the path are shared, not copied."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(root) if isinstance(root, dict) else list(root)
    copy[head] = _replace(root[head], rest, value)
    return copy


class Verdict:
    """What the scans of one row found."""

    __slots__ = ("pii", "injection", "matched")

    def __init__(self) -> None:
        self.pii = self.injection = False
        self.matched: Set[str] = set()

    def add(self, result: ScanResult) -> None:
        self.pii = self.pii or result.pii_detected
        self.injection = self.injection or result.injection_attempt
        self.matched.update(result.matched)


def scan_texts(engine: Scanner, texts: List[str], verdict: Verdict, *, drop: bool,
               injection: bool = False) -> Dict[str, str]:
    """{text: replacement} for the texts with PII; what they hold is added to `verdict`.

    One scan of all texts joined: most metadata holds nothing, and one call costs far less than one per
    value. Only when it finds something are the texts it found it in scanned one by one, which decides
    (a match across two values is no match) and gives each its own redaction.
    """
    if not texts:
        return {}
    starts, position = [], 0
    for text in texts:
        starts.append(position)
        position += len(text) + len(_SEPARATOR)
    found = engine.scan(_SEPARATOR.join(texts), redact=False, injection=injection)
    hit: Set[int] = set()
    for m in found.matches:
        i = max(0, bisect.bisect_right(starts, m.start) - 1)
        while i < len(texts) and starts[i] < max(m.end, m.start + 1):  # every text the match touches
            hit.add(i)
            i += 1
    clean = _clean_texts(engine, injection)
    clean.update(text for i, text in enumerate(texts) if i not in hit and len(text) <= _CLEAN_TEXT_CHARS)
    if not hit:
        return {}
    replacements = {}
    for i in sorted(hit):
        result = engine.scan(texts[i], redact=not drop, injection=injection)
        verdict.add(result)
        if result.pii_detected:
            replacements[texts[i]] = REDACTED if drop else result.redacted
    return replacements


def escaped_json(text: str):
    """The parsed object or array of a JSON document whose text has escapes (None otherwise).

    Its values are then scanned once more one by one: an escape hides from a scan of the text what the
    value shows ("...\\nSSN=..." reads as "nSSN", "\\u00e9" is no letter). Without escapes the text is
    the values with their keys around them, and the scan of the text has seen all there is.
    """
    if "\\" not in text or not (text[:1] in ("[", "{") or text.lstrip()[:1] in ("[", "{")):
        return None
    try:
        doc = _loads(text)
    except (_DecodeError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, (dict, list)) else None


def scan_json_values(engine: Scanner, doc, verdict: Verdict, *, drop: bool, nesting: int = 0,
                     limits: Limits = DEFAULT_LIMITS):
    """The document (object, array or string) with the values that hold PII redacted (the same object
    when none does). Past a bound, values become UNSCANNED (no count is added to a bare document)."""
    holder = {"metadata": {"": doc}}
    redact_values(engine, holder, verdict, drop=drop, nesting=nesting + 1, limits=limits, count_unscanned=False)
    return holder["metadata"][""]


def redact_values(engine: Scanner, row: dict, verdict: Verdict, *, drop: bool, labels: Tuple[str, ...] = (),
                  metadata: bool = True, known: Optional[Dict[str, ScanResult]] = None,
                  limits: Limits = DEFAULT_LIMITS, nesting: int = 0, count_unscanned: bool = True) -> None:
    """The string fields named in `labels` and every value of row["metadata"], scanned and redacted in place.

    `known`: texts already scanned (a row's content fields) and their results; a value repeating one
    (OpenInference's input.value is often the prompt itself) takes its verdict instead of being scanned
    again. Metadata without PII is left as it is, not rebuilt (the same object stays in the row).
    """
    known = known or {}
    walk = Walk(limits)
    for name in labels:
        walk.visit(row.get(name), (name,), 0)
    meta = row.get("metadata")
    if metadata and meta:
        walk.visit(meta, ("metadata",), 0)
    if not walk.leaves and not walk.unscanned:
        return
    clean = _clean_texts(engine, limits.injection)
    replacements = scan_texts(
        engine, list(dict.fromkeys(t for _, t in walk.leaves if t not in known and t not in clean)), verdict, drop=drop,
        injection=limits.injection)
    for text, result in known.items():
        if result.pii_detected:
            replacements[text] = REDACTED if drop else result.redacted

    def put(path: tuple, value) -> None:
        nonlocal meta
        if path[0] == "metadata":
            meta = _replace(meta, path[1:], value)
        else:
            row[path[0]] = value

    for path, text in walk.leaves:
        value = replacements.get(text, text)
        if nesting < _MAX_JSON_NESTING and value is not REDACTED:
            doc = escaped_json(value)
            if doc is not None:
                after = scan_json_values(engine, doc, verdict, drop=drop, nesting=nesting, limits=limits)
                if after is not doc:
                    value = _dumps(after)
        if value is not text:
            put(path, value)
    for path in walk.unscanned:
        put(path, UNSCANNED)
    if walk.unscanned and count_unscanned and isinstance(meta, dict):
        meta = {**meta, UNSCANNED_KEY: len(walk.unscanned)}
    if meta is not row.get("metadata"):
        row["metadata"] = meta
