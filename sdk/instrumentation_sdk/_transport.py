"""HTTP to the appliance with the standard library only (keep-alive, gzip, bearer key).

Stdlib on purpose: the SDK must not go through the HTTP clients it instruments,
and it adds no dependency that could clash with the host application's.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

from instrumentation_sdk import __version__

USER_AGENT = f"instrumentation-sdk/{__version__} (llm-observe)"


@dataclass
class Reply:
    status: int
    body: Any
    retry_after: float | None = None


class TransportError(Exception):
    """The request did not get an HTTP answer (refused, reset, timed out, DNS)."""


class HttpTransport:
    """One keep-alive connection; not thread-safe (used by the sender thread only)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"LLM_OBSERVE_URL must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if self.https else 80)
        self.prefix = parsed.path.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.connect()
            # Small request/response pairs on a kept-alive connection: without this, Nagle's
            # algorithm and delayed ACKs can add ~40 ms to every POST.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def request(self, method: str, path: str, *, body: bytes | None = None, gzip_body: bool = False,
                headers: dict[str, str] | None = None) -> Reply:
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        if body is not None:
            all_headers["Content-Type"] = "application/json"
            if gzip_body:
                body = gzip.compress(body, compresslevel=3)
                all_headers["Content-Encoding"] = "gzip"
        all_headers.update(headers or {})
        for attempt in (1, 2):
            try:
                conn = self._connection()
                conn.request(method, self.prefix + path, body=body, headers=all_headers)
                response = conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A keep-alive connection the server closed while idle: one immediate retry on a new one.
                self.close()
                if attempt == 2:
                    raise TransportError(f"{type(exc).__name__}: {exc}") from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransportError(f"{type(exc).__name__}: {exc}") from exc
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw[:500].decode("utf-8", "replace")
            retry_after = None
            header = response.getheader("Retry-After")
            if header:
                try:
                    retry_after = float(header)
                except ValueError:
                    retry_after = None
            return Reply(response.status, parsed, retry_after)
        raise TransportError("unreachable")  # pragma: no cover
