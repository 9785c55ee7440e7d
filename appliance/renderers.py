from decimal import Decimal

import orjson
from ninja.renderers import BaseRenderer


def _default(value):
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


class ORJSONRenderer(BaseRenderer):
    """orjson keeps microseconds in timestamps (Django's encoder cuts them to milliseconds) and is faster."""

    media_type = "application/json"

    def render(self, request, data, *, response_status):
        return orjson.dumps(data, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)
