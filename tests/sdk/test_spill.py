"""The spill file: what report() wrote survives a SIGKILL and is delivered by the next process on the same WAL.

Killed processes are real (subprocesses that SIGKILL themselves, or a fork); the spill files
are real files on /dev/shm. The 10,000-span kill test against the real appliance is in test_e2e.py.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import instrumentation_sdk as sdk
from instrumentation_sdk import _spill
from instrumentation_sdk._spill import SEGMENT_BYTES, STATE_AT, WRITING, SpillFile
from tests.sdk.test_reporter import run_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the spill file needs flock and tmpfs")


def spill_dir() -> Path:
    return Path(os.environ["LLM_OBSERVE_SPILL_DIR"])


def test_spans_of_a_killed_process_are_delivered_by_the_next_one_with_their_time_and_redacted(sink, tmp_path):
    env = {"LLM_OBSERVE_URL": sink.url, "LLM_OBSERVE_API_KEY": sink.key,
           "LLM_OBSERVE_FLUSH_INTERVAL": "60", "LLM_OBSERVE_BATCH_SIZE": "1000"}  # nothing is sent before the kill
    out = run_script("""
        import os, signal, time
        from instrumentation_sdk import get_reporter
        r = get_reporter()
        for i in range(300):
            r.report({"span_id": f"k-{i:03d}", "prompt": "my SSN is 123-45-6789" if i == 7 else "hello"})
        print(repr(time.time()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, env)
    assert out.returncode == -9, out.stderr
    reported_by = float(out.stdout.strip())
    assert sink.spans == []  # the killed process sent nothing: the spill file holds it all

    files = _spill.spill_files(spill_dir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(spill_dir().stat().st_mode) == 0o700
    (orphan,) = [f for f in _spill.describe(spill_dir()) if not f["alive"]]
    assert orphan["pending"] == 300 and orphan["meta"]["wal"] == os.environ["LLM_OBSERVE_WAL_PATH"]

    sdk.configure(url=sink.url, api_key=sink.key, flush_interval=0.05)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    assert reporter.flush(10)  # a process that reports nothing still adopts and delivers them
    assert sorted(sink.by_id) == [f"k-{i:03d}" for i in range(300)] and sink.duplicates == 0
    assert reporter.stats["spill_recovered"] == 300
    assert "123-45-6789" not in sink.by_id["k-007"]["prompt"] and sink.by_id["k-007"]["pii_detected"] is True
    stamps = [datetime.fromisoformat(s["timestamp_utc"].replace("Z", "+00:00")) for s in sink.spans]
    assert all(s <= datetime.fromtimestamp(reported_by, tz=timezone.utc) for s in stamps)  # the report time
    assert _spill.spill_files(spill_dir()) == []


def test_a_fork_child_has_its_own_spill_file_and_the_parents_lock_survives_it(sink, tmp_path):
    env = {"LLM_OBSERVE_URL": sink.url, "LLM_OBSERVE_API_KEY": sink.key, "LLM_OBSERVE_FLUSH_INTERVAL": "60",
           "LLM_OBSERVE_BATCH_SIZE": "1000"}
    out = run_script("""
        import os, signal
        from pathlib import Path
        from instrumentation_sdk import get_reporter, _spill
        r = get_reporter()
        for i in range(5):
            r.report({"span_id": f"parent-{i}"})
        pid = os.fork()
        if pid == 0:
            for i in range(3):
                r.report({"span_id": f"child-{i}"})
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        state = sorted((f["alive"], f["pending"], f["meta"]["pid"] == os.getpid()) for f in _spill.describe(
            Path(os.environ["LLM_OBSERVE_SPILL_DIR"])))
        print(state, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, env)
    assert out.returncode == -9, out.stderr
    # the child's file is an orphan of 3; the parent's is alive (the child closed its inherited lock)
    assert out.stdout.strip() == "[(False, 3, False), (True, 5, True)]"
    sdk.configure(url=sink.url, api_key=sink.key, flush_interval=0.05)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    assert reporter.flush(10)
    assert sorted(sink.by_id) == [f"child-{i}" for i in range(3)] + [f"parent-{i}" for i in range(5)]


def _die(spill: SpillFile) -> None:
    """What the kernel does to a killed owner: descriptors closed (lock released), files left."""
    for seg in [spill._active, spill._standby, *spill._retired]:
        if seg is not None:
            seg.close(unlink=False)


def test_a_torn_last_record_is_ignored_and_done_records_are_not_replayed(tmp_path):
    directory = spill_dir()
    spill = SpillFile(directory, key="k", meta={}, max_bytes=SEGMENT_BYTES, dumps=lambda o: repr(o).encode())
    handles = [spill.write({"n": i}, 0, 1000.0 + i) for i in range(4)]
    spill.mark_done(handles[:1])
    seg, _, last = handles[3]
    seg.mm[last + STATE_AT] = WRITING  # killed while copying the last record
    assert [o for o in _spill.orphans(directory, "k")] == []  # the owner lives: not adoptable
    _die(spill)
    unfinished = directory / ".k-1-dead-1.tmp"  # its maker died between creating and renaming it
    unfinished.write_bytes(b"")
    os.utime(unfinished, (time.time() - 120, time.time() - 120))
    (orphan,) = list(_spill.orphans(directory, "k"))
    assert not unfinished.exists()
    try:
        records = list(orphan.records())
        assert [(kind, when, payload) for _, kind, when, payload in records] == [
            (0, 1001.0, b"{'n': 1}"), (0, 1002.0, b"{'n': 2}")]
        orphan.mark_done([records[0][0]])
        assert [p for _, _, _, p in orphan.records()] == [b"{'n': 2}"]
    finally:
        orphan.close()


def test_segments_rotate_are_recycled_and_the_bound_holds(tmp_path):
    directory = spill_dir()
    spill = SpillFile(directory, key="b", meta={}, max_bytes=3 * SEGMENT_BYTES, dumps=lambda o: o)
    payload = b"x" * 100_000
    handles = []
    while True:
        handle = spill.write(payload, 1, 0.0)
        if handle is None:
            break
        handles.append(handle)
    assert len(_spill.spill_files(directory, "b")) == 3 and spill.bytes == 3 * SEGMENT_BYTES
    assert spill.skipped == 1 and 27 <= len(handles) <= 30  # full: report() keeps spans in memory only
    assert spill.pending() == len(handles)
    spill.mark_done(handles)
    spill.mark_done(handles)  # twice is harmless
    spill.collect()
    assert spill.pending() == 0
    assert len(_spill.spill_files(directory, "b")) == 2  # one active, one recycled standby; the third removed
    for _ in range(30):  # writing goes on in the recycled segments, no new file
        spill.mark_done([spill.write(payload, 1, 0.0)])
        spill.collect()
    assert len(_spill.spill_files(directory, "b")) == 2
    big = spill.write(b"y" * (SEGMENT_BYTES + 10), 1, 0.0)  # larger than a segment: one of its own
    assert big is not None and big[0].size > SEGMENT_BYTES
    assert spill.close() is False  # a span not done: the files stay for the next process
    left = list(_spill.orphans(directory, "b"))
    try:
        assert [len(p) for o in left for _, _, _, p in o.records()] == [SEGMENT_BYTES + 10]
    finally:
        for orphan in left:
            orphan.close()


def test_a_span_too_large_for_the_bound_is_still_delivered(sink, delivered):
    sdk.configure(spill_max_bytes=SEGMENT_BYTES)
    delivered.report({"span_id": "huge", "prompt": "z" * (SEGMENT_BYTES + 1)})
    delivered.report({"span_id": "small"})
    assert delivered.flush(10)
    assert set(sink.by_id) == {"huge", "small"}
    assert delivered.stats["spill_skipped"] == 1 and delivered._spill.written == 1


def test_spill_off_and_where_it_lives(monkeypatch, sink):
    sdk.configure(url=sink.url, api_key=sink.key, spill=False)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)  # closed after the test
    reporter.report({"span_id": "a"})
    assert reporter._spill is False and reporter.flush(5) and "a" in sink.by_id
    assert _spill.memory_backed(Path("/dev/shm"))
    monkeypatch.delenv("LLM_OBSERVE_SPILL_DIR")
    directory, why = _spill.spill_directory(None)
    assert directory == Path(f"/dev/shm/llm-observe-{os.getuid()}") and why == ""


def test_cli_shows_and_recovers_the_spill_files_of_ended_processes(sink, tmp_path, capsys):
    from instrumentation_sdk import cli
    from tests.sdk.sink import wal_rows

    out = run_script("""
        import os, signal
        from instrumentation_sdk import get_reporter
        for i in range(20):
            get_reporter().report({"span_id": f"cli-{i}", "prompt": "mail me: eve@example.com"})
        os.kill(os.getpid(), signal.SIGKILL)
    """, {"LLM_OBSERVE_URL": sink.url, "LLM_OBSERVE_API_KEY": sink.key, "LLM_OBSERVE_FLUSH_INTERVAL": "60"})
    assert out.returncode == -9, out.stderr
    assert cli.main(["wal", "status"]) == 0
    assert "1 of ended processes, 20 span(s) to recover" in capsys.readouterr().out
    assert cli.main(["wal", "recover"]) == 0
    assert "recovered 20 span(s)" in capsys.readouterr().out
    wal = Path(os.environ["LLM_OBSERVE_WAL_PATH"])
    assert wal_rows(wal) == 20 and _spill.spill_files(spill_dir()) == []
    with __import__("sqlite3").connect(wal) as conn:  # redacted before it touched the disk
        assert not any(b"eve@example.com" in body for (body,) in conn.execute("SELECT body FROM spans"))
    sdk.configure(url=sink.url, api_key=sink.key, flush_interval=0.05)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    assert reporter.flush(10) and len(sink.by_id) == 20


def test_report_from_a_signal_handler_that_interrupts_report_does_not_deadlock(sink):
    """A handler (or a finaliser: a dropped stream reports itself) may run report() while this very
    thread is inside the spill file's lock; that span goes to memory only, nothing waits forever."""
    out = run_script("""
        import itertools, signal
        from instrumentation_sdk import get_reporter
        r = get_reporter()
        r.report({"span_id": "warm"})  # configuration read, sender started, spill file open
        fired, ids = [], itertools.count()
        def handler(signum, frame):  # may itself be interrupted by the next signal: ids from a counter
            fired.append(r.report({"span_id": f"sig-{next(ids)}"}))
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        # Rounds of several batches (report() wakes the sender: Event.set() has a lock of its own),
        # within the queue's bound; flush() in between (it wakes the sender too).
        for round in range(10):
            for i in range(4000):
                r.report({"span_id": f"main-{round}-{i}"})
            r.flush(30)
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(len(fired), r.stats["spill_skipped"], r.flush(30), flush=True)
    """, {"LLM_OBSERVE_URL": sink.url, "LLM_OBSERVE_API_KEY": sink.key}, timeout=60)
    assert out.returncode == 0, out.stderr
    fired, skipped, flushed = out.stdout.split()
    assert int(fired) > 10 and flushed == "True"
    assert len(sink.by_id) == 1 + 40_000 + int(fired) and sink.duplicates == 0
