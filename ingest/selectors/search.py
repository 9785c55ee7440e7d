"""Similarity search over the embeddings of sampled prompts, scoped to a project.

Small candidate sets (a narrow filter) are scanned exactly; otherwise the HNSW
index is walked with pgvector's iterative scan, so a filter that rejects most
neighbours still yields k results. Django's psycopg cursors bind parameters on
the client (no server-side prepared statements), so `SET LOCAL hnsw.*` applies;
a raw psycopg connection would need prepare_threshold=None for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from django.conf import settings
from django.db import connection, transaction

from ingest.selectors.spans import SPAN_FIELDS, SpanFilters

_JSON_FIELDS = ("attempted_models", "matched_patterns", "metadata")
_FILTER_COLUMNS = (("service", "service_name"), ("model", "model"), ("provider", "provider"))


@dataclass(frozen=True)
class Neighbour:
    content_key: str
    distance: float


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


def _literal(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def _candidate_count(cur, project_id: int, where: str, params: list, cap: int) -> int:
    cur.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT s.prompt_hash FROM ingest_span s WHERE s.project_id = %s "
        f"AND s.prompt_hash IS NOT NULL{where} LIMIT %s) c",
        [project_id, *params, cap + 1],
    )
    return cur.fetchone()[0]


def nearest_contents(*, project_id: int, vector: list[float], k: int, filters: SpanFilters,
                     exclude_key: str | None = None) -> list[Neighbour]:
    where, params = _span_conditions(filters, "s")
    exclude_sql, exclude_params = ("AND e.content_key <> %s", [exclude_key]) if exclude_key else ("", [])
    q = _literal(vector)
    filtered = bool(params)
    with transaction.atomic(), connection.cursor() as cur:
        exact = filtered and _candidate_count(cur, project_id, where, params, settings.SEARCH_EXACT_BELOW) \
            <= settings.SEARCH_EXACT_BELOW
        if exact:
            cur.execute(
                f"""WITH keys AS MATERIALIZED (
                        SELECT DISTINCT s.prompt_hash AS key FROM ingest_span s
                        WHERE s.project_id = %s AND s.prompt_hash IS NOT NULL{where})
                    SELECT e.content_key, e.embedding <=> %s::vector AS d
                    FROM keys JOIN ingest_embedding e ON e.project_id = %s AND e.content_key = keys.key
                    WHERE true {exclude_sql}
                    ORDER BY d LIMIT %s""",
                [project_id, *params, q, project_id, *exclude_params, k],
            )
        else:
            cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(max(settings.SEARCH_EF, 2 * k))])
            cur.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
            span_filter = (
                f"AND EXISTS (SELECT 1 FROM ingest_span s WHERE s.project_id = e.project_id "
                f"AND s.prompt_hash = e.content_key{where})" if filtered else ""
            )
            # relaxed_order may return neighbours slightly out of order: re-sort the few we keep.
            cur.execute(
                f"""WITH c AS MATERIALIZED (
                        SELECT e.content_key, e.embedding <=> %s::vector AS d FROM ingest_embedding e
                        WHERE e.project_id = %s {exclude_sql} {span_filter}
                        ORDER BY d LIMIT %s)
                    SELECT content_key, d FROM c ORDER BY d""",
                [q, project_id, *exclude_params, *params, k],
            )
        return [Neighbour(key, float(d)) for key, d in cur.fetchall()]


def similar_spans(*, project_id: int, vector: list[float], k: int, filters: SpanFilters,
                  exclude_key: str | None = None) -> list[dict]:
    """The latest span (matching the filters) of each of the k nearest distinct prompts."""
    neighbours = nearest_contents(project_id=project_id, vector=vector, k=k, filters=filters, exclude_key=exclude_key)
    if not neighbours:
        return []
    where, params = _span_conditions(filters, "s")
    columns = ", ".join(f"s.{f}" for f in SPAN_FIELDS)
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT DISTINCT ON (s.prompt_hash) {columns} FROM ingest_span s "
            f"WHERE s.project_id = %s AND s.prompt_hash = ANY(%s){where} "
            f"ORDER BY s.prompt_hash, s.timestamp_utc DESC",
            [project_id, [n.content_key for n in neighbours], *params],
        )
        rows = [dict(zip(SPAN_FIELDS, row)) for row in cur.fetchall()]
    for row in rows:
        # Django's psycopg setup hands jsonb back as text on raw cursors.
        for name in _JSON_FIELDS:
            if isinstance(row[name], str):
                row[name] = orjson.loads(row[name])
    by_key = {row["prompt_hash"]: row for row in rows}
    items = []
    for n in neighbours:
        row = by_key.get(n.content_key)
        if row is not None:
            items.append({**row, "score": round(1.0 - n.distance, 6)})
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
