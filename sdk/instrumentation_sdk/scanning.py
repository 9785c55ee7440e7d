"""PII and prompt-injection detection: one engine for the SDK and the appliance.

Phrases and regex "anchors" are found in a single Aho-Corasick pass over the
lower-cased text; a regex with anchors then runs only on windows around its
anchor hits (an e-mail regex only near an "@", a key regex only near "sk-"),
so a clean text costs one linear pass instead of every regex at every
position. Regexes without anchors run over the whole text, which is always
correct, only slower. "<digits>" as an anchor means "near a run of digits".
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache, partial
from importlib import resources
from typing import Any, Iterable, Sequence

try:  # pyahocorasick is a C extension; a pure fallback keeps the SDK importable without it
    import ahocorasick
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    ahocorasick = None

try:  # Google's libphonenumber; optional in the SDK (extra "phonenumbers"), always in the appliance
    import phonenumbers
except ImportError:  # pragma: no cover - exercised only where the package is missing
    phonenumbers = None

from instrumentation_sdk._normalize import decoded_segments, normalize

log = logging.getLogger(__name__)

PII = "PII_STRUCTURAL"
INJECTION = "INJECTION_ATTEMPT"
DIGITS_ANCHOR = "<digits>"
WINDOW = 120  # characters kept either side of an anchor hit
DIGIT_WINDOW = 48  # ... and of a run of digits (a digit pattern's match is the run and a few characters more)
_MAX_MATCH = 4096  # longest match a windowed regex may produce before we re-check it unwindowed
# How far a window's edge may move to reach whitespace. A secret (key, token, JWT) may be KBs without
# a space; a number or an address is short; an injection window only needs to finish its last word.
# Text without whitespace (compact JSON) would otherwise turn every window into several KB.
_EDGE_SECRET = _MAX_MATCH
_EDGE_DIGITS = 256
_EDGE_INJECTION = 32
_DIGIT_RUN = re.compile(r"\d[\d \-.()/+\[\]]{3,}\d")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class PatternSpec:
    name: str
    type: str
    regex: str = ""
    phrases: tuple[str, ...] = ()
    validator: str = ""
    placeholder: str = ""
    anchors: tuple[str, ...] = ()
    # Words of which one must occur within context_window characters of a match (before or
    # after) for it to count: number-only formats such as an SSN without dashes.
    context: tuple[str, ...] = ()
    context_window: int = 0  # 0: CONTEXT_WINDOW
    # Words of which none may occur within context_window characters: a match next to one of them
    # is dropped (the "tool_calls" of a framework's own message JSON, next to its "role").
    exclude_context: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "PatternSpec":
        return cls(
            name=str(data["name"]),
            type=str(data["type"]),
            regex=str(data.get("regex") or ""),
            phrases=tuple(str(p) for p in (data.get("phrases") or ())),
            validator=str(data.get("validator") or ""),
            placeholder=str(data.get("placeholder") or ""),
            anchors=tuple(str(a) for a in (data.get("anchors") or ())),
            context=tuple(str(c) for c in (data.get("context") or ())),
            context_window=int(data.get("context_window") or 0),
            exclude_context=tuple(str(c) for c in (data.get("exclude_context") or ())),
        )


@dataclass(frozen=True)
class Match:
    name: str
    type: str
    start: int
    end: int
    placeholder: str
    # "" when start/end index the scanned text; "normalized" when they index ScanResult.normalized;
    # an encoding ("base64", "hex", "url", "rot13") when the match was in a decoded segment
    # (start/end then span that encoded segment of the scanned text).
    via: str = ""


@dataclass
class ScanResult:
    pii_detected: bool = False
    injection_attempt: bool = False
    matched: list[str] = field(default_factory=list)
    redacted: str | None = None
    matches: list[Match] = field(default_factory=list)
    normalized: str | None = None  # the folded text injection patterns saw, when it differs from text.lower()


def luhn_ok(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


# Issuer prefixes (IIN ranges) and lengths of the card brands in use: a Luhn-valid order number
# that starts like no card (1, 7, 8, 9...) is not a card.
_CARD_BRANDS = re.compile(
    r"4\d{12}(?:\d{3}){0,2}"  # Visa 13/16/19
    r"|(?:5[1-5]\d\d|222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720)\d{12}"  # Mastercard
    r"|3[47]\d{13}"  # Amex
    r"|(?:6011|64[4-9]\d|65\d\d)\d{12,15}"  # Discover
    r"|35(?:2[89]|[3-8]\d)\d{12,15}"  # JCB
    r"|3(?:0[0-5]|[689]\d)\d{11,16}"  # Diners
    r"|62\d{14,17}"  # UnionPay
    r"|220[0-4]\d{12,15}"  # Mir
    r"|(?:5[06-9]|6\d)\d{10,17}"  # Maestro
)


def card_ok(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    groups = re.findall(r"\d+", text)
    # Written with separators, a card's groups are 3+ digits long ("4111 1111 1111 1111", "3782 822463
    # 10005", even "5386 23491943 8604"); a decimal number ("441.1537493493981") is not one.
    if len(groups) > 1 and (min(len(g) for g in groups[:-1]) < 3 or (len(groups) == 2 and "." in text)):
        return False
    return luhn_ok(digits) and _CARD_BRANDS.fullmatch(digits) is not None


# IBAN length by country (the ISO 13616 registry): a code that is not there, or the wrong length, is no IBAN
# (hex ids and UUIDs pass mod-97 one time in 97).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}


def iban_ok(text: str) -> bool:
    groups = [g for g in re.split(r"[\s.\-]+", text.strip()) if g]
    if len(groups) > 1 and len(groups[0]) == 2:  # "DE 89 3704 ...", "PL 7938604..."
        groups = [groups[0] + groups[1], *groups[2:]]
    if len(groups) > 1 and any(len(g) != 4 for g in groups[:-1]):
        return False  # written in fours ("DE89 3704 ..."); a UUID's 8-4-4 head is an id
    compact = "".join(groups).upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def aba_ok(text: str) -> bool:
    """ABA routing transit number: 9 digits, 3-7-1 weighted checksum, a Federal Reserve prefix."""
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) != 9 or len(set(digits)) == 1:
        return False
    prefix = digits[0] * 10 + digits[1]
    if not (prefix <= 12 or 21 <= prefix <= 32 or 61 <= prefix <= 72 or prefix == 80):
        return False
    return sum(w * d for w, d in zip((3, 7, 1) * 3, digits)) % 10 == 0


def phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


def ipv4_ok(text: str) -> bool:
    """Four octets 0-255; written with spaces around the dots, at least two must have 2+ digits
    (a numbered list "1. 2. 3. 4" is not an address)."""
    octets = re.findall(r"\d+", text)
    if len(octets) != 4 or any(int(o) > 255 or len(o) > 3 for o in octets):
        return False
    return not (re.search(r"\s|\[|\(", text) and sum(len(o) > 1 for o in octets) < 2)


DEFAULT_PHONE_REGIONS = (
    "US", "CA", "GB", "IE", "DE", "AT", "CH", "FR", "BE", "NL", "LU", "ES", "PT", "IT", "PL", "CZ", "SE", "NO",
    "DK", "FI", "IN", "AU", "NZ", "BR", "MX", "AR", "JP", "KR", "CN", "SG", "HK", "ZA", "IL", "AE", "TR", "PH",
)
# Today's shapes, used when the phonenumbers library is not installed: an international number,
# or a North American one with its usual punctuation.
_LEGACY_PHONE = re.compile(
    r"(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})"
)
_NANP_SHAPE = re.compile(r"(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}")
_IN_SHAPE = re.compile(r"(?:91[ -]?)?[6-9]\d{4}[ -]?\d{5}")
_DATE_SHAPE = re.compile(r"\d{1,4}([./-])\d{1,2}\1\d{1,4}|\d{1,2}[:.]\d{2}(?:[:.]\d{2})?")
_ISO_DATE_HEAD = re.compile(r"(?:19|20)\d\d([-/.])[01]\d\1[0-3]\d(?!\d)")  # "2026-12-03 20…": a date and an hour


@lru_cache(maxsize=4096)
def _phone_verdict(value: str, regions: tuple[str, ...], with_context: bool) -> bool:
    digits = "".join(c for c in value if c.isdigit())
    if not 7 <= len(digits) <= 15 or _DATE_SHAPE.fullmatch(value) or _ISO_DATE_HEAD.match(value):
        return False
    if phonenumbers is None:
        return _LEGACY_PHONE.fullmatch(value) is not None
    grouped = not value.isdigit()
    if value.startswith("+") or value.startswith("00"):
        # The number's own country code first: the regions list does not apply to it.
        try:
            number = phonenumbers.parse("+" + (digits[2:] if value.startswith("00") else digits), None)
        except phonenumbers.NumberParseException:
            return False
        return phonenumbers.is_valid_number(number) or (
            grouped and len(digits) >= 10 and phonenumbers.is_possible_number(number) and with_context)
    if digits[0] == "0":
        if not grouped and len(digits) < 10 and not with_context:
            return False  # "021000021": a reference number, not a phone number written without spaces
        candidates = [r for r in regions if phonenumbers.ndd_prefix_for_region(r, True) == "0"]
    elif _NANP_SHAPE.fullmatch(value):
        # Indian mobiles are written 3-3-4 too ("638-657-0890").
        candidates = [r for r in regions if r in ("US", "CA", "IN")] or ["US"]
    elif _IN_SHAPE.fullmatch(value):
        # Indian mobiles: 10 digits from 6-9, often unspaced, sometimes with a bare 91 in front.
        candidates = [r for r in regions if r == "IN"]
        digits = digits[-10:]
    elif with_context:
        candidates = list(regions)
    else:
        return False
    for region in candidates:
        try:
            number = phonenumbers.parse(digits, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
        # Reserved fictional ranges (Ofcom's 07700 900xxx) are well-formed numbers libphonenumber
        # calls invalid; a grouped, full-length national number with a trunk 0 is still a phone number.
        if digits[0] == "0" and grouped and len(digits) >= 10 and phonenumbers.is_possible_number(number):
            return True
    return False


def phonenumber_ok(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> bool:
    """A valid phone number of one of the regions (libphonenumber): international (+CC / 00CC),
    national with a trunk 0, or North American / Indian grouping."""
    return _phone_verdict(text.strip(), tuple(regions), False)


def phonenumber_any_ok(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> bool:
    """Like phonenumber, and also a bare national number valid in any of the regions: for a
    pattern whose `context` ("phone", "tel", "mobile"...) vouches for it."""
    return _phone_verdict(text.strip(), tuple(regions), True)


VALIDATORS = {"luhn": luhn_ok, "card": card_ok, "iban": iban_ok, "aba": aba_ok, "phone": phone_ok, "ipv4": ipv4_ok,
              "phonenumber": phonenumber_ok, "phonenumber_any": phonenumber_any_ok}
_REGION_VALIDATORS = {"phonenumber", "phonenumber_any"}
_ESCAPES = re.compile(r"\\.")  # \W, \S, \D... are classes, not capitals
_CAPITALS = re.compile(r"[A-Z]")
CONTEXT_WINDOW = 40  # characters either side of a match searched for a context word
_TRIM_POINTS = re.compile(r"[\s.\-/]+")
_MAX_TRIMS = 3


class _Compiled:
    __slots__ = ("spec", "regex", "validator", "placeholder", "windowed", "context", "exclude", "context_window",
                 "injection", "checked", "edge")

    def __init__(self, spec: PatternSpec, phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> None:
        self.spec = spec
        self.injection = spec.type == INJECTION
        # Injection patterns run on lower-cased (normalised) text: without IGNORECASE the regex engine
        # can skip ahead by first characters (3-4x faster), unless the regex itself has capitals.
        flags = 0 if self.injection and not _CAPITALS.search(_ESCAPES.sub("", spec.regex)) else re.IGNORECASE
        self.regex = re.compile(spec.regex, flags) if spec.regex else None
        if spec.validator and spec.validator not in VALIDATORS:
            raise ValueError(f"pattern {spec.name}: unknown validator {spec.validator!r}")
        validator = VALIDATORS.get(spec.validator)
        if spec.validator in _REGION_VALIDATORS:
            validator = partial(validator, regions=tuple(phone_regions))
        self.validator = validator
        self.placeholder = spec.placeholder or spec.name.upper()
        self.windowed = bool(spec.anchors)
        self.edge = _EDGE_INJECTION if self.injection else _EDGE_SECRET
        self.context = _words_regex(spec.context)
        self.exclude = _words_regex(spec.exclude_context)
        self.context_window = spec.context_window or CONTEXT_WINDOW
        self.checked = bool(self.validator or self.context or self.exclude or self.injection)

    def accept(self, text: str, lower: str, start: int, end: int) -> int:
        """The end of the accepted match (maybe trimmed), or -1: validator and context checked."""
        if self.validator is not None and not self.validator(text[start:end]):
            # A greedy candidate may have run into the next number ("+44 20 7946 0958 5 items"):
            # retry without its last groups, cut where a separator is.
            cuts = [m.start() for m in _TRIM_POINTS.finditer(text, start, end) if m.start() > start]
            for cut in reversed(cuts[-_MAX_TRIMS:]):
                if self.validator(text[start:cut]):
                    end = cut
                    break
            else:
                return -1
        if self.context is not None or self.exclude is not None:
            window = lower[max(0, start - self.context_window):min(len(lower), end + self.context_window)]
            if self.context is not None and not self.context.search(window):
                return -1
            if self.exclude is not None and self.exclude.search(window):
                return -1
        if self.injection and _quoted(text, start, end):
            return -1
        return end


def _words_regex(words: Sequence[str]) -> re.Pattern | None:
    """Whole words, plurals too ("SSN:", "SSNs"; "tin" but not "tiny")."""
    escaped = [re.escape(w.lower()) for w in words if w.strip()]
    return re.compile(rf"(?<![^\W_])(?:{'|'.join(escaped)})(?:e?s)?(?![^\W_])") if escaped else None


_QUOTES = {"'": "'", '"': '"', "`": "`", "\u2018": "\u2019", "\u201c": "\u201d", "\u00ab": "\u00bb", "\u201e": "\u201c"}


def _quoted(text: str, start: int, end: int) -> bool:
    """An injection phrase quoted on its own ('ignore previous instructions') is a mention (a filter
    to write, a question about it), not an instruction; a quote that goes on ("...and do X") is not."""
    before = text[max(0, start - 2):start].rstrip()
    if not before or before[-1] not in _QUOTES:
        return False
    closing = _QUOTES[before[-1]]
    after = text[end:end + 3]
    return closing in after and after.index(closing) <= 1 and not any(c.isalnum() for c in after[:after.index(closing)])


class Scanner:
    """Built once from pattern specs; `scan` is thread-safe (no shared mutable state).

    PII patterns run on the text itself (redaction needs its offsets); injection patterns run
    on its normalised form (see _normalize), and again on decoded base64/hex/URL/rot13 segments.
    """

    def __init__(self, specs: Iterable[PatternSpec], *, phone_regions: Sequence[str] | None = None) -> None:
        regions = tuple(phone_regions) if phone_regions else DEFAULT_PHONE_REGIONS
        self.patterns = [_Compiled(spec, regions) for spec in specs]
        names = [p.spec.name for p in self.patterns]
        if len(names) != len(set(names)):
            raise ValueError("pattern names must be unique")
        self._digit_set = frozenset(i for i, p in enumerate(self.patterns) if DIGITS_ANCHOR in p.spec.anchors)
        self._injection = [i for i, p in enumerate(self.patterns) if p.injection]
        self._pii = [i for i, p in enumerate(self.patterns) if not p.injection]
        self._all = list(range(len(self.patterns)))
        self._literals_all = _Literals(self.patterns, self._all)
        self._literals_pii = _Literals(self.patterns, self._pii)
        self._literals_injection = _Literals(self.patterns, self._injection)

    @classmethod
    def from_mappings(cls, rows: Iterable[dict[str, Any]], **options: Any) -> "Scanner":
        return cls((PatternSpec.from_mapping(row) for row in rows), **options)

    @staticmethod
    def _bounded(text: str, start: int, end: int) -> bool:
        # A phrase that begins/ends with a letter or digit must not be part of a longer word.
        if text[start].isalnum() and start > 0 and text[start - 1].isalnum():
            return False
        if text[end - 1].isalnum() and end < len(text) and text[end].isalnum():
            return False
        return True

    # -- matching -------------------------------------------------------------
    def find(self, text: str) -> list[Match]:
        return self._find(text)[0]

    def _find(self, text: str, injection: bool = True) -> tuple[list[Match], str | None]:
        """(matches, the normalised text when injection patterns saw one that differs from text.lower()).
        injection=False: the PII patterns only (no normalising, no decoding)."""
        if not text:
            return [], None
        lower = text.lower()
        if not injection:
            return self._pass(text, lower, self._pii, self._literals_pii), None
        aligned = len(lower) == len(text)  # some characters change length when lower-cased
        normalized, changed = normalize(text) if self._injection else (lower, False)
        if not changed and aligned:
            matches = self._pass(text, lower, self._all, self._literals_all)
            normalized = None
        else:
            matches = self._pass(text, lower, self._pii, self._literals_pii)
            via = "normalized"
            if not changed:  # only the lower-casing changed lengths: match on the lower-cased text
                normalized = lower
            matches += [Match(m.name, m.type, m.start, m.end, m.placeholder, via)
                        for m in self._pass(normalized, normalized, self._injection, self._literals_injection)]
        if self._injection:
            matches += self._decoded(text, lower, depth=0)
        return matches, normalized

    def _pass(self, text: str, lower: str, indices: Sequence[int], literals: "_Literals") -> list[Match]:
        """One literal pass and the regexes of the given patterns."""
        aligned = len(lower) == len(text)
        matches: list[Match] = []
        windows: dict[int, list[tuple[int, int]]] = {}
        phrase_hit: set[int] = set()
        context_seen: set[int] = set()
        patterns = self.patterns
        for end, (length, anchors, contexts, phrases, alnum_start) in literals.hits(lower):
            start = end - length
            if contexts:
                context_seen.update(contexts)
            if not anchors:
                if not phrases:
                    continue
            # An anchor that starts with a letter or digit starts a word ("ai" not in "said").
            elif not (alnum_start and start > 0 and _ascii_alnum(lower[start - 1])):
                low, high = start - WINDOW, end + WINDOW
                for index in anchors:
                    spans = windows.get(index)
                    if spans is None:
                        windows[index] = [(low, high)]
                    # Hits come in text order: extend the last window rather than add an overlapping one.
                    elif low <= spans[-1][1]:
                        if high > spans[-1][1]:
                            spans[-1] = (spans[-1][0], high)
                    else:
                        spans.append((low, high))
            if phrases:
                if not aligned:
                    phrase_hit.update(phrases)
                elif start >= 0 and self._bounded(text, start, end):
                    for index in phrases:
                        p = patterns[index]
                        if not (p.injection and _quoted(text, start, end)):
                            matches.append(Match(p.spec.name, p.spec.type, start, end, p.placeholder))
        for index in phrase_hit:  # re-locate phrase hits on the original text
            p = self.patterns[index]
            for phrase in p.spec.phrases:
                for m in re.finditer(re.escape(phrase), text, re.IGNORECASE):
                    if self._bounded(text, m.start(), m.end()):
                        matches.append(Match(p.spec.name, p.spec.type, m.start(), m.end(), p.placeholder))
        digit_spans = None
        if aligned:
            # Only the patterns that can match: an anchor of theirs was seen, they have no anchors, or
            # they look at digits and the text has a run of them (a loop over all ~40 was most of the
            # cost of a short prompt).
            candidates = set(windows)
            candidates.update(literals.always)
            if literals.digits and _DIGIT_RUN.search(text):
                candidates.update(literals.digits)
            order: Iterable[int] = sorted(candidates)
        else:
            order = indices
        for index in order:
            p = self.patterns[index]
            if p.regex is None or (p.context is not None and index not in context_seen):
                continue  # a pattern with context words, none of which is in the text, cannot match
            if not p.windowed or not aligned:
                spans = [(0, len(text))]
            else:
                if index not in windows:
                    spans = []
                elif len(text) <= WINDOW:  # a window around any hit covers a text this short
                    spans = [(0, len(text))]
                else:
                    spans = _edged(text, windows[index], p.edge)
                if index in self._digit_set:
                    if digit_spans is None:
                        # One set of windows around digit runs, shared by every digit pattern.
                        if len(text) <= DIGIT_WINDOW:
                            digit_spans = [(0, len(text))] if _DIGIT_RUN.search(text) else []
                        else:
                            digit_spans = _edged(text, [(m.start() - DIGIT_WINDOW, m.end() + DIGIT_WINDOW)
                                                        for m in _DIGIT_RUN.finditer(text)], _EDGE_DIGITS)
                    if digit_spans:
                        spans = _merge(spans + digit_spans, len(text)) if spans else digit_spans
                if not spans:
                    continue
            for m in self._regex_matches(p, lower if p.injection else text, spans):
                end = p.accept(text, lower, m.start(), m.end()) if p.checked else m.end()
                if end >= 0:
                    matches.append(Match(p.spec.name, p.spec.type, m.start(), end, p.placeholder))
        return matches

    def _decoded(self, text: str, lower: str, depth: int) -> list[Match]:
        """Injection matches inside base64/hex/URL-encoded segments (and rot13 when the text
        speaks of it), each with an "encoded_<encoding>" match over the segment."""
        out: list[Match] = []
        cues = [i for i in (lower.find(cue) for cue in _ROT13_CUES) if i >= 0]
        for encoding, start, end, decoded in decoded_segments(text, rot13=bool(cues), rot13_from=min(cues, default=0)):
            normalized, _ = normalize(decoded)
            inner = self._pass(normalized, normalized, self._injection, self._literals_injection)
            if depth < _MAX_DECODE_DEPTH - 1:
                inner += self._decoded(decoded, decoded.lower(), depth + 1)
            if inner:
                out.append(Match(f"encoded_{encoding}", INJECTION, start, end, "", encoding))
                out.extend(Match(m.name, m.type, start, end, m.placeholder, encoding) for m in inner
                           if not m.name.startswith("encoded_"))
        return out

    @staticmethod
    def _regex_matches(p: _Compiled, text: str, spans: Sequence[tuple[int, int]]):
        last_end = -1
        for start, end in spans:
            pos = max(start, last_end)
            while pos < end:
                m = p.regex.search(text, pos, end)
                if m is None:
                    break
                if m.end() == end < len(text):
                    # The window cut the text here (a lookahead saw a false end): look again unwindowed.
                    m = p.regex.match(text, m.start()) or m
                yield m
                last_end = m.end()
                pos = m.end() if m.end() > m.start() else m.start() + 1

    def scan(self, text: str | None, *, redact: bool = True, injection: bool = True) -> ScanResult:
        """PII matches (redacted when `redact`) and, unless injection=False, injection matches."""
        if not text:
            return ScanResult(redacted=text)
        matches, normalized = self._find(text, injection)
        result = ScanResult(matches=matches, normalized=normalized)
        result.pii_detected = any(m.type == PII for m in matches)
        result.injection_attempt = any(m.type == INJECTION for m in matches)
        result.matched = sorted({m.name for m in matches})
        result.redacted = redact_text(text, matches) if redact and result.pii_detected else text
        return result


def _ascii_alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


_WORD_ENDS = tuple(" \t\n\r.,;:!?)]}'\"/-*_=#<>([{|\\@&+%~`") + ("\u2019", "\u201d", "\u00a0")
_ROT13_CUES = ("rot13", "rot-13", "rot 13", "caesar", "rotate each letter", "rotated by 13", "shift by 13", "cipher")
_MAX_DECODE_DEPTH = 2


class _Literals:
    """The phrases and anchors of some patterns, found in one Aho-Corasick pass."""

    def __init__(self, patterns: Sequence[_Compiled], indices: Iterable[int]) -> None:
        table: dict[str, list[tuple[str, int]]] = {}  # lower-cased literal -> (kind, pattern index)
        for i in indices:
            p = patterns[i]
            for phrase in p.spec.phrases:
                if phrase.strip():
                    table.setdefault(phrase.lower(), []).append(("phrase", i))
            for anchor in p.spec.anchors:
                if anchor != DIGITS_ANCHOR and anchor.strip():
                    # "mode " (a trailing space): the whole word, not "model"; "ignor": any word it starts.
                    key = anchor.lower()
                    if anchor.endswith(" ") and _ascii_alnum(anchor.rstrip()[-1]):
                        # Keyed with what may follow the word, so the literal pass never stops inside "model".
                        for end in _WORD_ENDS:
                            table.setdefault(key.rstrip() + end, []).append(("anchor", i))
                    else:
                        table.setdefault(key, []).append(("anchor", i))
            for word in p.spec.context:  # seen anywhere in the text, or the pattern is skipped
                for suffix in ("", "s", "es") if word.strip() else ():
                    for end in _WORD_ENDS:
                        table.setdefault(word.lower().strip() + suffix + end, []).append(("context", i))
        self.table = table
        # Each literal's hits grouped by kind once, so the per-hit loop in Scanner._pass does no sorting out:
        # (length, anchor indices, context indices, phrase indices, starts with an ASCII letter/digit).
        self.grouped = {key: (len(key), tuple(i for k, i in hits if k == "anchor"),
                              tuple(i for k, i in hits if k == "context"), tuple(i for k, i in hits if k == "phrase"),
                              _ascii_alnum(key[0]))
                        for key, hits in table.items()}
        # Patterns that run whatever the literal pass finds (no anchors), and those run when the text has digits.
        self.always = tuple(i for i in indices if patterns[i].regex is not None and not patterns[i].windowed)
        self.digits = tuple(i for i in indices if DIGITS_ANCHOR in patterns[i].spec.anchors)
        self.automaton = None
        if table and ahocorasick is not None:
            automaton = ahocorasick.Automaton()
            for key, value in self.grouped.items():
                automaton.add_word(key, value)
            automaton.make_automaton()
            self.automaton = automaton

    def hits(self, lower: str) -> Iterable[tuple[int, tuple]]:
        """(end of the hit, its grouped value) of every phrase/anchor occurrence in the lower-cased text: the
        text is searched with a space either side (a whole-word key ends with one of _WORD_ENDS, at the end
        of the text too), so the end index found is the end (exclusive) of the hit in the text."""
        lower = " " + lower + " "
        if self.automaton is not None:
            return self.automaton.iter(lower)
        found = []
        for key, value in self.grouped.items():
            start = lower.find(key)
            while start != -1:
                found.append((start + len(key) - 1, value))
                start = lower.find(key, start + 1)
        found.sort(key=lambda hit: hit[0])  # text order, as the automaton gives them
        return found


def _edged(text: str, windows: list[tuple[int, int]], reach: int = _MAX_MATCH) -> list[tuple[int, int]]:
    """Merged windows, widened to whitespace (at most `reach` characters) so none starts or ends inside a match."""
    if not windows:
        return []
    merged = _merge([(max(0, a), b) for a, b in windows], len(text))
    return _merge([(_left_edge(text, a, reach), _right_edge(text, b, reach)) for a, b in merged], len(text))


def _left_edge(text: str, pos: int, reach: int = _MAX_MATCH) -> int:
    """Move a window start left to a whitespace boundary, so it never begins inside a match."""
    if pos <= 0:
        return 0
    limit = max(0, pos - reach)
    # rfind per common whitespace character (C speed); other whitespace only widens the window to `limit`.
    return max(max(text.rfind(c, limit, pos) for c in " \n\t\r") + 1, limit)


def _right_edge(text: str, pos: int, reach: int = _MAX_MATCH) -> int:
    """Move a window end right to a whitespace boundary (keys and addresses hold no spaces)."""
    if pos >= len(text):
        return len(text)
    m = _SPACE.search(text, pos, pos + reach)
    return m.start() if m else min(len(text), pos + reach)


def _merge(spans: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        end = min(end, limit)
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def redact_text(text: str, matches: Sequence[Match]) -> str:
    """Replace each PII match with [PLACEHOLDER]; overlapping matches become one."""
    pii = sorted((m for m in matches if m.type == PII), key=lambda m: (m.start, -m.end))
    if not pii:
        return text
    out, cursor = [], 0
    current = None
    for m in pii:
        if current and m.start < current[1]:
            current = (current[0], max(current[1], m.end), current[2])
            continue
        if current:
            out.append(text[cursor:current[0]])
            out.append(f"[{current[2]}]")
            cursor = current[1]
        current = (m.start, m.end, m.placeholder)
    out.append(text[cursor:current[0]])
    out.append(f"[{current[2]}]")
    out.append(text[current[1]:])
    return "".join(out)


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or chat messages (OpenAI / Anthropic shapes)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        prompt = [prompt]
    parts: list[str] = []
    if isinstance(prompt, (list, tuple)):
        for item in prompt:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                content = item.get("content", item.get("text"))
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str))
            else:
                content = getattr(item, "content", None)
                if isinstance(content, str):
                    parts.append(content)
    return "\n".join(parts)


_default: Scanner | None = None


def default_patterns() -> list[dict[str, Any]]:
    """The pattern set shipped with the SDK (the same as the appliance's config/patterns.yaml)."""
    data = resources.files("instrumentation_sdk").joinpath("default_patterns.json").read_text(encoding="utf-8")
    return json.loads(data)["patterns"]


def default_scanner() -> Scanner:
    global _default
    if _default is None:
        _default = Scanner.from_mappings(default_patterns())
    return _default


def scan_prompt(prompt: Any) -> tuple[bool, bool]:
    """(pii_detected, injection_attempt) for a string or chat messages. Never raises."""
    try:
        result = default_scanner().scan(prompt_text(prompt), redact=False)
        return result.pii_detected, result.injection_attempt
    except Exception:  # noqa: BLE001 - a scanner bug must not break the caller's LLM call
        log.exception("llm-observe: prompt scan failed")
        return False, False
