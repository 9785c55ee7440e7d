"""The long-lived Kafka consumers, declared in one place: `manage.py run_consumer <name>`.

Each entry names a `BatchConsumer` subclass by dotted path, imported only when run.
"""

from __future__ import annotations

from django.utils.module_loading import import_string

CONSUMERS: dict[str, str] = {
    "spans": "workers.consumers.spans.SpanConsumer",
}


def consumer_class(name: str):
    try:
        path = CONSUMERS[name]
    except KeyError:
        raise KeyError(f"no consumer named {name!r}; one of: {', '.join(sorted(CONSUMERS))}") from None
    return import_string(path)
