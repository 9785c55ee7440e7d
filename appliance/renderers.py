import json
from datetime import date, datetime, timezone
from decimal import Decimal

import orjson
from ninja.renderers import BaseRenderer


def _default(value):
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _fallback_default(value):
    if isinstance(value, datetime):
        value = value.astimezone(timezone.utc) if value.tzinfo else value
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


class ORJSONRenderer(BaseRenderer):
    """orjson keeps microseconds in timestamps (Django's encoder cuts them to milliseconds) and is faster."""

    media_type = "application/json"

    def render(self, request, data, *, response_status):
        try:
            return orjson.dumps(data, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)
        except TypeError:
            # Stored metadata can hold numbers beyond 64 bits (jsonb keeps 1e308 as an integer).
            return json.dumps(data, default=_fallback_default)
