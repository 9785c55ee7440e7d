"""Queue and topic names, in one place.

Here in ingest, not in workers: the web process produces to these topics and
reports these queues' lengths, and ingest never imports workers (the import
direction is console -> ingest <- workers).
"""

from enum import StrEnum


class Queue(StrEnum):
    DEFAULT = "celery"
    MAINTENANCE = "maintenance"


class Topic(StrEnum):
    SPANS_RAW = "llm.spans.raw"
    SPANS_DLQ = "llm.spans.raw.dlq"
