"""A pending GenAI choice event keeps its finish reason (a streamed span often carries none)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("ingest", "0011_pendingcontent")]

    operations = [
        migrations.AddField("pendingcontent", "finish_reason", models.CharField(max_length=32, null=True)),
    ]
