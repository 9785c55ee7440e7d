"""ingest_embeddingday in half precision (pgvector halfvec): the second copy of every vector,
kept for narrow-window searches, and its HNSW graphs take half the room.

At 1M vectors the day table cost ~1.6 GB and its graphs 1.95 GB on top of the global ones
(tests/performance/bench_search.py); a graph that fits in shared_buffers is what keeps a
search at a few ms. A halfvec keeps ~3 significant digits per dimension, far below the
differences that order neighbours of unit-length MiniLM vectors (cosine to the fp32 copy
> 0.99999); searches compute the score they return from the global fp32 vector.

The rewrite drops the day graphs, converts the column of every partition and builds the
graphs again: minutes on a large installation, during which ingestion waits on the table.
"""

from django.db import migrations

import pgvector.django.halfvec

TO_HALF = """
DROP INDEX IF EXISTS ingest_embeddingday_hnsw;
ALTER TABLE ingest_embeddingday ALTER COLUMN embedding TYPE halfvec(384) USING embedding::halfvec(384);
CREATE INDEX ingest_embeddingday_hnsw ON ingest_embeddingday USING hnsw (embedding halfvec_cosine_ops)
    WITH (m = 24, ef_construction = 128);
"""

TO_FULL = """
DROP INDEX IF EXISTS ingest_embeddingday_hnsw;
ALTER TABLE ingest_embeddingday ALTER COLUMN embedding TYPE vector(384) USING embedding::vector(384);
CREATE INDEX ingest_embeddingday_hnsw ON ingest_embeddingday USING hnsw (embedding vector_cosine_ops)
    WITH (m = 24, ef_construction = 128);
"""


class Migration(migrations.Migration):

    dependencies = [
        ('ingest', '0008_embedding_facets'),
    ]

    operations = [
        migrations.AlterField(
            model_name='embeddingday',
            name='embedding',
            field=pgvector.django.halfvec.HalfVectorField(dimensions=384),
        ),
        migrations.RunSQL(TO_HALF, TO_FULL),
    ]
