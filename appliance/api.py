"""The one NinjaAPI of the appliance: routers of the apps, shared error answers."""

from __future__ import annotations

import logging

from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from ninja import NinjaAPI, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError

from appliance.health import health
from appliance.renderers import ORJSONRenderer
from ingest.api import router as spans_router
from ingest.api_legacy import metrics_router, openapi_add_examples
from ingest.api_legacy import router as legacy_router
from ingest.api_otlp import router as otlp_router
from ingest.api_scores import router as scores_router
from ingest.api_search import router as search_router
from ingest.auth import RevokedKey
from ingest.producer import BrokerUnavailable, SpanTooLarge
from ingest.schemas import HealthOut

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="llm-observe",
    version="1",
    description="Ingest, store and read LLM spans. Every route but /healthz and /metrics needs an API key "
    "(`Authorization: Bearer <key>` or `X-API-Key: <key>`).",
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
    urls_namespace="api",
    renderer=ORJSONRenderer(),
)
_openapi_schema = api.get_openapi_schema
api.get_openapi_schema = lambda **kw: openapi_add_examples(_openapi_schema(**kw))


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    response = api.create_response(
        request, {"error": "missing or unknown API key", "rule": "unauthenticated"}, status=401
    )
    response["WWW-Authenticate"] = 'Bearer realm="llm-observe"'
    return response


@api.exception_handler(RevokedKey)
def _revoked(request, exc):
    return api.create_response(request, {"error": "this API key was revoked", "rule": "revoked_key"}, status=403)


@api.exception_handler(ValidationError)
def _invalid_request(request, exc):
    first = exc.errors[0] if exc.errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
    return api.create_response(
        request,
        {"error": first.get("msg", "invalid request"), "rule": "invalid_request", "field": ".".join(loc) or None},
        status=400,
    )


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def _database_unavailable(request, exc):
    log.warning("database unavailable: %s", exc)
    response = api.create_response(
        request, {"error": "the database is unavailable; nothing was stored, retry", "rule": "unavailable"}, status=503
    )
    response["Retry-After"] = "5"
    return response


@api.exception_handler(DatabaseError)
def _database_error(request, exc):
    log.exception("database error")
    response = api.create_response(
        request, {"error": "the database refused the write; nothing was stored", "rule": "storage_error"}, status=503
    )
    response["Retry-After"] = "5"
    return response


@api.exception_handler(Http404)
def _not_found(request, exc):
    return api.create_response(request, {"error": "not found", "rule": "not_found"}, status=404)


@api.exception_handler(HttpError)
def _http_error(request, exc):
    return api.create_response(request, {"error": str(exc), "rule": "http_error"}, status=exc.status_code)


@api.exception_handler(Exception)
def _unexpected(request, exc):
    # Every route answers the one documented error shape, a bug included; the traceback goes to the log.
    log.exception("unexpected error on %s %s", request.method, request.path)
    return api.create_response(
        request, {"error": f"unexpected server error ({type(exc).__name__}); it was logged", "rule": "internal_error"},
        status=500,
    )


@api.exception_handler(BrokerUnavailable)
def _broker_unavailable(request, exc):
    log.warning("Kafka broker unavailable: %s", exc)
    response = api.create_response(request, {"error": str(exc), "rule": "broker_unavailable"}, status=503)
    response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(SpanTooLarge)
def _span_too_large(request, exc):
    return api.create_response(request, {"error": str(exc), "rule": "span_too_large"}, status=413)


@api.get("/healthz", response={200: HealthOut, 503: HealthOut}, tags=["health"], summary="Readiness",
         exclude_none=True)
def healthz(request):
    state = health()
    return Status(200 if state["status"] == "ok" else 503, state)


api.add_router("/v1", spans_router)
api.add_router("/v1", otlp_router)
api.add_router("", legacy_router)
api.add_router("", metrics_router)
api.add_router("/v1", search_router)
api.add_router("/v1", scores_router)
