"""A local fake of the OpenAI (chat completions, responses) and Anthropic (messages) HTTP APIs.

Real client libraries point at it through their base URL. It speaks the wire formats
including SSE streaming with usage blocks, and fails on demand:

- model name containing "error-429" / "error-500" / "error-400": that HTTP error, in the
  provider's error JSON shape;
- model name containing "midstream-error": the stream breaks after two chunks;
- model name containing "tools": the answer is a tool call (plain text once the conversation carries the
  tool's result, so an agent loop ends);
- model name containing "slow": the answer starts after 1.5 s.

`/v1/embeddings` answers 8-dimensional vectors (floats, or base64 as the OpenAI client asks by default).
`FakeProvider(served_suffix="-2024-07-18")` makes OpenAI answers name a dated snapshot of the requested model,
as the real API does (the default "-2024-fake" keeps it obviously fake).

Every request is recorded (`server.requests`) so tests can count what reached the provider.

    with FakeProvider() as fake:
        client = openai.OpenAI(base_url=fake.openai_url, api_key="x", max_retries=0)
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = "Hello from the fake provider, nice to meet you."
USAGE = {"prompt": 21, "completion": 12, "cached": 5, "reasoning": 3}
FIRST_TOKEN_DELAY = 0.03  # seconds before the first streamed content: TTFT is measurable
CHUNK_DELAY = 0.002


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        # streamed events are small writes: send each at once (no Nagle / delayed-ACK stalls)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write: no Nagle delay
        self.flush_headers()

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, payload: Any, event: str | None = None) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        self._chunk(text.encode())

    def _end_sse(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _break_stream(self) -> None:
        # Abort the connection mid-body: the client sees an incomplete chunked response.
        self.wfile.flush()
        self.close_connection = True
        try:
            import socket

            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "fake"}]})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        path = self.path.split("?")[0].rstrip("/")
        self.server.record(path, body, dict(self.headers))
        model = str(body.get("model") or "")
        anthropic = path.endswith("/messages")
        if "slow" in model:
            time.sleep(1.5)
        for code in (429, 500, 400, 401):
            if f"error-{code}" in model:
                if anthropic:
                    kind = {429: "rate_limit_error", 500: "api_error", 400: "invalid_request_error",
                            401: "authentication_error"}[code]
                    return self._json(code, {"type": "error", "error": {"type": kind, "message": f"fake {code}"}})
                kind = {429: "rate_limit_exceeded", 500: "server_error", 400: "invalid_request_error",
                        401: "invalid_api_key"}[code]
                return self._json(code, {"error": {"message": f"fake {code}", "type": kind, "code": kind}})
        if path.endswith("/chat/completions"):
            return self._chat(body)
        if path.endswith("/embeddings"):
            return self._embeddings(body)
        if path.endswith("/responses"):
            return self._responses(body)
        if anthropic:
            return self._messages(body)
        self._json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    # -- OpenAI chat completions ----------------------------------------------------------

    def _chat(self, body: dict) -> None:
        model = body.get("model") or "gpt-4o-mini"
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        usage = {
            "prompt_tokens": USAGE["prompt"], "completion_tokens": USAGE["completion"],
            "total_tokens": USAGE["prompt"] + USAGE["completion"],
            "prompt_tokens_details": {"cached_tokens": USAGE["cached"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": USAGE["reasoning"], "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        messages = body.get("messages") or []
        tools = "tools" in model and not (messages and isinstance(messages[-1], dict)
                                          and messages[-1].get("role") == "tool")
        suffix = self.server.served_suffix
        served_model = f"{model}{suffix}" if not model.endswith(suffix) else model
        if not body.get("stream"):
            message: dict = {"role": "assistant", "content": None if tools else ANSWER, "refusal": None}
            if tools:
                message["tool_calls"] = [{"id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
            return self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": served_model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": "tool_calls" if tools else "stop"}],
                "usage": usage, "system_fingerprint": "fp_fake",
            })
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._start_sse()
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served_model,
                "system_fingerprint": "fp_fake"}
        self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
        time.sleep(FIRST_TOKEN_DELAY)
        for i, word in enumerate(_words(ANSWER)):
            if "midstream-error" in model and i == 2:
                return self._break_stream()
            self._event({**base, "choices": [{"index": 0, "delta": {"content": word}, "logprobs": None,
                                              "finish_reason": None}]})
            time.sleep(CHUNK_DELAY)
        self._event({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        if include_usage:
            self._event({**base, "choices": [], "usage": usage})
        self._event("[DONE]")
        self._end_sse()

    # -- OpenAI embeddings ---------------------------------------------------------------

    def _embeddings(self, body: dict) -> None:
        model = body.get("model") or "text-embedding-3-small"
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        data = []
        for index, text in enumerate(inputs):
            seed = sum(str(text).encode()) or 1
            vector = [((seed * (i + 1)) % 97) / 97.0 for i in range(8)]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(max(1, len(str(t).split())) for t in inputs)
        self._json(200, {"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- OpenAI responses ----------------------------------------------------------------

    def _response_obj(self, rid: str, model: str, status: str, text: str | None) -> dict:
        output = []
        if text is not None:
            output = [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
            "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "usage": None if status != "completed" else {
                "input_tokens": USAGE["prompt"], "output_tokens": USAGE["completion"],
                "total_tokens": USAGE["prompt"] + USAGE["completion"],
                "input_tokens_details": {"cached_tokens": USAGE["cached"]},
                "output_tokens_details": {"reasoning_tokens": USAGE["reasoning"]},
            },
        }

    def _responses(self, body: dict) -> None:
        model = body.get("model") or "gpt-4o-mini"
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        if not body.get("stream"):
            return self._json(200, self._response_obj(rid, model, "completed", ANSWER))
        self._start_sse()
        seq = iter(range(1000))
        self._event({"type": "response.created", "sequence_number": next(seq),
                     "response": self._response_obj(rid, model, "in_progress", None)}, "response.created")
        self._event({"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
                     "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant",
                              "content": []}}, "response.output_item.added")
        self._event({"type": "response.content_part.added", "sequence_number": next(seq), "item_id": "msg_1",
                     "output_index": 0, "content_index": 0,
                     "part": {"type": "output_text", "text": "", "annotations": []}}, "response.content_part.added")
        time.sleep(FIRST_TOKEN_DELAY)
        for word in _words(ANSWER):
            self._event({"type": "response.output_text.delta", "sequence_number": next(seq), "item_id": "msg_1",
                         "output_index": 0, "content_index": 0, "delta": word, "logprobs": []},
                        "response.output_text.delta")
            time.sleep(CHUNK_DELAY)
        self._event({"type": "response.output_text.done", "sequence_number": next(seq), "item_id": "msg_1",
                     "output_index": 0, "content_index": 0, "text": ANSWER, "logprobs": []},
                    "response.output_text.done")
        self._event({"type": "response.completed", "sequence_number": next(seq),
                     "response": self._response_obj(rid, model, "completed", ANSWER)}, "response.completed")
        self._end_sse()

    # -- Anthropic messages --------------------------------------------------------------

    def _messages(self, body: dict) -> None:
        model = body.get("model") or "claude-3-5-haiku-latest"
        mid = f"msg_{uuid.uuid4().hex[:12]}"
        usage = {"input_tokens": USAGE["prompt"] - USAGE["cached"], "output_tokens": USAGE["completion"],
                 "cache_read_input_tokens": USAGE["cached"], "cache_creation_input_tokens": 0}
        tools = "tools" in model and not _ends_with_tool_result(body.get("messages") or [])
        if not body.get("stream"):
            content = [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}] \
                if tools else [{"type": "text", "text": ANSWER}]
            return self._json(200, {"id": mid, "type": "message", "role": "assistant", "model": model,
                                    "content": content, "stop_reason": "tool_use" if tools else "end_turn",
                                    "stop_sequence": None, "usage": usage})
        self._start_sse()
        self._event({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}}, "message_start")
        self._event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    "content_block_start")
        self._event({"type": "ping"}, "ping")
        time.sleep(FIRST_TOKEN_DELAY)
        for i, word in enumerate(_words(ANSWER)):
            if "midstream-error" in model and i == 2:
                self._event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")
                return self._end_sse()
            self._event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                        "content_block_delta")
            time.sleep(CHUNK_DELAY)
        self._event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        self._event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": USAGE["completion"]}}, "message_delta")
        self._event({"type": "message_stop"}, "message_stop")
        self._end_sse()


def _ends_with_tool_result(messages: list) -> bool:
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or not isinstance(last.get("content"), list):
        return False
    return any(isinstance(part, dict) and part.get("type") == "tool_result" for part in last["content"])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[dict] = []
        self.served_suffix = "-2024-fake"
        self._lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients closing streams early reset connections: expected here

    def record(self, path: str, body: dict, headers: dict) -> None:
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers})


class FakeProvider:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, served_suffix: str = "-2024-fake") -> None:
        self.server = _Server((host, port), _Handler)
        self.server.served_suffix = served_suffix
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.openai_url = f"{self.url}/v1"
        self.anthropic_url = self.url
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def start(self) -> "FakeProvider":
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python -m tests.fakeprovider.server
    fake = FakeProvider(port=8765).start()
    print(f"fake provider on {fake.url}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
