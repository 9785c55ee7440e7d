"""Server-side PII and injection scanning with the patterns of the DetectionPattern table.

Runs inside spans_prepare, before anything is stored or produced to Kafka, so
PII never reaches disk unredacted. Every process rebuilds its scanner within
CONFIG_REFRESH_SECONDS of an admin edit (a digest of the table is checked).
"""

from __future__ import annotations

import logging

import orjson

from instrumentation_sdk._fields import REDACTED, UNSCANNED, UNSCANNED_KEY  # noqa: F401 - also this module's names
from instrumentation_sdk._fields import Limits, Verdict, escaped_json, redact_values, scan_json_values
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
# Free-text labels (a span's name, its endpoint): kept, with the PII in them replaced.
LABEL_FIELDS = ("name", "endpoint")

# Metadata is walked within these bounds: a value past them is not stored as sent (it could hold PII
# nobody looked at) but replaced with UNSCANNED, and the row says how many in UNSCANNED_KEY.
# As deep as a span may nest at all (deeper ones are refused by spans_prepare before they get here).
# Read at each row (tests change them). The walk itself is the SDK's (instrumentation_sdk._fields).
MAX_METADATA_DEPTH = MAX_DEPTH
MAX_METADATA_CHARS = 1_000_000
MAX_METADATA_VALUES = 10_000
# Metadata the appliance writes itself and reads back (kinds, scopes, duplicates): kept when scanning fails.
_OWN_PREFIXES = ("otel.", "llm_observe.")

# Off only in tests/performance/bench_ingest.py, to measure what scanning metadata costs.
SCAN_METADATA = True


def _limits() -> Limits:
    from django.conf import settings

    return Limits(depth=MAX_METADATA_DEPTH, chars=MAX_METADATA_CHARS, values=MAX_METADATA_VALUES,
                  injection=getattr(settings, "SCAN_METADATA_INJECTION", False))


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
        verdict = Verdict()
        limits = _limits()
        known: dict[str, ScanResult] = {}
        for name in CONTENT_FIELDS:
            text = row.get(name)
            if not text:
                continue
            result = known[text] = engine.scan(text, redact=not drop_text)
            verdict.add(result)
            if result.pii_detected:
                row[name] = None if drop_text else result.redacted
            if row[name] and (doc := escaped_json(row[name])) is not None:
                field = Verdict()
                after = scan_json_values(engine, doc, field, drop=drop_text, limits=limits)
                verdict.injection = verdict.injection or field.injection
                verdict.matched |= field.matched
                if field.pii:
                    verdict.pii = True
                    row[name] = None if drop_text else orjson.dumps(after).decode()
        redact_values(engine, row, verdict, drop=drop_text, labels=LABEL_FIELDS, metadata=SCAN_METADATA,
                      known=known, limits=limits)
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
