"""Scores on the spans' delivery path (queue, spill file, WAL): how the reporter tells them apart and sends them.

A score travels as a dict carrying SCORE_MARK through report()'s queue and spill file (whose
records keep a span kind, not a type: the mark is in the payload), and as a WAL row whose body
starts with BODY_HEAD and whose id column is "score:<id>". The sender posts such rows to
/v1/scores and the others to /v1/spans; the appliance stores a score id once, so re-sending a
batch after a failure never doubles a score. Imports nothing from the reporter.
"""

from __future__ import annotations

from typing import Any, Callable

SCORE_MARK = "@llm_observe_score"
BODY_HEAD = b'{"' + SCORE_MARK.encode() + b'":1,'
ROW_PREFIX = "score:"
PATH = "/v1/scores"


def is_score(item: dict) -> bool:
    return item.get(SCORE_MARK) == 1


def prepare(item: dict, scanner, dumps: Callable[[Any], bytes]) -> tuple[str, bytes]:
    """(WAL row id, body) of a queued score: its comment's PII redacted here, before any disk or wire."""
    payload = {key: value for key, value in item.items() if key != SCORE_MARK}
    comment = payload.get("comment")
    if comment:
        result = scanner.scan(comment, redact=True, injection=False)
        if result.pii_detected:
            payload["comment"] = result.redacted
            payload["comment_pii"] = True
    body = dumps({SCORE_MARK: 1, **payload})
    if not body.startswith(BODY_HEAD):  # the mark must lead, or the sender would post it as a span
        raise ValueError("score serialised without its leading mark")
    return ROW_PREFIX + str(payload["id"]), body


def split(rows: list[tuple[str | None, bytes]]) -> tuple[list, list]:
    """(score rows, span rows) of a batch, each in its order."""
    scores = [row for row in rows if row[1].startswith(BODY_HEAD)]
    if not scores:
        return [], rows
    return scores, [row for row in rows if not row[1].startswith(BODY_HEAD)]


def batch_body(rows: list[tuple[str | None, bytes]]) -> bytes:
    """The POST /v1/scores body of score rows: their JSON without the mark."""
    return b'{"scores":[' + b",".join(b"{" + body[len(BODY_HEAD):] for _, body in rows) + b"]}"


def score_ids(rows: list[tuple[str | None, bytes]]) -> list[str | None]:
    return [row_id[len(ROW_PREFIX):] if row_id and row_id.startswith(ROW_PREFIX) else row_id for row_id, _ in rows]
