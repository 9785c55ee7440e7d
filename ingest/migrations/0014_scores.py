# Scores and their per-name configs (issue 18): a plain table, see ingest.models.Score.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('ingest', '0013_detectionpattern_context'),
    ]

    operations = [
        migrations.CreateModel(
            name='Score',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('score_id', models.CharField(help_text="the client's idempotency id, or one made at ingest", max_length=128)),
                ('name', models.CharField(max_length=200)),
                ('data_type', models.CharField(choices=[('numeric', 'Numeric'), ('boolean', 'Boolean'), ('categorical', 'Categorical')], max_length=12)),
                ('value', models.FloatField(help_text="the number; 1/0 for boolean; the category's index for categorical")),
                ('string_value', models.CharField(help_text='the category, or true/false', max_length=200, null=True)),
                ('comment', models.TextField(null=True)),
                ('comment_pii', models.BooleanField(default=False)),
                ('source', models.CharField(max_length=12)),
                ('author', models.CharField(max_length=200, null=True)),
                ('trace_id', models.CharField(max_length=128, null=True)),
                ('span_id', models.CharField(max_length=128, null=True)),
                ('session_id', models.CharField(max_length=200, null=True)),
                ('created_at', models.DateTimeField()),
                ('received_at', models.DateTimeField()),
                ('project', models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='ingest.project')),
            ],
            options={
                'indexes': [models.Index(fields=['project', '-created_at', '-score_id'], name='score_recent'), models.Index(fields=['project', 'trace_id'], name='score_trace'), models.Index(fields=['project', 'span_id'], name='score_span'), models.Index(fields=['project', 'session_id'], name='score_session'), models.Index(fields=['project', 'name', '-created_at'], name='score_name_recent')],
                'constraints': [models.UniqueConstraint(fields=('project', 'score_id'), name='score_unique_id')],
            },
        ),
        migrations.CreateModel(
            name='ScoreConfig',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=200)),
                ('data_type', models.CharField(choices=[('numeric', 'Numeric'), ('boolean', 'Boolean'), ('categorical', 'Categorical')], default='numeric', max_length=12)),
                ('min_value', models.FloatField(blank=True, help_text='numeric only; empty = no lower bound', null=True)),
                ('max_value', models.FloatField(blank=True, help_text='numeric only; empty = no upper bound', null=True)),
                ('categories', models.JSONField(blank=True, default=list, help_text='categorical only, e.g. ["good", "bad"]')),
                ('description', models.TextField(blank=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('project', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='score_configs', to='ingest.project')),
            ],
            options={
                'ordering': ['project', 'name'],
                'constraints': [models.UniqueConstraint(fields=('project', 'name'), name='scoreconfig_unique_name')],
            },
        ),
    ]
