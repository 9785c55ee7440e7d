import io
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

_READ_CHUNK = 64 * 1024


class BodiesWithoutLength:
    """Read bodies sent without Content-Length (Transfer-Encoding: chunked) before Django sees them.

    Django reads exactly CONTENT_LENGTH bytes and takes a missing one as an empty body, so
    a chunked request (every Node.js OTLP exporter sends those) looked empty and was
    acknowledged with nothing stored. The server (gunicorn) decodes the chunking; here the
    body is read up to the ingest limit and handed on with its length, or refused with 413.
    """

    def __init__(self, app, *, limit: int) -> None:
        self.app, self.limit = app, limit

    def __call__(self, environ, start_response):
        if not environ.get("CONTENT_LENGTH") and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            stream, parts, size = environ["wsgi.input"], [], 0
            while size <= self.limit:
                part = stream.read(min(_READ_CHUNK, self.limit + 1 - size))
                if not part:
                    break
                parts.append(part)
                size += len(part)
            if size > self.limit:
                return self._too_large(start_response)
            body = b"".join(parts)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)

    def _too_large(self, start_response):
        body = (b'{"error": "request body over %d bytes; send smaller batches", "rule": "body_too_large"}'
                % self.limit)
        # The rest of the body is not read: the connection must not be reused for another request.
        start_response("413 Request Entity Too Large", [("Content-Type", "application/json"),
                                                        ("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]


def _application():
    from django.conf import settings

    return BodiesWithoutLength(get_wsgi_application(), limit=max(settings.INGEST_MAX_BYTES,
                                                                 settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0))


application = _application()
