"""Server-side PII and injection scanning with the patterns of the DetectionPattern table.

Runs inside spans_prepare, before anything is stored or produced to Kafka, so
PII never reaches disk unredacted. Every process rebuilds its scanner within
CONFIG_REFRESH_SECONDS of an admin edit (a digest of the table is checked).
"""

from __future__ import annotations

import bisect
import logging

import orjson

from instrumentation_sdk.scanning import ScanResult, Scanner, default_patterns

from ingest.schemas import MAX_DEPTH
from ingest.services.refresh import TableCache

log = logging.getLogger(__name__)


def _build() -> Scanner:
    from django.conf import settings

    from ingest.models import DetectionPattern

    regions = getattr(settings, "PII_PHONE_REGIONS", None)
    rows = list(DetectionPattern.objects.all())
    if not rows:
        # Never loaded (a fresh database): the shipped defaults, rather than no scanning at all.
        return Scanner.from_mappings(default_patterns(), phone_regions=regions)
    return Scanner([r.spec() for r in rows if r.enabled], phone_regions=regions)


_cache = TableCache("ingest_detectionpattern", _build)


def scanner() -> Scanner:
    return _cache.get()


def scanner_reset() -> None:
    _cache.reset()


def scan_text(text: str) -> ScanResult:
    return scanner().scan(text)


# What a span carries that a user, a model or a tool wrote: redacted (or dropped) when it holds PII.
CONTENT_FIELDS = ("prompt", "response", "error_message")
SCANNED_FIELDS = CONTENT_FIELDS  # the name older callers know
# Free-text labels (a span's name, its endpoint): kept, with the PII in them replaced.
LABEL_FIELDS = ("name", "endpoint")

# Metadata is walked within these bounds: a value past them is not stored as sent (it could hold PII
# nobody looked at) but replaced with UNSCANNED, and the row says how many in UNSCANNED_KEY.
# As deep as a span may nest at all (deeper ones are refused by spans_prepare before they get here).
MAX_METADATA_DEPTH = MAX_DEPTH
MAX_METADATA_CHARS = 1_000_000
MAX_METADATA_VALUES = 10_000
# Integers this long may be a phone, card or account number sent as a number.
_NUMBER_SCANNED_FROM = 10**6
REDACTED = "[REDACTED]"  # a metadata value or label with PII in a project in drop mode
UNSCANNED = "[NOT SCANNED]"
UNSCANNED_KEY = "llm_observe.unscanned_values"
# Between the values of one combined scan: a line of its own that no PII pattern consumes.
_SEPARATOR = "\n|\n"
# Metadata the appliance writes itself and reads back (kinds, scopes, duplicates): kept when scanning fails.
_OWN_PREFIXES = ("otel.", "llm_observe.")
# How many nested JSON documents in strings (JSON in a string in JSON...) are read value by value.
_MAX_JSON_NESTING = 4

# Off only in tests/performance/bench_ingest.py, to measure what scanning metadata costs.
SCAN_METADATA = True

# Short values in which the scanner found nothing, by scanner: most metadata repeats from span to span
# (scopes, kinds, resource attributes, model names, URLs) and is not scanned again. Emptied when full.
_CLEAN_TEXT_CHARS = 256
_CLEAN_TEXTS = 8192
_clean: tuple[Scanner | None, set[str]] = (None, set())


def _clean_texts(engine: Scanner) -> set[str]:
    global _clean
    known_engine, texts = _clean
    if known_engine is not engine:  # the patterns changed: what was clean may not be
        _clean = (engine, texts := set())
    elif len(texts) >= _CLEAN_TEXTS:
        texts.clear()
    return texts


class _Walk:
    """The strings (and long integers) of labels and metadata, within the bounds, with their paths."""

    def __init__(self) -> None:
        self.leaves: list[tuple[tuple, str]] = []
        self.unscanned: list[tuple] = []  # paths of values past the bounds
        self.chars = 0

    def visit(self, value, path: tuple, depth: int) -> None:
        if isinstance(value, str):
            if not value:
                return
            if self.chars + len(value) > MAX_METADATA_CHARS or len(self.leaves) >= MAX_METADATA_VALUES:
                self.unscanned.append(path)
                return
            self.chars += len(value)
            self.leaves.append((path, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= _NUMBER_SCANNED_FROM and len(self.leaves) < MAX_METADATA_VALUES:
                self.leaves.append((path, str(value)))
        elif isinstance(value, (dict, list)):
            if depth >= MAX_METADATA_DEPTH:
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


class _Verdict:
    """What the scans of one row found."""

    __slots__ = ("pii", "injection", "matched")

    def __init__(self) -> None:
        self.pii = self.injection = False
        self.matched: set[str] = set()

    def add(self, result: ScanResult) -> None:
        self.pii = self.pii or result.pii_detected
        self.injection = self.injection or result.injection_attempt
        self.matched.update(result.matched)


def _scan_texts(engine: Scanner, texts: list[str], verdict: _Verdict, *, drop: bool) -> dict[str, str]:
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
    found = engine.scan(_SEPARATOR.join(texts), redact=False)
    hit: set[int] = set()
    for m in found.matches:
        i = max(0, bisect.bisect_right(starts, m.start) - 1)
        while i < len(texts) and starts[i] < max(m.end, m.start + 1):  # every text the match touches
            hit.add(i)
            i += 1
    clean = _clean_texts(engine)
    clean.update(text for i, text in enumerate(texts) if i not in hit and len(text) <= _CLEAN_TEXT_CHARS)
    if not hit:
        return {}
    replacements = {}
    for i in sorted(hit):
        result = engine.scan(texts[i], redact=not drop)
        verdict.add(result)
        if result.pii_detected:
            replacements[texts[i]] = REDACTED if drop else result.redacted
    return replacements


def _escaped_json(text: str):
    """The parsed object or array of a JSON document whose text has escapes (None otherwise).

    Its values are then scanned once more one by one: an escape hides from a scan of the text what the
    value shows ("...\\nSSN=..." reads as "nSSN", "\\u00e9" is no letter). Without escapes the text is
    the values with their keys around them, and the scan of the text has seen all there is.
    """
    if "\\" not in text or not (text[:1] in ("[", "{") or text.lstrip()[:1] in ("[", "{")):
        return None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, (dict, list)) else None


def _scan_json_values(engine: Scanner, doc, verdict: _Verdict, *, drop: bool, nesting: int):
    """The document with the values that hold PII redacted (the same object when none does)."""
    holder = {"metadata": {"": doc}}
    _scan_values(engine, holder, {}, verdict, drop=drop, labels=(), nesting=nesting + 1)
    return holder["metadata"][""]


def _scan_values(engine: Scanner, row: dict, known: dict[str, ScanResult], verdict: _Verdict, *, drop: bool,
                 labels: tuple[str, ...] = LABEL_FIELDS, nesting: int = 0) -> None:
    """Labels and metadata values of a row, scanned and redacted in place.

    `known`: the content fields' texts and results; a value repeating one (OpenInference's input.value
    is often the prompt itself) takes its verdict instead of being scanned again.
    """
    walk = _Walk()
    for name in labels:
        walk.visit(row.get(name), (name,), 0)
    metadata = row.get("metadata")
    if SCAN_METADATA and metadata:
        walk.visit(metadata, ("metadata",), 0)
    if not walk.leaves and not walk.unscanned:
        return
    clean = _clean_texts(engine)
    replacements = _scan_texts(
        engine, list(dict.fromkeys(t for _, t in walk.leaves if t not in known and t not in clean)), verdict, drop=drop)
    for text, result in known.items():
        if result.pii_detected:
            replacements[text] = REDACTED if drop else result.redacted

    def put(path: tuple, value) -> None:
        nonlocal metadata
        if path[0] == "metadata":
            metadata = _replace(metadata, path[1:], value)
        else:
            row[path[0]] = value

    for path, text in walk.leaves:
        value = replacements.get(text, text)
        if nesting < _MAX_JSON_NESTING and value is not REDACTED and (doc := _escaped_json(value)) is not None:
            after = _scan_json_values(engine, doc, verdict, drop=drop, nesting=nesting)
            if after is not doc:
                value = orjson.dumps(after).decode()
        if value is not text:
            put(path, value)
    for path in walk.unscanned:
        put(path, UNSCANNED)
    if walk.unscanned:
        metadata = {**metadata, UNSCANNED_KEY: len(walk.unscanned)}
    if metadata is not row.get("metadata"):
        row["metadata"] = metadata


def _withhold_all(metadata: dict) -> dict:
    """Metadata of a span the scanner failed on: the appliance's own top-level values, nothing a client wrote."""
    return {key: value if isinstance(key, str) and key.startswith(_OWN_PREFIXES) and not isinstance(value, (dict, list))
            else UNSCANNED for key, value in metadata.items()}


def scan_row(row: dict, *, drop_text: bool) -> None:
    """Scan and redact a span row in place; a scanner failure marks it unscanned, never raises.

    Content (prompt, response, error message) with PII is redacted, or dropped (None) in drop mode.
    Metadata values at any depth and labels (name, endpoint) with PII are redacted, or become REDACTED in
    drop mode; metadata without PII is left as it is, not rebuilt. A string holding a JSON document is
    scanned as text and, when escapes may hide words, its values once more one by one (it stays JSON).
    The flags and pattern names say what any of them held.
    """
    row["pii_detected"] = bool(row.get("pii_detected"))
    row["injection_attempt"] = bool(row.get("injection_attempt"))
    row["matched_patterns"] = None
    if drop_text and row["pii_detected"]:
        # The client found PII and already redacted it (the SDK does): nothing is left for our
        # patterns to find, but a project in drop mode keeps no text of such a span.
        for name in CONTENT_FIELDS:
            row[name] = None
    try:
        engine = scanner()
        verdict = _Verdict()
        known: dict[str, ScanResult] = {}
        for name in CONTENT_FIELDS:
            text = row.get(name)
            if not text:
                continue
            result = known[text] = engine.scan(text, redact=not drop_text)
            verdict.add(result)
            if result.pii_detected:
                row[name] = None if drop_text else result.redacted
            if row[name] and (doc := _escaped_json(row[name])) is not None:
                field = _Verdict()
                after = _scan_json_values(engine, doc, field, drop=drop_text, nesting=0)
                verdict.injection = verdict.injection or field.injection
                verdict.matched |= field.matched
                if field.pii:
                    verdict.pii = True
                    row[name] = None if drop_text else orjson.dumps(after).decode()
        _scan_values(engine, row, known, verdict, drop=drop_text)
        row["pii_detected"] = row["pii_detected"] or verdict.pii
        row["injection_attempt"] = row["injection_attempt"] or verdict.injection
        row["matched_patterns"] = sorted(verdict.matched) or None
        row["scan_status"] = "ok"
    except Exception:  # noqa: BLE001 - ingestion goes on; the span says it was not scanned
        # The content is stored as it is (as before: the span must not be lost); metadata, which the
        # console shows less and the span does not need, keeps only the appliance's own values.
        log.exception("scanning span %s failed; stored unscanned", row.get("span_id"))
        row["scan_status"] = "error"
        if isinstance(row.get("metadata"), dict):
            row["metadata"] = _withhold_all(row["metadata"])
