"""`manage.py run_consumer spans`: one long-lived Kafka consumer in the foreground.

SIGTERM or SIGINT finishes the batch in hand, commits it and leaves the group.
"""

from __future__ import annotations

import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workers.consumers import CONSUMERS, consumer_class


class Command(BaseCommand):
    help = "Run a Kafka consumer (at-least-once, batched, offsets committed after the write)."

    def add_arguments(self, parser):
        parser.add_argument("name", choices=sorted(CONSUMERS), help="which consumer")
        parser.add_argument("--batch-size", type=int, default=None,
                            help="messages per batch (default KAFKA_CONSUMER_BATCH_SIZE)")
        parser.add_argument("--batch-ms", type=int, default=None,
                            help="longest wait to fill a batch (default KAFKA_CONSUMER_BATCH_MS)")
        parser.add_argument("--group", default=None,
                            help="consumer group id (default KAFKA_CONSUMER_GROUP_PREFIX-NAME)")

    def handle(self, *args, name, batch_size, batch_ms, group, **options):
        if not settings.KAFKA_BOOTSTRAP_SERVERS:
            raise CommandError("KAFKA_BOOTSTRAP_SERVERS is not set: there is no Kafka to consume from")
        consumer = consumer_class(name)(batch_size=batch_size, batch_ms=batch_ms, group_id=group)

        def stop(signum, frame):
            consumer.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        consumer.run()
