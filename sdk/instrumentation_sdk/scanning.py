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
from importlib import resources
from typing import Any, Iterable, Sequence

try:  # pyahocorasick is a C extension; a pure fallback keeps the SDK importable without it
    import ahocorasick
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    ahocorasick = None

log = logging.getLogger(__name__)

PII = "PII_STRUCTURAL"
INJECTION = "INJECTION_ATTEMPT"
DIGITS_ANCHOR = "<digits>"
WINDOW = 160  # characters kept either side of an anchor hit
_MAX_MATCH = 4096  # longest match a windowed regex may produce before we re-check it unwindowed
_DIGIT_RUN = re.compile(r"\d[\d \-.()/+]{3,}\d")
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
        )


@dataclass(frozen=True)
class Match:
    name: str
    type: str
    start: int
    end: int
    placeholder: str


@dataclass
class ScanResult:
    pii_detected: bool = False
    injection_attempt: bool = False
    matched: list[str] = field(default_factory=list)
    redacted: str | None = None
    matches: list[Match] = field(default_factory=list)


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


def iban_ok(text: str) -> bool:
    compact = re.sub(r"\s", "", text).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def phone_ok(text: str) -> bool:
    return 7 <= sum(c.isdigit() for c in text) <= 15


VALIDATORS = {"luhn": luhn_ok, "iban": iban_ok, "phone": phone_ok}


class _Compiled:
    __slots__ = ("spec", "regex", "validator", "placeholder", "windowed")

    def __init__(self, spec: PatternSpec) -> None:
        self.spec = spec
        self.regex = re.compile(spec.regex, re.IGNORECASE) if spec.regex else None
        if spec.validator and spec.validator not in VALIDATORS:
            raise ValueError(f"pattern {spec.name}: unknown validator {spec.validator!r}")
        self.validator = VALIDATORS.get(spec.validator)
        self.placeholder = spec.placeholder or spec.name.upper()
        self.windowed = bool(spec.anchors)


class Scanner:
    """Built once from pattern specs; `scan` is thread-safe (no shared mutable state)."""

    def __init__(self, specs: Iterable[PatternSpec]) -> None:
        self.patterns = [_Compiled(spec) for spec in specs]
        names = [p.spec.name for p in self.patterns]
        if len(names) != len(set(names)):
            raise ValueError("pattern names must be unique")
        self._digit_users = [i for i, p in enumerate(self.patterns) if DIGITS_ANCHOR in p.spec.anchors]
        self._digit_set = frozenset(self._digit_users)
        # key (lower-cased literal) -> list of (kind, pattern index)
        table: dict[str, list[tuple[str, int]]] = {}
        for i, p in enumerate(self.patterns):
            for phrase in p.spec.phrases:
                if phrase.strip():
                    table.setdefault(phrase.lower(), []).append(("phrase", i))
            for anchor in p.spec.anchors:
                if anchor != DIGITS_ANCHOR and anchor:
                    table.setdefault(anchor.lower(), []).append(("anchor", i))
        self._table = table
        self._automaton = None
        if table and ahocorasick is not None:
            automaton = ahocorasick.Automaton()
            for key, hits in table.items():
                automaton.add_word(key, (len(key), tuple(hits)))
            automaton.make_automaton()
            self._automaton = automaton

    @classmethod
    def from_mappings(cls, rows: Iterable[dict[str, Any]]) -> "Scanner":
        return cls(PatternSpec.from_mapping(row) for row in rows)

    # -- literal pass -------------------------------------------------------
    def _literal_hits(self, lower: str) -> Iterable[tuple[int, int, tuple[tuple[str, int], ...]]]:
        """(start, end, hits) of every phrase/anchor occurrence in the lower-cased text."""
        if self._automaton is not None:
            for end_index, (length, hits) in self._automaton.iter(lower):
                yield end_index - length + 1, end_index + 1, hits
        else:
            for key, hits in self._table.items():
                start = lower.find(key)
                while start != -1:
                    yield start, start + len(key), tuple(hits)
                    start = lower.find(key, start + 1)

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
        if not text:
            return []
        lower = text.lower()
        aligned = len(lower) == len(text)  # some characters change length when lower-cased
        matches: list[Match] = []
        windows: dict[int, list[tuple[int, int]]] = {}
        phrase_hit: set[int] = set()
        for start, end, hits in self._literal_hits(lower):
            for kind, index in hits:
                if kind == "anchor":
                    windows.setdefault(index, []).append((start - WINDOW, end + WINDOW))
                elif aligned and self._bounded(text, start, end):
                    p = self.patterns[index]
                    matches.append(Match(p.spec.name, p.spec.type, start, end, p.placeholder))
                elif not aligned:
                    phrase_hit.add(index)
        for index in phrase_hit:  # re-locate phrase hits on the original text
            p = self.patterns[index]
            for phrase in p.spec.phrases:
                for m in re.finditer(re.escape(phrase), text, re.IGNORECASE):
                    if self._bounded(text, m.start(), m.end()):
                        matches.append(Match(p.spec.name, p.spec.type, m.start(), m.end(), p.placeholder))
        digit_spans = None
        if self._digit_users:
            # One set of windows around digit runs, shared by every digit pattern.
            digit_spans = _edged(text, [(m.start() - WINDOW, m.end() + WINDOW) for m in _DIGIT_RUN.finditer(text)])
        for index, p in enumerate(self.patterns):
            if p.regex is None:
                continue
            if not p.windowed or not aligned:
                spans = [(0, len(text))]
            else:
                spans = _edged(text, windows[index]) if index in windows else []
                if digit_spans and index in self._digit_set:
                    spans = _merge(spans + digit_spans, len(text)) if spans else digit_spans
                if not spans:
                    continue
            for m in self._regex_matches(p, text, spans):
                if p.validator is None or p.validator(m.group(0)):
                    matches.append(Match(p.spec.name, p.spec.type, m.start(), m.end(), p.placeholder))
        return matches

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

    def scan(self, text: str | None, *, redact: bool = True) -> ScanResult:
        if not text:
            return ScanResult(redacted=text)
        matches = self.find(text)
        result = ScanResult(matches=matches)
        result.pii_detected = any(m.type == PII for m in matches)
        result.injection_attempt = any(m.type == INJECTION for m in matches)
        result.matched = sorted({m.name for m in matches})
        result.redacted = redact_text(text, matches) if redact and result.pii_detected else text
        return result


def _edged(text: str, windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merged windows, widened to whitespace so none starts or ends inside a match."""
    if not windows:
        return []
    merged = _merge([(max(0, a), b) for a, b in windows], len(text))
    return _merge([(_left_edge(text, a), _right_edge(text, b)) for a, b in merged], len(text))


def _left_edge(text: str, pos: int) -> int:
    """Move a window start left to a whitespace boundary, so it never begins inside a match."""
    limit = max(0, pos - _MAX_MATCH)
    while pos > limit and not text[pos - 1].isspace():
        pos -= 1
    return pos


def _right_edge(text: str, pos: int) -> int:
    """Move a window end right to a whitespace boundary (keys and addresses hold no spaces)."""
    if pos >= len(text):
        return len(text)
    m = _SPACE.search(text, pos, pos + _MAX_MATCH)
    return m.start() if m else min(len(text), pos + _MAX_MATCH)


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
