"""What each library really sends: a tiny OTLP/HTTP receiver that keeps every request body as OTLP JSON.

    python -m tests.interop.matrix.capture [LIB ...]

runs each library's script against the fake provider and this receiver, and writes
`.data-captures/<lib>/<n>-<signal>.json` (traces, logs, metrics; protobuf bodies decoded with
google.protobuf.json_format, JSON bodies kept as sent) plus `<lib>/headers.json` and the script's output.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                           ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

ROOT = Path(__file__).resolve().parents[3]
CAPTURES = ROOT / ".data-captures"

SIGNALS = {
    "/v1/traces": ("traces", ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/logs": ("logs", ExportLogsServiceRequest, ExportLogsServiceResponse),
    "/v1/metrics": ("metrics", ExportMetricsServiceRequest, ExportMetricsServiceResponse),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Receiver"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            raw = self.rfile.read(length)
        else:  # chunked
            raw = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if not size:
                    self.rfile.readline()
                    break
                raw += self.rfile.read(size)
                self.rfile.readline()
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            raw = gzip.decompress(raw)
        path = self.path.split("?")[0].rstrip("/")
        signal, request_type, response_type = SIGNALS.get(path, (path.strip("/").replace("/", "_"), None, None))
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if request_type is not None and content_type == "application/x-protobuf":
            message = request_type()
            message.ParseFromString(raw)
            body: Any = json_format.MessageToDict(message)
        else:
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"_raw": raw.decode(errors="replace")}
        self.server.save(signal, body, self.headers, content_type)  # a Message: any case of a name
        if response_type is not None and content_type == "application/x-protobuf":
            data, reply_type = response_type().SerializeToString(), "application/x-protobuf"
        else:
            data, reply_type = b"{}", "application/json"
        self.send_response(200)
        self.send_header("Content-Type", reply_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, out_dir: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.out_dir = out_dir
        self.count = 0
        self.headers: list[dict] = []
        self._lock = threading.Lock()

    def save(self, signal: str, body: Any, headers: Any, content_type: str) -> None:
        with self._lock:
            self.count += 1
            n = self.count
            self.headers.append({"n": n, "signal": signal, "content_type": content_type,
                                 "authorization": headers.get("Authorization", "")[:14] + "...",
                                 "user_agent": headers.get("User-Agent")})
        (self.out_dir / f"{n}-{signal}.json").write_text(json.dumps(body, indent=1))


class Receiver:
    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.server = _Receiver(out_dir)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        (self.server.out_dir / "headers.json").write_text(json.dumps(self.server.headers, indent=1))


def capture(libs: list[str]) -> None:
    from tests.fakeprovider.server import FakeProvider
    from tests.interop.matrix.runner import run_library

    with FakeProvider(served_suffix="-2024-07-18") as fake:
        for lib in libs:
            out_dir = CAPTURES / lib
            shutil.rmtree(out_dir, ignore_errors=True)
            with Receiver(out_dir) as receiver:
                started = time.monotonic()
                result = run_library(lib, appliance_url=receiver.url, api_key="llmo_capture_key", fake=fake,
                                     service=f"capture-{lib}")
                time.sleep(0.5)  # a late exporter request (metrics on shutdown) still lands
            (out_dir / "script-output.txt").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
            print(f"{lib:28s} exit {result.returncode} {time.monotonic() - started:5.1f} s "
                  f"{receiver.server.count} requests -> {out_dir}")


if __name__ == "__main__":
    from tests.interop.matrix.venvs import libraries

    capture(sys.argv[1:] or libraries() + ["node_openinference"])
