"""Similarity search over the embeddings of sampled prompts, scoped to a project.

Two layouts of the same vectors (see ingest.models.Embedding and EmbeddingDay):

- Narrow windows (up to SEARCH_DAY_GRAPHS_MAX_DAYS UTC days) walk the per-day HNSW graphs of
  ingest_embeddingday: one Merge Append of the window's day graphs, whose rows carry the
  service, model and provider, so those filters hold during pgvector's iterative scan. The
  first k distinct prompts are joined to their latest span matching the filters exactly
  (rows know only their day: the span check settles the window's edges). A filter the
  planner estimates to leave few rows is scanned exactly (btree indexes, no graph). The day
  copies are half precision (halfvec): the k prompts found are scored and ordered by their
  fp32 global vectors.
- Wide windows (and none) walk the one global graph of ingest_embedding: thirty day graphs
  cost more than one big one. Each neighbour, nearest first, is joined to its latest span
  matching the filters: a neighbour without one is skipped and the walk goes on, so a filter
  that rejects most neighbours still yields k results. A filter leaving few spans (the
  planner's estimate: counting would read them all) is scanned exactly; a walk that ends
  short of k falls back to the exact scan if that stays cheap.

tests/performance/bench_search.py measures recall and latency at 100k and 1M.

Django's psycopg cursors bind parameters on the client (no server-side prepared
statements), so `set_config(..., true)` (SET LOCAL) applies; a raw psycopg
connection would need prepare_threshold=None for the same reason.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
from django.conf import settings
from django.db import connection, transaction

from ingest.selectors.spans import SPAN_FIELDS, SpanFilters

_JSON_FIELDS = ("attempted_models", "matched_patterns", "metadata")
_FILTER_COLUMNS = (("service", "service_name"), ("model", "model"), ("provider", "provider"))
# Bound of the global HNSW walk, as pgvector's hnsw.max_scan_tuples (default 20,000) bounds an iterative scan.
_MAX_WALK = 20_000
# A walk that ends short of k falls back to the exact scan when at most this many spans are
# estimated to match (an exact scan of 20k candidates takes ~0.2 s, of 200k ~2 s).
_EXACT_FALLBACK_BELOW = 20_000
# The day graphs' walk never reads more than this many rows (a prompt's rows on several days
# count separately); hnsw.max_scan_tuples bounds each day's iterative scan too.
_MAX_DAY_WALK = 5_000


def _span_conditions(filters: SpanFilters, alias: str) -> tuple[str, list]:
    parts, params = [], []
    if filters.start:
        parts.append(f"{alias}.timestamp_utc >= %s")
        params.append(filters.start)
    if filters.end:
        parts.append(f"{alias}.timestamp_utc < %s")
        params.append(filters.end)
    for name, column in _FILTER_COLUMNS:
        value = getattr(filters, name)
        if value is not None:
            parts.append(f"{alias}.{column} = %s")
            params.append(value)
    return "".join(f" AND {p}" for p in parts), params


def _vector_conditions(filters: SpanFilters) -> tuple[str, list]:
    """The filters on the embedding rows: whole UTC days of the window (pruning partitions), and columns."""
    parts, params = [], []
    if filters.start:
        parts.append("e.day >= %s")
        params.append(filters.start.astimezone(timezone.utc).date())
    if filters.end:
        # `end` is exclusive: a window ending at midnight does not reach into that day.
        parts.append("e.day <= %s")
        params.append((filters.end.astimezone(timezone.utc) - timedelta(microseconds=1)).date())
    for name, column in _FILTER_COLUMNS:
        value = getattr(filters, name)
        if value is not None:
            parts.append(f"e.{column} = %s")
            params.append(value)
    return "".join(f" AND {p}" for p in parts), params


def _literal(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def _estimated_candidates(cur, project_id: int, where: str, params: list) -> float:
    """The planner's estimate of the spans with a prompt that match the filters (statistics only, no scan)."""
    cur.execute(
        f"EXPLAIN (FORMAT JSON) SELECT 1 FROM ingest_span s WHERE s.project_id = %s AND s.prompt_hash IS NOT NULL"
        f"{where}",
        [project_id, *params],
    )
    plan = cur.fetchone()[0]
    if isinstance(plan, (str, bytes)):  # Django's psycopg setup hands json back as text on raw cursors
        plan = orjson.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def _nearest_global(*, project_id: int, vector: list[float], k: int, filters: SpanFilters, exclude_key: str | None,
             fields: tuple[str, ...]) -> list[tuple]:
    """(distance, *fields of the latest span matching the filters) of the k nearest prompts, nearest first."""
    where, params = _span_conditions(filters, "s")
    prompt_sql, prompt_params = ("AND e.content_key <> %s", [exclude_key]) if exclude_key else ("", [])
    # A neighbour never seen with the filtered service/model/provider is rejected during the walk
    # with one probe, instead of a probe per daily span partition; the spans still decide exactly.
    facets = [(column, getattr(filters, name)) for name, column in _FILTER_COLUMNS if getattr(filters, name) is not None]
    if facets:
        prompt_sql += (" AND EXISTS (SELECT 1 FROM ingest_embeddingfacet f WHERE f.project_id = e.project_id "
                        "AND f.content_key = e.content_key" + "".join(f" AND f.{c} = %s" for c, _ in facets) + ")")
        prompt_params = [*prompt_params, *(value for _, value in facets)]
    q = _literal(vector)
    columns = ", ".join(f"s.{f}" for f in fields)
    # Newest first over daily partitions: the scan stops at the first partition holding the prompt.
    latest = (f"CROSS JOIN LATERAL (SELECT * FROM ingest_span s WHERE s.project_id = %s "
              f"AND s.prompt_hash = c.content_key{where} ORDER BY s.timestamp_utc DESC LIMIT 1) s")
    with transaction.atomic(), connection.cursor() as cur:
        estimate = _estimated_candidates(cur, project_id, where, params) if params else None
        exact = estimate is not None and estimate <= settings.SEARCH_EXACT_BELOW
        if not exact:
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                        [str(max(settings.SEARCH_EF, 2 * k)), "relaxed_order"])
            # The walk is consumed only as far as k neighbours with a matching span; relaxed_order
            # may return them slightly out of order, so the k kept are re-sorted.
            cur.execute(
                f"""WITH r AS MATERIALIZED (
                        SELECT c.d, {columns} FROM (
                            SELECT e.content_key, e.embedding <=> %s::vector AS d FROM ingest_embedding e
                            WHERE e.project_id = %s {prompt_sql} ORDER BY d LIMIT %s) c
                        {latest}
                        LIMIT %s)
                    SELECT * FROM r ORDER BY d""",
                [q, project_id, *prompt_params, _MAX_WALK, project_id, *params, k],
            )
            rows = cur.fetchall()
            # Short of k: the walk found fewer matching prompts than estimated (e.g. many spans of few
            # prompts) and the exact scan settles it, unless so many spans match that scanning them
            # would take seconds; then the walk's answer stands.
            if len(rows) >= k or estimate is None or estimate > _EXACT_FALLBACK_BELOW:
                return rows
        cur.execute(
            f"""WITH keys AS MATERIALIZED (
                    SELECT DISTINCT s.prompt_hash AS key FROM ingest_span s
                    WHERE s.project_id = %s AND s.prompt_hash IS NOT NULL{where}),
                c AS MATERIALIZED (
                    SELECT e.content_key, e.embedding <=> %s::vector AS d
                    FROM keys JOIN ingest_embedding e ON e.project_id = %s AND e.content_key = keys.key
                    WHERE true {prompt_sql}
                    ORDER BY d LIMIT %s)
                SELECT c.d, {columns} FROM c {latest} ORDER BY c.d""",
            [project_id, *params, q, project_id, *prompt_params, k, project_id, *params],
        )
        return cur.fetchall()


def _estimated_rows(cur, project_id: int, where: str, params: list) -> float:
    """The planner's estimate of the embedding rows matching the filters (statistics only, no scan)."""
    cur.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM ingest_embeddingday e WHERE e.project_id = %s{where}",
                [project_id, *params])
    plan = cur.fetchone()[0]
    if isinstance(plan, (str, bytes)):  # Django's psycopg setup hands json back as text on raw cursors
        plan = orjson.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def _nearest_days(*, project_id: int, vector: list[float], k: int, filters: SpanFilters, exclude_key: str | None,
             fields: tuple[str, ...]) -> list[tuple]:
    """_nearest over the day graphs of a narrow window."""
    vector_where, vector_params = _vector_conditions(filters)
    span_where, span_params = _span_conditions(filters, "s")
    if exclude_key:
        vector_where += " AND e.content_key <> %s"
        vector_params.append(exclude_key)
    columns = ", ".join(f"s.{f}" for f in fields)
    with transaction.atomic(), connection.cursor() as cur:
        exact = bool(vector_params) and _estimated_rows(cur, project_id, vector_where,
                                                        vector_params) <= settings.SEARCH_EXACT_BELOW
        if exact:
            # Without index scans the HNSW graphs are out of play; bitmap scans of the btrees stay.
            cur.execute("SET LOCAL enable_indexscan = off")
        else:
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                        [str(max(settings.SEARCH_DAY_EF, k)), "relaxed_order"])
        # A prompt has a row per day (and service/model) it was seen: read a few rows per wanted
        # prompt, more if they were mostly copies of the same prompts or had no span in the window.
        # The exact scan computes every distance anyway: it keeps the largest number at once.
        walk = _MAX_DAY_WALK if exact else 4 * k
        q = _literal(vector)
        while True:
            cur.execute(
                f"""WITH w AS MATERIALIZED (
                        SELECT e.content_key, e.day, e.embedding <=> %s::halfvec(384) AS d FROM ingest_embeddingday e
                        WHERE e.project_id = %s{vector_where} ORDER BY d LIMIT %s),
                    c AS (SELECT content_key, min(d) AS d, min(day) AS first_day, max(day) AS last_day
                          FROM w GROUP BY content_key ORDER BY 2),
                    r AS (SELECT c.content_key, c.d, {columns} FROM c
                          CROSS JOIN LATERAL (
                              SELECT * FROM ingest_span s WHERE s.project_id = %s AND s.prompt_hash = c.content_key
                              AND s.timestamp_utc >= c.first_day::timestamp AT TIME ZONE 'UTC'
                              AND s.timestamp_utc < (c.last_day + 1)::timestamp AT TIME ZONE 'UTC'{span_where}
                              ORDER BY s.timestamp_utc DESC LIMIT 1) s
                          ORDER BY c.d LIMIT %s)
                    -- The day copies are half precision: the k found are scored from their fp32 vector.
                    SELECT coalesce(g.embedding <=> %s::vector, r.d), r.*, (SELECT count(*) FROM w) FROM r
                    LEFT JOIN ingest_embedding g ON g.project_id = %s AND g.content_key = r.content_key
                    ORDER BY 1""",
                [q, project_id, *vector_params, walk, project_id, *span_params, k, q, project_id],
            )
            rows = cur.fetchall()
            walked = rows[0][-1] if rows else walk
            if len(rows) >= k or walked < walk or walk >= _MAX_DAY_WALK:
                return [(row[0], *row[3:-1]) for row in rows]  # without r.content_key, r.d and the count
            walk = min(_MAX_DAY_WALK, walk * 8)


def _window_days(filters: SpanFilters) -> int | None:
    """How many UTC days the window touches (None: no start, i.e. all of time)."""
    if filters.start is None:
        return None
    end = (filters.end or datetime.now(timezone.utc)).astimezone(timezone.utc) - timedelta(microseconds=1)
    return max(1, (end.date() - filters.start.astimezone(timezone.utc).date()).days + 1)


def _nearest(*, project_id: int, vector: list[float], k: int, filters: SpanFilters, exclude_key: str | None,
             fields: tuple[str, ...]) -> list[tuple]:
    """(distance, *fields of the latest span matching the filters) of the k nearest prompts, nearest first."""
    days = _window_days(filters)
    nearest = _nearest_days if days is not None and days <= settings.SEARCH_DAY_GRAPHS_MAX_DAYS else _nearest_global
    return nearest(project_id=project_id, vector=vector, k=k, filters=filters, exclude_key=exclude_key, fields=fields)


def similar_spans(*, project_id: int, vector: list[float], k: int, filters: SpanFilters,
                  exclude_key: str | None = None) -> list[dict]:
    """The latest span (matching the filters) of each of the k nearest distinct prompts."""
    rows = _nearest(project_id=project_id, vector=vector, k=k, filters=filters, exclude_key=exclude_key,
                    fields=SPAN_FIELDS)
    items = []
    for distance, *values in rows:
        row = dict(zip(SPAN_FIELDS, values))
        # Django's psycopg setup hands jsonb back as text on raw cursors.
        for name in _JSON_FIELDS:
            if isinstance(row[name], str):
                row[name] = orjson.loads(row[name])
        items.append({**row, "score": round(1.0 - float(distance), 6)})
    return items


def span_search_key(*, project_id: int, span_id: str) -> dict | None:
    """prompt_hash, prompt and PII flag of one span (looked up through the key table's timestamp)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT s.prompt_hash, s.prompt, s.pii_detected FROM ingest_spankey k JOIN ingest_span s "
            "ON s.project_id = k.project_id AND s.timestamp_utc = k.timestamp_utc AND s.span_id = k.span_id "
            "WHERE k.project_id = %s AND k.span_id = %s",
            [project_id, span_id],
        )
        row = cur.fetchone()
    if row is None:
        return None
    return {"prompt_hash": row[0], "prompt": row[1], "pii_detected": row[2]}


def embedding_of(*, project_id: int, content_key: str) -> list[float] | None:
    with connection.cursor() as cur:
        cur.execute("SELECT embedding::text FROM ingest_embedding WHERE project_id = %s AND content_key = %s",
                    [project_id, content_key])
        row = cur.fetchone()
    if row is None:
        return None
    return [float(x) for x in row[0].strip("[]").split(",")]


class SearchError(ValueError):
    def __init__(self, status: int, rule: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.rule, self.message, self.field = status, rule, message, field


def search_similar(*, project_id: int, text: str | None, span_id: str | None, k: int,
                   filters: SpanFilters) -> list[dict]:
    """The spans nearest to a text or to another span's prompt."""
    from ingest.services.embeddings import embed_texts

    if bool(text) == bool(span_id):
        raise SearchError(400, "invalid_request", "give exactly one of text or span_id", "text")
    exclude = None
    if span_id:
        found = span_search_key(project_id=project_id, span_id=span_id)
        if found is None:
            raise SearchError(404, "not_found", "no such span in your project", "span_id")
        if found["pii_detected"]:
            raise SearchError(400, "not_searchable", "this span's prompt contained PII: it has no embedding", "span_id")
        if not found["prompt"]:
            raise SearchError(400, "not_searchable", "this span has no prompt to compare", "span_id")
        exclude = found["prompt_hash"]
        vector = embedding_of(project_id=project_id, content_key=exclude) if exclude else None
        if vector is None:
            vector = embed_texts([found["prompt"]])[0]
    else:
        vector = embed_texts([text])[0]
    return similar_spans(project_id=project_id, vector=vector, k=k, filters=filters, exclude_key=exclude)
