"""A stand-in for the appliance's POST /v1/spans, for the reporter's unit tests.

Answers like the appliance (202 {accepted, duplicates, rejected}) and can be told to
fail: `sink.script = [503, 503]` answers the next two requests with 503, `sink.down()`
stops listening altogether (connection refused), `sink.up()` listens again on the same port.
Content-driven failures, as a real server has them: `sink.reject(span)` returning a reason
rejects that span (202 with `rejected`, 400 when none is valid); `sink.poison(span)` true for
any span of a request answers the whole request 500 (a server that crashes on one span);
`sink.refuse(span)` true answers the whole request 400 without saying which span;
`sink.all_or_nothing = True` answers 400 (naming the rejected spans) instead of a partial 202.
"""

from __future__ import annotations

import gzip
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        # streamed events are small writes: send each at once (no Nagle / delayed-ACK stalls)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, payload: Any) -> None:
        if self.command == "POST":
            self.server.sink.answers.append((status, self.server.sink.requests[-1].get("spans")))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write: no Nagle delay
        self.flush_headers()

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, {"items": [], "next_cursor": None})

    def do_POST(self) -> None:  # noqa: N802
        sink = self.server.sink
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        sink.requests.append({"path": self.path, "headers": dict(self.headers), "size": len(raw)})
        if sink.delay:
            time.sleep(sink.delay)
        with sink.lock:
            status = sink.script.pop(0) if sink.script else 202
        if status != 202:
            return self._answer(status, {"error": f"scripted {status}", "rule": "scripted"})
        if sink.key and self.headers.get("Authorization") != f"Bearer {sink.key}":
            return self._answer(401, {"error": "missing or unknown API key", "rule": "auth"})
        spans = json.loads(raw)
        if isinstance(spans, dict):
            spans = [spans]
        sink.requests[-1]["spans"] = len(spans)
        poison, refuse = sink.poison, sink.refuse
        if poison and any(poison(span) for span in spans):
            return self._answer(500, {"error": "Recursion limit reached", "rule": "internal"})
        if refuse and any(refuse(span) for span in spans):
            return self._answer(400, {"error": "invalid body", "rule": "invalid_value"})
        accepted, duplicates, rejected = 0, 0, []
        for index, span in enumerate(spans):
            reason = sink.reject(span) if sink.reject else None
            if reason:
                rejected.append({"index": index, "span_id": span.get("span_id"), "rule": "invalid_value",
                                 "field": None, "reason": reason})
                continue
            with sink.lock:
                if span["span_id"] in sink.by_id:
                    duplicates += 1
                    sink.duplicates += 1
                else:
                    sink.by_id[span["span_id"]] = span
                    sink.spans.append(span)
            accepted += 1
        if not accepted or (rejected and sink.all_or_nothing):
            for span in spans if accepted else ():  # nothing of a 400 is stored
                if sink.by_id.pop(span["span_id"], None) is not None:
                    sink.spans.remove(span)
            return self._answer(400, {"error": "no valid span", "rule": "invalid_value", "rejected": rejected})
        self._answer(202, {"success": True, "accepted": accepted, "duplicates": duplicates,
                           "rejected": rejected, "span_warnings": []})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class IngestSink:
    def __init__(self, key: str | None = "test-key") -> None:
        self.key = key
        self.lock = threading.Lock()
        self.spans: list[dict] = []
        self.by_id: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.duplicates = 0
        self.script: list[int] = []
        self.delay = 0.0
        self.reject = None
        self.poison = None
        self.refuse = None
        self.all_or_nothing = False  # any rejected span: 400 for the request, nothing stored
        self.answers: list[tuple[int, int | None]] = []  # (status, spans in the request) of each POST
        self.port = 0
        self._server: _Server | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.sink = self
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.spans) >= count:
                return True
            time.sleep(0.02)
        return len(self.spans) >= count


def wal_rows(path) -> int:
    """Rows in an SDK WAL file; 0 while the file or its table is still being created by the sender."""
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as conn:
        try:
            return conn.execute("SELECT count(*) FROM spans").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
