"""ingest_embeddingfacet: which service, model and provider each embedded prompt was seen with.

A search over a wide window walks the global graph; with a service filter, every neighbour
used to be checked against the span table (one index probe per daily partition, ~30), most
of them to be rejected: p50 ~34 ms at 1M vectors. The walk now rejects them with one probe
into this small table, and only the accepted ones are joined to their spans (which still
decide exactly). Rows go with their prompt's global vector (a delete trigger); a facet whose
spans are gone while the prompt lives on only costs that exact check.
"""

from django.db import migrations, models

SQL = """
CREATE TABLE ingest_embeddingfacet (
    project_id bigint NOT NULL,
    content_key varchar(64) NOT NULL,
    service_name varchar(200) NOT NULL DEFAULT '',
    model varchar(200) NOT NULL DEFAULT '',
    provider varchar(64) NOT NULL DEFAULT '',
    PRIMARY KEY (project_id, content_key, service_name, model, provider)
);
-- Facets go with their prompt's global vector. A trigger rather than a foreign key: Django's
-- test flush truncates ingest_embedding, which a foreign key from an unmanaged table forbids.
CREATE FUNCTION ingest_embeddingfacet_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM ingest_embeddingfacet f USING gone g
    WHERE f.project_id = g.project_id AND f.content_key = g.content_key;
    RETURN NULL;
END $$;
CREATE TRIGGER ingest_embedding_forget_facets AFTER DELETE ON ingest_embedding
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION ingest_embeddingfacet_forget();
INSERT INTO ingest_embeddingfacet (project_id, content_key, service_name, model, provider)
SELECT DISTINCT d.project_id, d.content_key, d.service_name, d.model, d.provider FROM ingest_embeddingday d
WHERE EXISTS (SELECT 1 FROM ingest_embedding e WHERE e.project_id = d.project_id AND e.content_key = d.content_key);
"""


class Migration(migrations.Migration):

    dependencies = [
        ('ingest', '0007_embeddings_by_day'),
    ]

    operations = [
        migrations.CreateModel(
            name='EmbeddingFacet',
            fields=[
                ('pk', models.CompositePrimaryKey('project_id', 'content_key', 'service_name', 'model', 'provider',
                                                  blank=True, editable=False, primary_key=True, serialize=False)),
                ('project_id', models.BigIntegerField()),
                ('content_key', models.CharField(max_length=64)),
                ('service_name', models.CharField(default='', max_length=200)),
                ('model', models.CharField(default='', max_length=200)),
                ('provider', models.CharField(default='', max_length=64)),
            ],
            options={
                'db_table': 'ingest_embeddingfacet',
                'managed': False,
            },
        ),
        migrations.RunSQL(SQL, "DROP TRIGGER ingest_embedding_forget_facets ON ingest_embedding; "
                               "DROP FUNCTION ingest_embeddingfacet_forget(); DROP TABLE ingest_embeddingfacet"),
    ]
