"""Detection patterns get context words: a match counts only near one of them (number-only formats such
as an SSN without dashes), or never near one (framework JSON that is not a smuggled tool call)."""

from django.db import migrations, models

CONTEXT_HELP = ('words of which one must occur within "context window" characters of a match for it to count, '
                'e.g. ["ssn", "social security"] for an SSN without dashes. Empty: no such condition.')
EXCLUDE_HELP = ('words of which none may occur within "context window" characters of a match, '
                "e.g. ['\"role\"'] so a framework's own message JSON is not taken for a smuggled tool call.")


class Migration(migrations.Migration):
    dependencies = [("ingest", "0012_pendingcontent_finish_reason")]

    operations = [
        migrations.AddField("detectionpattern", "context", models.JSONField(blank=True, default=list, help_text=CONTEXT_HELP)),
        migrations.AddField("detectionpattern", "exclude_context",
                            models.JSONField(blank=True, default=list, help_text=EXCLUDE_HELP)),
        migrations.AddField("detectionpattern", "context_window", models.PositiveIntegerField(
            blank=True, default=0, help_text="characters searched either side of a match for context words (0: 40)")),
        migrations.AlterField("detectionpattern", "validator", models.CharField(
            blank=True, max_length=32,
            help_text="extra check on regex matches: luhn, card, iban, aba, ipv4, phone, phonenumber or phonenumber_any")),
    ]
