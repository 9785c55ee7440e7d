from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ingest.services.config_load import ConfigFileError, patterns_load, prices_load
from ingest.services.pricing import price_table_reset


class Command(BaseCommand):
    help = "Load config/model_prices.yaml and config/patterns.yaml into the database (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--prices", type=Path, default=settings.BASE_DIR / "config" / "model_prices.yaml")
        parser.add_argument("--patterns", type=Path, default=settings.BASE_DIR / "config" / "patterns.yaml")

    def handle(self, *args, prices: Path, patterns: Path, **options):
        try:
            p = prices_load(path=prices)
            q = patterns_load(path=patterns)
        except ConfigFileError as exc:
            raise CommandError(str(exc)) from None
        price_table_reset()
        self.stdout.write(
            f"prices: {p.created} new, {p.updated} updated, {p.kept} unchanged or edited in the admin; "
            f"patterns: {q.created} new, {q.updated} updated, {q.kept} unchanged or edited in the admin"
        )
