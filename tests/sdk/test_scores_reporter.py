"""Scores in the reporter, against the stand-in appliance (tests/sdk/sink.py): their WAL rows, and an appliance
without /v1/scores that must not hold the spans back. Delivery to the real appliance: test_scores_sdk.py."""

from __future__ import annotations

import sqlite3

from instrumentation_sdk._score_wire import BODY_HEAD
from instrumentation_sdk._scores import score


def test_scores_wait_in_the_wal_redacted_while_the_appliance_is_down(sink, delivered, tmp_path):
    sink.down()
    delivered.report({"span_id": "s-1", "trace_id": "t-1", "status": "success"})
    assert score("helpfulness", 4, span_id="s-1", id="sc-1", comment="write to jane.doe@example.com") == "sc-1"
    assert delivered.flush(1) is False
    with sqlite3.connect(tmp_path / "wal.sqlite3") as conn:
        rows = dict(conn.execute("SELECT span_id, body FROM spans").fetchall())
    assert set(rows) == {"s-1", "score:sc-1"}
    assert rows["score:sc-1"].startswith(BODY_HEAD) and not rows["s-1"].startswith(BODY_HEAD)
    assert b"jane.doe@example.com" not in rows["score:sc-1"] and b'"comment_pii":true' in rows["score:sc-1"]


def test_an_appliance_without_the_scores_route_does_not_hold_spans_back(sink, delivered):
    sink.script = [404]  # an appliance older than /v1/scores
    score("helpfulness", 4, trace_id="t-1", id="old")
    assert delivered.flush(5) is True
    assert [r["path"] for r in sink.requests] == ["/v1/scores"]
    assert delivered.stats["rejected"] == 1
    assert (delivered.last_rejections[-1]["span_id"], delivered.last_rejections[-1]["rule"]) == ("score:old", "http_404")
    delivered.report({"span_id": "s-2", "trace_id": "t-2", "status": "success"})
    assert delivered.flush(5) is True
    assert [s["span_id"] for s in sink.spans] == ["s-2"]


def test_scores_wait_while_the_key_is_refused(sink, delivered):
    sink.script = [401]
    score("helpfulness", 4, trace_id="t-1", id="kept")
    assert delivered.flush(1) is False  # kept in the WAL, retried, not dropped
    assert delivered.stats["rejected"] == 0 and delivered.stats["wal_written"] == 1
