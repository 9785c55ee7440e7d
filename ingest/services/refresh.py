"""A per-process value built from one table, rebuilt when the table's rows change.

Prices and detection patterns are edited in the admin and must apply in every
process within CONFIG_REFRESH_SECONDS; a digest of all rows (not updated_at, which
bulk updates and psql bypass) tells whether a rebuild is due.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, TypeVar

from django.conf import settings
from django.db import connection

log = logging.getLogger(__name__)
T = TypeVar("T")


class TableCache(Generic[T]):
    def __init__(self, table: str, build: Callable[[], T]) -> None:
        self._table, self._build = table, build
        self._lock = threading.Lock()
        self._value: T | None = None
        self._signature = None
        self._checked = 0.0

    def _fresh(self) -> bool:
        return self._value is not None and time.monotonic() - self._checked < settings.CONFIG_REFRESH_SECONDS

    def _digest(self) -> tuple:
        with connection.cursor() as cur:
            cur.execute(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t.id), '')) FROM {self._table} t")
            return tuple(cur.fetchone())

    def get(self) -> T:
        if self._fresh():
            return self._value
        with self._lock:
            if self._fresh():
                return self._value
            signature = self._digest()
            if self._value is None or signature != self._signature:
                try:
                    self._value = self._build()
                except Exception:  # a bad row (e.g. edited with SQL) must not stop ingestion
                    log.exception("rebuilding from %s failed; keeping the previous value", self._table)
                    if self._value is None:
                        raise
                self._signature = signature
            self._checked = time.monotonic()
            return self._value

    def reset(self) -> None:
        with self._lock:
            self._value, self._signature, self._checked = None, None, 0.0
