"""A span the appliance cannot take must not hold up the others: bounded retries, isolation, dead letters, the CLI.

Against the ingest stand-in (tests/sdk/sink.py), which answers a whole request 500 when one of
its spans carries the poison marker, like the appliance did before per-span isolation. The
same scenario against the real appliance is in test_e2e.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import instrumentation_sdk as sdk
from instrumentation_sdk import cli
from instrumentation_sdk._wal import dead_letter_path


def rows(path: Path, table: str = "spans") -> list[tuple]:
    if not Path(path).exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT span_id, attempts FROM {table} ORDER BY id").fetchall()


def is_poison(span: dict) -> bool:
    return (span.get("metadata") or {}).get("marker") == "poison"


def report_batch(reporter, prefix: str, poison_at: int | None = None, count: int = 100) -> list[str]:
    ids = []
    for i in range(count):
        span = {"span_id": f"{prefix}-{i:03d}", "model": "gpt-4o"}
        if i == poison_at:
            span["metadata"] = {"marker": "poison"}
        ids.append(reporter.report(span))
    return ids


def test_one_poison_span_among_99_good_is_dead_lettered_and_the_rest_is_stored(sink, delivered, tmp_path):
    # One batch of 100 (the sender wakes at batch_size); every request holding the poison answers 500.
    sdk.configure(batch_size=100, flush_interval=5, server_error_retries=3)
    sink.poison = is_poison
    ids = report_batch(delivered, "p", poison_at=37)
    assert delivered.flush(20)  # True: 99 delivered, 1 set aside; nothing waits any more

    poison_id = ids[37]
    assert set(sink.by_id) == set(ids) - {poison_id} and sink.duplicates == 0
    wal = tmp_path / "wal.sqlite3"
    assert rows(wal) == []
    dead = rows(dead_letter_path(wal), "dead")
    assert [span_id for span_id, _ in dead] == [poison_id]
    assert delivered.stats["dead_lettered"] == 1 and delivered.stats["rejected"] == 0
    # The whole batch got exactly the bounded number of 500s before it was split...
    assert [a for a in sink.answers if a == (500, 100)] == [(500, 100)] * 3
    # ...then halves: about two requests per level, log2(100) levels, and the lone span tried twice.
    assert sum(1 for status, _ in sink.answers if status == 500) <= 3 + 8 + 2
    assert sink.answers.count((500, 1)) == 2
    assert len(sink.requests) < 30

    # New spans flow, also while the dead letter waits for an operator.
    later = report_batch(delivered, "after", count=20)
    assert delivered.flush(10)
    assert set(later) <= set(sink.by_id) and len(sink.by_id) == 119


def test_a_server_that_fails_every_request_dead_letters_nothing(sink, delivered, tmp_path):
    """500 for everything is the appliance's fault, not the spans': no proof, no dead letter, no loss."""
    sdk.configure(batch_size=50, flush_interval=0.05, server_error_retries=2, backoff_initial=0.02,
                  backoff_max=0.05)
    sink.poison = lambda span: True
    ids = report_batch(delivered, "broken", count=50)
    assert not delivered.flush(1.5)  # undelivered: False
    assert sum(1 for status, _ in sink.answers if status == 500) >= 6  # the bound was passed, splits tried
    wal = tmp_path / "wal.sqlite3"
    assert len(rows(wal)) == 50 and rows(dead_letter_path(wal), "dead") == []
    assert delivered.stats["dead_lettered"] == 0

    sink.poison = None  # the appliance is fixed
    assert delivered.flush(10)
    assert set(sink.by_id) == set(ids) and rows(wal) == []


def test_a_lone_poison_span_waits_for_proof_then_is_set_aside(sink, delivered, tmp_path):
    """A batch of one span that 500s: set aside only once the appliance has accepted something else."""
    sdk.configure(flush_interval=0.05, server_error_retries=2, backoff_initial=0.02, backoff_max=0.05)
    sink.poison = is_poison
    (poison_id,) = report_batch(delivered, "lone", poison_at=0, count=1)
    assert not delivered.flush(1)
    wal = tmp_path / "wal.sqlite3"
    assert [span_id for span_id, _ in rows(wal)] == [poison_id]  # retried, not yet judged
    good = report_batch(delivered, "good", count=3)
    assert delivered.flush(10)
    assert set(sink.by_id) == set(good)
    assert rows(wal) == [] and [s for s, _ in rows(dead_letter_path(wal), "dead")] == [poison_id]


def test_a_4xx_naming_no_span_splits_the_batch_and_drops_only_the_bad_span(sink, delivered, tmp_path):
    sdk.configure(batch_size=40, flush_interval=5)
    sink.refuse = is_poison
    ids = report_batch(delivered, "r", poison_at=5, count=40)
    assert delivered.flush(10)
    assert set(sink.by_id) == set(ids) - {ids[5]}
    assert delivered.stats["rejected"] == 1 and delivered.stats["dead_lettered"] == 0
    assert [r["span_id"] for r in delivered.last_rejections] == [ids[5]]
    assert delivered.last_rejections[0]["rule"] == "http_400"
    assert rows(tmp_path / "wal.sqlite3") == []


def test_a_400_naming_some_spans_is_final_for_them_and_the_rest_is_resent(sink, delivered):
    """A 4xx stores nothing: the spans it names are dropped with their reasons, the others sent again."""
    sdk.configure(batch_size=10, flush_interval=5)
    sink.all_or_nothing = True
    sink.reject = lambda span: "too deep" if span["span_id"] in ("n-003", "n-007") else None
    ids = report_batch(delivered, "n", count=10)
    assert delivered.flush(10)
    assert set(sink.by_id) == set(ids) - {"n-003", "n-007"}
    assert [status for status, _ in sink.answers] == [400, 202]
    assert delivered.stats["rejected"] == 2
    assert {(r["span_id"], r["reason"]) for r in delivered.last_rejections} == {("n-003", "too deep"),
                                                                                ("n-007", "too deep")}


def test_cli_lists_replays_and_purges_dead_letters(sink, delivered, tmp_path, capsys):
    sdk.configure(batch_size=10, flush_interval=5, server_error_retries=1)
    sink.poison = is_poison
    ids = report_batch(delivered, "c", poison_at=2, count=10)
    assert delivered.flush(10)
    wal = tmp_path / "wal.sqlite3"
    capsys.readouterr()

    assert cli.main(["wal", "status"]) == 0
    out = capsys.readouterr().out
    assert str(wal) in out and "dead letters: 1" in out

    assert cli.main(["wal", "list"]) == 0
    out = capsys.readouterr().out
    assert ids[2] in out and "HTTP 500" in out and "Recursion limit reached" in out
    assert cli.main(["wal", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["span_id"] == ids[2] and listed["dead_at"] <= time.time()

    assert cli.main(["wal", "replay", "--span-id", "not-there"]) == 1
    assert cli.main(["wal", "purge"]) == 1  # says what to delete, deletes nothing
    capsys.readouterr()

    sink.poison = None  # the appliance was fixed: replay sends the span again
    assert cli.main(["wal", "replay"]) == 0
    assert "moved 1 dead letter" in capsys.readouterr().out
    assert rows(dead_letter_path(wal), "dead") == [] and [s for s, _ in rows(wal)] == [ids[2]]
    assert delivered.flush(10)
    assert set(sink.by_id) == set(ids) and rows(wal) == []

    # purge: another poison, set aside, then deleted
    sink.poison = is_poison
    (again,) = report_batch(delivered, "d", poison_at=0, count=1)
    report_batch(delivered, "e", count=2)
    assert delivered.flush(10)
    assert [s for s, _ in rows(dead_letter_path(wal), "dead")] == [again]
    assert cli.main(["wal", "purge", "--span-id", again]) == 0
    assert "deleted 1" in capsys.readouterr().out
    assert rows(dead_letter_path(wal), "dead") == []
