"""Text normalisation for injection matching, and decoding of encoded segments.

Injection patterns run on a folded copy of the text, so that one lower-case, accent-free,
Latin-letter grammar covers what attackers write to slip past literal matching:

* Unicode compatibility forms (fullwidth "ｉｇｎｏｒｅ", ligatures) -> NFKD, then combining
  marks dropped ("précédentes" -> "precedentes") and case folded;
* zero-width and other format characters (category Cf: U+200B, U+200D, U+FEFF, bidi marks)
  removed;
* Cyrillic/Greek look-alikes folded to Latin in words that mix scripts ("іgnоrе" with
  Cyrillic і/о/е); whole Cyrillic or Greek words are left alone (Russian stays Russian);
* leetspeak folded (0->o 1->i 2->z 3->e 4->a 5->s 6->g 7->t 8->b 9->g @->a $->s) in words
  with letters ("1gn0r3", "d15r394rd"), never in numbers nor in words spelled with digits
  ("rot13", "sha256", "gpt4", "10th");
* letter-spaced words joined ("i g n o r e" -> "ignore");
* runs of whitespace collapsed to one space.

Pure-ASCII text with none of those cues takes a fast path: its lower-cased copy, which has
the same offsets as the original (one literal pass then serves PII and injection alike).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import string
import unicodedata
from urllib.parse import unquote_plus

_LEET_CHARS = "0123456789@$"
_LEET = str.maketrans({"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b",
                       "9": "g", "@": "a", "$": "s"})
# A leet character between letters, or leading/trailing a word of letters: "pr3v10us", "1gnore", "ignor3".
_LEET_CUE = re.compile(r"[a-z][0-9@$]+[a-z]|(?<![\w@$])[0-9@$]+[a-z]|[a-z][0-9@$]+(?![\w@$])")
# Words that are spelled with digits: never folded ("rot13" must stay "rot13").
_LEET_KEEP = re.compile(
    r"(?:rot\d+|base\d+|b64|md5|sha\d*|utf\d+|gpt\d\w*|mp[34]|ipv[46]|[hx]26[45]|x86|x64|win\d+|py\d+|"
    r"\d+(?:st|nd|rd|th|s|k|m|g|px|pm|am|d|h|x|kb|mb|gb|tb|ms|min|hz|mhz|ghz))"
)
# Letters (not "_", a gap character: "e_n_a_b_l_e") one to six gap characters apart (wider gaps between words).
_SPACED = re.compile(r"(?<![^\W_])[^\W_](?:[ .\-_*/|]{1,6}[^\W_](?![^\W_])){3,}")
_GAP = re.compile(r"[ .\-_*/|]+")
_WS = re.compile(r"\s+")
# Cyrillic and Greek letters that look like Latin ones (lower case; the text is case-folded first).
_HOMOGLYPHS = {
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "һ": "h", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɡ": "g", "ɩ": "i", "ı": "i", "ӏ": "l", "ɑ": "a",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ϲ": "c", "ϳ": "j", "ѵ": "v",
}
_HOMOGLYPH_TABLE = str.maketrans(_HOMOGLYPHS)
_CONFUSABLE = "".join(_HOMOGLYPHS)
# A word that mixes Latin letters with look-alikes, in either order ("іgnоrе"); a word of Cyrillic or
# Greek letters only is a word of that language and stays as it is ("все" is Russian, not "bce").
_MIXED_WORD = re.compile(rf"\w*(?:[a-z][{_CONFUSABLE}]|[{_CONFUSABLE}][a-z])\w*")
_FOLD_CACHE: dict[int, str | None] = {}  # non-ASCII code point -> replacement (None = drop)


def _fold_char(char: str) -> str | None:
    category = unicodedata.category(char)
    if category in ("Mn", "Me", "Cf"):
        return None  # combining marks (accents after NFKD) and zero-width/format characters
    return char


def _fold_unicode(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    missing = {ord(c) for c in set(text) if ord(c) > 127 and ord(c) not in _FOLD_CACHE}
    if missing:
        if len(_FOLD_CACHE) > 20_000:  # bounded: a text cycling through all of Unicode cannot grow it forever
            _FOLD_CACHE.clear()
        for code in missing:
            _FOLD_CACHE[code] = _fold_char(chr(code))
    text = text.translate(_FOLD_CACHE).casefold()
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)  # Hangul syllables back from their jamo
        if any(char in text for char in _CONFUSABLE):  # a few substring searches, not a regex over the text
            text = _MIXED_WORD.sub(lambda m: m.group(0).translate(_HOMOGLYPH_TABLE), text)
    return text


def _unleet(match: re.Match) -> str:
    token = match.group(0)
    if not any(c.isalpha() for c in token) or _LEET_KEEP.fullmatch(token):
        return token
    return token.translate(_LEET)


def _unspace(match: re.Match) -> str:
    run = match.group(0)
    gaps = _GAP.findall(run)
    if any(g.isspace() for g in gaps) and not all(g.isspace() for g in gaps):
        # "i.g.n.o.r.e a.l.l": dots join letters, spaces separate words.
        return _GAP.sub(lambda g: " " if g.group(0).isspace() else "", run)
    shortest = min(len(g) for g in gaps)
    # Gaps longer than the usual one separate words: "i g n o r e   a l l" -> "ignore all".
    return _GAP.sub(lambda g: " " if len(g.group(0)) > shortest else "", run)


def _class_table(classes: dict[str, bytes]) -> bytes:
    """A bytes.translate table: each listed byte to its class letter, every other byte to a space."""
    table = bytearray(b" " * 256)
    for chars, cls in classes.items():
        for char in chars.encode():
            table[char] = cls[0]
    return bytes(table)


_LETTERS = string.ascii_letters
# Cues looked for with bytes.find in a translated copy of the text (C speed, no regex over
# every text): a digit among letters (leetspeak), single letters in a row (letter-spacing).
_LEET_SHAPE = _class_table({_LETTERS: b"a", string.digits: b"1"})
# A word with a digit (or @/$) in it; starts only at a word start, so a long word costs one scan.
_DIGIT_TOKEN = re.compile(r"(?<![\w@$])[\w@$]*[\d@$][\w@$]*")
_LEET_CUES = (b"a1a", b"a11a", b"a111a")  # one word like "pr3v10us" is enough: then every word is folded
_SPACED_SHAPE = _class_table({_LETTERS: b"a", " .-_*/|": b"s"})
_SPACED_CUES = (b"sasasasa", b"ssassassassa", b"sssasssasssasssa")  # gaps of one, two, three
# Words cut into syllables with hyphens: "ig-no-re", "pre-vi-ous".
_HYPHEN_SHAPE = _class_table({_LETTERS: b"a", "-": b"-"})
_HYPHEN_CUE = b"-aa-"
_SYLLABLE_HYPHEN = re.compile(r"(?<=[a-z])-(?=[a-z])")


def _cues(text: str) -> tuple[bool, bool, bool]:
    raw = b" " + text.encode("utf-8", "replace") + b" "
    leet_shape = raw.translate(_LEET_SHAPE)
    leet = any(cue in leet_shape for cue in _LEET_CUES)
    spaced_shape = raw.translate(_SPACED_SHAPE)
    return leet, any(cue in spaced_shape for cue in _SPACED_CUES), _HYPHEN_CUE in raw.translate(_HYPHEN_SHAPE)


def normalize(text: str) -> tuple[str, bool]:
    """(folded text, changed): changed is False when the result is just text.lower() (same offsets)."""
    leet, spaced, hyphens = _cues(text)
    if text.isascii():
        if not leet and not spaced and not hyphens:
            return text.lower(), False
        folded = text.lower()
    else:
        folded = _fold_unicode(text)
        leet = leet or _LEET_CUE.search(folded) is not None  # look-alikes folded to Latin may sit next to digits
    if leet:
        folded = _DIGIT_TOKEN.sub(_unleet, folded)
    if spaced:
        folded = _SPACED.sub(_unspace, folded)
    if hyphens:
        folded = _SYLLABLE_HYPHEN.sub("", folded)
    return _WS.sub(" ", folded), True


# --- encoded segments -----------------------------------------------------------------

MAX_SEGMENTS = 8  # encoded segments decoded per text (per encoding)
MAX_DECODED = 64 * 1024  # bytes of decoded text per text
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/_-])(?=[A-Za-z0-9+/_-]*[0-9+/A-Z])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9a-fA-Fx\\])(?:(?:\\x|0x)?[0-9a-fA-F]{2}[ :,]?){8,}")
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")
_PERCENT_TOKEN = re.compile(r"(?<!\S)\S*%[0-9a-fA-F]{2}\S*")  # a whitespace-delimited token with an escape
ROT13_SPAN = 2000  # characters after the word "rot13" (or "caesar"...) that are rotated and rescanned


def _printable(decoded: str) -> bool:
    if not decoded:
        return False
    good = sum(c.isprintable() or c in "\n\r\t" for c in decoded)
    letters = sum(c.isalpha() for c in decoded)
    return good >= 0.95 * len(decoded) and letters >= 0.5 * len(decoded.replace(" ", "") or "x")


def _as_text(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if _printable(decoded) else None


def _b64(segment: str) -> str | None:
    compact = segment.rstrip("=")
    if len(compact) % 4 == 1:
        return None
    padded = compact + "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _as_text(raw)


def _hex(segment: str) -> str | None:
    digits = re.sub(r"\\x|0x|[ :,]", "", segment)
    if len(digits) % 2 or len(digits) < 16:
        return None
    try:
        return _as_text(bytes.fromhex(digits))
    except ValueError:
        return None


_BASE64_SHAPE = _class_table({_LETTERS + string.digits + "+/_-": b"b"})
_BASE64_CUE = b"b" * 20  # the shortest payload worth decoding ("ignore the rules!") is 24 base64 characters
_HEX_SHAPE = _class_table({string.hexdigits: b"h", " :,": b"s", "\\x": b"x"})
_DECIMAL_SHAPE = _class_table({string.digits: b"d", " ,": b"s"})
_HEX_CUES = (b"h" * 16, b"hhs" * 7 + b"hh", b"xxhh" * 4)


_DECIMAL = re.compile(r"(?<![\d.])(?:(?:3[2-9]|[4-9]\d|1[01]\d|12[0-6])[ ,]+){7,}(?:3[2-9]|[4-9]\d|1[01]\d|12[0-6])(?![\d.])")
_BASE32 = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{24,}={0,6}(?![A-Za-z0-9])")


def _decimal(segment: str) -> str | None:
    return _as_text(bytes(int(n) for n in re.findall(r"\d+", segment)))


def _b32(segment: str) -> str | None:
    padded = segment.rstrip("=")
    padded += "=" * (-len(padded) % 8)
    try:
        return _as_text(base64.b32decode(padded))
    except (binascii.Error, ValueError):
        return None


def decoded_segments(text: str, *, rot13: bool, rot13_from: int = 0) -> list[tuple[str, int, int, str]]:
    """(encoding, start, end, decoded text) of the encoded segments worth a rescan; bounded."""
    out: list[tuple[str, int, int, str]] = []
    budget = MAX_DECODED
    raw = text.encode("utf-8", "replace")
    # Where the first run of encoded-looking characters is (a byte offset: a character offset in ASCII).
    first = {"base64": raw.translate(_BASE64_SHAPE).find(_BASE64_CUE)}
    hex_shape = raw.translate(_HEX_SHAPE)
    first["hex"] = min((i for i in (hex_shape.find(cue) for cue in _HEX_CUES) if i >= 0), default=-1)
    ascii_text = len(raw) == len(text)
    # ASCII codes written as decimal numbers ("73 103 110 ..."), and base32 (upper case, 2-7).
    first["decimal"] = 0 if raw.translate(_DECIMAL_SHAPE).count(b"ds") >= 8 else -1
    first["base32"] = first["base64"]
    for encoding, regex, decode in (("base64", _BASE64, _b64), ("base32", _BASE32, _b32), ("hex", _HEX, _hex),
                                    ("decimal", _DECIMAL, _decimal)):
        if first[encoding] < 0:
            continue
        start = max(0, first[encoding] - 4) if ascii_text else 0
        for i, m in enumerate(regex.finditer(text, start)):
            if i >= MAX_SEGMENTS or budget <= 0:
                break
            decoded = decode(m.group(0).strip())
            if decoded:
                budget -= len(decoded)
                out.append((encoding, m.start(), m.end(), decoded[:budget + len(decoded)]))
    if text.count("%") >= 3:
        tokens = 0
        for m in _PERCENT_TOKEN.finditer(text):
            if len(_PERCENT.findall(m.group(0))) >= 3 and tokens < MAX_SEGMENTS:
                tokens += 1
                out.append(("url", m.start(), m.end(), unquote_plus(m.group(0)[:MAX_DECODED])))
    if rot13:
        # The payload follows the word that names the cipher: rotate from a little before it, not the whole text.
        start = max(0, rot13_from - 200)
        end = min(len(text), rot13_from + ROT13_SPAN)
        out.append(("rot13", start, end, codecs.encode(text[start:end], "rot13")))
    return out
