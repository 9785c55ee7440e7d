"""Queue and topic names, in one place."""

from enum import StrEnum


class Queue(StrEnum):
    DEFAULT = "celery"
    MAINTENANCE = "maintenance"
