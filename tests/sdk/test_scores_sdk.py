"""score(), feedback() and current_span().score() against a real running appliance (one for the session):
delivered through the spans' queue and WAL, read back with GET /v1/scores; an outage with a host killed
mid-way loses no score and stores none twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

import instrumentation_sdk as sdk
from instrumentation_sdk._scores import current_span, feedback, score
from tests.sdk.test_e2e import wal_count

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]
EMAIL = "jane.doe@example.com"


def scores(appliance, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        query = {"limit": 1000, **params, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{appliance.url}/v1/scores", params=query, headers=appliance.headers, timeout=30)
        page.raise_for_status()
        items.extend(page.json()["items"])
        cursor = page.json()["next_cursor"]
        if not cursor:
            return items


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    """This module's own appliance, in a data folder no other pytest session uses (the shared fixture's
    folder name is the same in every session)."""
    import re
    import shutil

    from tests.appliance.test_serve_e2e import Appliance, _free_port
    from tests.sdk.conftest import RunningAppliance, stop_appliance

    data_dir = ROOT / ".data" / "e2e" / f"scores-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    app = Appliance(data_dir, _free_port(), tmp_path_factory.mktemp("scores-appliance-log") / "serve.log")
    try:
        app.start()
        key = re.search(r"API key \(default\)\s*: (\S+)", app.output()).group(1)
        yield RunningAppliance(app, key)
    finally:
        stop_appliance(app)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def reporter(appliance):
    sdk.configure(url=appliance.url, api_key=appliance.key, service_name=f"scores-{uuid.uuid4().hex[:8]}",
                  flush_interval=0.05)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    return reporter


def test_scores_from_spans_functions_and_feedback_land_on_their_targets(appliance, reporter):
    @sdk.llm_observe(service="scored-fn")
    def answer() -> tuple[str, str, str | None]:
        here = current_span()
        return here.trace_id, here.span_id, here.score("latency_ok", 0.9)

    with sdk.llm_span(model="gpt-4o") as span:
        span.set_metadata("prompt", "hello")
        in_span = current_span().score("grounded", True, comment=f"user wrote {EMAIL}")
        fn_trace, fn_span, fn_score = answer()
    trace_id = span.trace_id
    rating = score("helpfulness", 4, trace_id=trace_id, id=f"rating-{uuid.uuid4()}")
    thumbs = feedback(trace_id, positive=False, comment="wrong invoice")
    session = score("tone", 0.5, session_id=f"sess-{uuid.uuid4()}")
    assert all((in_span, fn_score, rating, thumbs, session))
    assert fn_trace == trace_id and fn_span != span.span_id  # the function ran inside the span

    assert reporter.flush(30), reporter.stats
    assert reporter.stats["rejected"] == 0 and reporter.stats.get("scores_sent") == 5
    by_id = {s["id"]: s for s in scores(appliance, trace_id=trace_id)}
    assert set(by_id) == {in_span, fn_score, rating, thumbs}
    assert (by_id[in_span]["span_id"], by_id[in_span]["value"]) == (span.span_id, True)
    assert EMAIL not in by_id[in_span]["comment"] and by_id[in_span]["comment_pii"]
    assert (by_id[fn_score]["span_id"], by_id[fn_score]["value"]) == (fn_span, 0.9)
    assert by_id[rating]["span_id"] is None and by_id[rating]["value"] == 4
    assert (by_id[thumbs]["name"], by_id[thumbs]["value"], by_id[thumbs]["comment"]) == (
        "user_feedback", False, "wrong invoice")
    assert {s["source"] for s in by_id.values()} == {"sdk"}
    # The spans the scores name are stored under the same ids.
    stored = {s["span_id"] for s in appliance.wait_for_spans(2, trace_id=trace_id)}
    assert {span.span_id, fn_span} <= stored
    assert [s["id"] for s in scores(appliance, span_id=fn_span)] == [fn_score]


def test_a_re_sent_score_is_stored_once_and_a_refused_one_does_not_hold_up_the_rest(appliance, reporter):
    trace_id = str(uuid.uuid4())
    same = f"same-{uuid.uuid4()}"
    assert score("helpfulness", 3, trace_id=trace_id, id=same) == same
    assert reporter.flush(30)
    score("helpfulness", 3, trace_id=trace_id, id=same)
    score("verdict", "great", trace_id=trace_id)  # text needs a categorical config: refused by the appliance
    score("helpfulness", 5, trace_id=trace_id)
    assert reporter.flush(30), reporter.stats
    stored = scores(appliance, trace_id=trace_id)
    assert sorted(s["value"] for s in stored) == [3, 5]
    assert reporter.stats["rejected"] == 1
    assert reporter.last_rejections[-1]["rule"] == "unconfigured_categorical"
    assert reporter.last_rejections[-1]["span_id"].startswith("score:")


def test_invalid_scores_are_dropped_at_the_call(reporter, caplog):
    assert score("x", 1) is None  # no target, no enclosing span
    assert current_span().score("x", 1) is None and not current_span()
    assert score("x", float("nan"), trace_id="t") is None
    assert score("", 1, trace_id="t") is None
    assert score("x", [1], trace_id="t") is None
    assert reporter.pending() == 0
    assert "needs a trace_id, span_id or session_id" in caplog.text


HOST = '''
import sys
from instrumentation_sdk import get_reporter
from instrumentation_sdk._scores import score, feedback
prefix, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reporter = get_reporter()
for i in range(start, start + count):
    span_id = f"{prefix}-{i:05d}"
    reporter.report({"span_id": span_id, "trace_id": f"{prefix}-trace", "model": "gpt-4o-mini",
                     "provider": "openai", "status": "success", "prompt": f"question {i}"})
    if i % 2:
        score("helpfulness", i % 5, span_id=span_id, trace_id=f"{prefix}-trace", id=f"{prefix}-score-{i:05d}",
              comment=f"mail me at jane.doe@example.com ({i})")
    else:
        feedback(f"{prefix}-trace", positive=i % 4 == 0, id=f"{prefix}-score-{i:05d}")
print("reported", reporter.flush(2), flush=True)   # False: the appliance is down, all of it waits in the WAL
sys.stdin.readline()
ok = reporter.flush(30)
print("flushed", ok, reporter.stats, flush=True)
'''


def test_outage_with_a_host_killed_loses_no_score_and_stores_none_twice(appliance, tmp_path):
    """Appliance down; 500 spans + 500 scores from a host killed (SIGKILL) after they reached the WAL, 500 + 500
    more from a second host; appliance back: every span and every score stored once, no e-mail address on disk."""
    from tests.sdk.conftest import stop_appliance

    prefix = uuid.uuid4().hex[:8]
    wal = tmp_path / "wal.sqlite3"
    (tmp_path / "host.py").write_text(HOST)
    env = {**os.environ, "LLM_OBSERVE_URL": appliance.url, "LLM_OBSERVE_API_KEY": appliance.key,
           "LLM_OBSERVE_SERVICE": f"outage-{prefix}", "LLM_OBSERVE_WAL_PATH": str(wal),
           "LLM_OBSERVE_BACKOFF_MAX": "1", "PYTHONPATH": str(ROOT)}

    def host(start: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(tmp_path / "host.py"), prefix, str(start), "500"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    stop_appliance(appliance.app)
    second = None
    try:
        first = host(0)
        assert first.stdout.readline().strip() == "reported False"
        assert wal_count(wal) == 1000  # 500 spans and 500 scores, safe on disk...
        first.send_signal(signal.SIGKILL)  # ...so the crash loses nothing
        first.wait(timeout=30)
        second = host(500)
        assert second.stdout.readline().strip() == "reported False"
        assert wal_count(wal) == 2000
        assert b"jane.doe@example.com" not in wal.read_bytes()  # comments redacted before the WAL
    finally:
        appliance.app.handle.close()
        appliance.app.start()
    try:
        deadline = time.monotonic() + 90
        got: list[dict] = []
        while time.monotonic() < deadline and len(got) < 1000:
            got = scores(appliance, trace_id=f"{prefix}-trace")
            time.sleep(0.5)
        assert len(got) == 1000, f"{len(got)} scores stored"
        assert {s["id"] for s in got} == {f"{prefix}-score-{i:05d}" for i in range(1000)}
        spans = appliance.wait_for_spans(1000, timeout=60, trace_id=f"{prefix}-trace")
        assert len(spans) == 1000
        second.stdin.write("stop\n")
        second.stdin.flush()
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert "flushed True" in out
        assert len(scores(appliance, trace_id=f"{prefix}-trace")) == 1000  # still exactly once
        by_id = {s["id"]: s for s in got}
        odd = by_id[f"{prefix}-score-00007"]
        assert (odd["span_id"], odd["value"], odd["comment_pii"]) == (f"{prefix}-00007", 2, True)
        assert "jane.doe@example.com" not in odd["comment"]
        assert by_id[f"{prefix}-score-00004"]["value"] is True and by_id[f"{prefix}-score-00006"]["value"] is False
    finally:
        if second is not None and second.poll() is None:
            second.kill()
