"""Queue and topic names, in one place."""

from enum import StrEnum


class Queue(StrEnum):
    DEFAULT = "celery"
    MAINTENANCE = "maintenance"


class Topic(StrEnum):
    SPANS_RAW = "llm.spans.raw"
    SPANS_DLQ = "llm.spans.raw.dlq"
