"""OTLP metrics are not stored here: when PROMETHEUS_OTLP_URL is set they go on to Prometheus.

Prometheus (2.47+, started with `--web.enable-otlp-receiver`) takes OTLP/HTTP metrics at
/api/v1/otlp/v1/metrics, in protobuf or JSON, and stores them as its own series. The
body is sent on as it came (decompressed) with its content type, within a short timeout:
an exporter waits for our answer, and one that times out sends the batch again.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

from django.conf import settings

log = logging.getLogger(__name__)


def forward_url() -> str:
    return getattr(settings, "PROMETHEUS_OTLP_URL", "") or ""


@dataclass(frozen=True)
class Forwarded:
    ok: bool  # Prometheus took the batch
    refused: str | None  # Prometheus answered 4xx: why (retrying would not help)
    unavailable: str | None  # unreachable, timed out or 5xx: worth a retry


def metrics_forward(*, body: bytes, media: str) -> Forwarded:
    url = forward_url()
    timeout = float(getattr(settings, "PROMETHEUS_OTLP_TIMEOUT_SECONDS", 3.0))
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": media})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - the operator's URL
            answer.read(65536)
        return Forwarded(True, None, None)
    except urllib.error.HTTPError as exc:
        text = exc.read(500).decode("utf-8", "replace").strip()
        if 400 <= exc.code < 500:
            return Forwarded(False, f"HTTP {exc.code}: {text}" if text else f"HTTP {exc.code}", None)
        log.warning("Prometheus OTLP receiver %s answered %s: %s", url, exc.code, text)
        return Forwarded(False, None, f"Prometheus answered HTTP {exc.code}")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        log.warning("Prometheus OTLP receiver %s unreachable: %s", url, reason)
        return Forwarded(False, None, f"Prometheus is unreachable ({reason})")
