"""Server-side PII and injection scanning with the patterns of the DetectionPattern table.

Runs inside spans_prepare, before anything is stored or produced to Kafka, so
PII never reaches disk unredacted. Every process rebuilds its scanner within
CONFIG_REFRESH_SECONDS of an admin edit (a digest of the table is checked).
"""

from __future__ import annotations

import logging

from instrumentation_sdk.scanning import PatternSpec, ScanResult, Scanner, default_patterns

from ingest.services.refresh import TableCache

log = logging.getLogger(__name__)

SCANNED_FIELDS = ("prompt", "response", "error_message")


def _build() -> Scanner:
    from ingest.models import DetectionPattern

    rows = list(DetectionPattern.objects.all())
    if not rows:
        # Never loaded (a fresh database): the shipped defaults, rather than no scanning at all.
        return Scanner.from_mappings(default_patterns())
    specs = [
        PatternSpec(name=r.name, type=r.type, regex=r.regex, phrases=tuple(r.phrases), validator=r.validator,
                    placeholder=r.placeholder, anchors=tuple(r.anchors))
        for r in rows if r.enabled
    ]
    return Scanner(specs)


_cache = TableCache("ingest_detectionpattern", _build)


def scanner() -> Scanner:
    return _cache.get()


def scanner_reset() -> None:
    _cache.reset()


def scan_text(text: str) -> ScanResult:
    return scanner().scan(text)


def scan_row(row: dict, *, drop_text: bool) -> None:
    """Scan and redact a span row in place; a scanner failure marks it unscanned, never raises."""
    row["pii_detected"] = bool(row.get("pii_detected"))
    row["injection_attempt"] = bool(row.get("injection_attempt"))
    row["matched_patterns"] = None
    if drop_text and row["pii_detected"]:
        # The client found PII and already redacted it (the SDK does): nothing is left for our
        # patterns to find, but a project in drop mode keeps no text of such a span.
        for name in SCANNED_FIELDS:
            row[name] = None
    try:
        engine = scanner()
        pii = injection = False
        matched: set[str] = set()
        for name in SCANNED_FIELDS:
            text = row.get(name)
            if not text:
                continue
            result = engine.scan(text, redact=not drop_text)
            if result.pii_detected:
                pii = True
                row[name] = None if drop_text else result.redacted
            injection = injection or result.injection_attempt
            matched.update(result.matched)
        row["pii_detected"] = row["pii_detected"] or pii
        row["injection_attempt"] = row["injection_attempt"] or injection
        row["matched_patterns"] = sorted(matched) or None
        row["scan_status"] = "ok"
    except Exception:  # noqa: BLE001 - ingestion goes on; the span says it was not scanned
        log.exception("scanning span %s failed; stored unscanned", row.get("span_id"))
        row["scan_status"] = "error"
