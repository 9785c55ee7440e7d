"""The one NinjaAPI of the appliance: routers of the apps, shared error answers."""

from __future__ import annotations

import logging

from django.db import DatabaseError, InterfaceError, OperationalError
from ninja import NinjaAPI, Status
from ninja.errors import AuthenticationError, ValidationError

from appliance.health import health
from appliance.renderers import ORJSONRenderer
from ingest.api import router as spans_router
from ingest.auth import RevokedKey
from ingest.schemas import HealthOut

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="llm-observe",
    version="1",
    description="Ingest, store and read LLM spans. Every route but /healthz needs an API key "
    "(`Authorization: Bearer <key>` or `X-API-Key: <key>`).",
    docs_url="/api/docs",
    openapi_url="/api/openapi.json",
    urls_namespace="api",
    renderer=ORJSONRenderer(),
)


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


@api.get("/healthz", response={200: HealthOut, 503: HealthOut}, tags=["health"], summary="Readiness")
def healthz(request):
    state = health()
    return Status(200 if state["status"] == "ok" else 503, state)


api.add_router("/v1", spans_router)
