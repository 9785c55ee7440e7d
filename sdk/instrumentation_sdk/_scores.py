"""Scores and feedback from the application: `score()`, `feedback()`, `current_span().score()`.

    from instrumentation_sdk._scores import score, feedback, current_span
    score("helpfulness", 4, trace_id=trace_id, comment="clear and short")
    feedback(trace_id, positive=False, comment="wrong invoice")      # end-user thumbs down
    with llm_span(model="gpt-4o") as span:
        current_span().score("grounded", True)                         # on the span being recorded

Non-blocking like report(): the score joins the spans' queue, spill file and WAL (see
_score_wire.py), so an appliance outage loses none. Never raises into the application: a score
that cannot be valid (no target, no name, a value that is not a number, true/false or a
category) is dropped with a warning and None is returned; otherwise its id.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

from instrumentation_sdk._reporter import SpanReporter, get_reporter
from instrumentation_sdk._score_wire import SCORE_MARK
from instrumentation_sdk._spans import current_span_ids

log = logging.getLogger("instrumentation_sdk")

FEEDBACK_NAME = "user_feedback"
MAX_COMMENT = 2000  # the appliance refuses longer comments: cut here rather than lose the score


def _problem(name: Any, value: Any, targets: dict) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "a score needs a name"
    if not any(targets.values()):
        return "a score needs a trace_id, span_id or session_id (or to be given inside a span)"
    if isinstance(value, bool) or isinstance(value, str):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return None
    return "a score's value is a finite number, true/false or a category (str)"


def score(name: str, value: float | bool | str, *, trace_id: str | None = None, span_id: str | None = None,
          session_id: str | None = None, comment: str | None = None, id: str | None = None) -> str | None:
    """Record a score of a span, trace or session; returns its id (the appliance stores an id once)."""
    try:
        targets = {"trace_id": trace_id, "span_id": span_id, "session_id": session_id}
        problem = _problem(name, value, targets)
        if problem:
            log.warning("llm-observe: score %r not recorded: %s", name, problem)
            return None
        item: dict[str, Any] = {SCORE_MARK: 1, "id": str(id) if id else str(uuid.uuid4()), "name": name.strip(),
                                "value": value, "source": "sdk",
                                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"}
        item.update({key: str(target) for key, target in targets.items() if target})
        if comment:
            item["comment"] = str(comment)[:MAX_COMMENT]
        reporter = get_reporter()
        if isinstance(reporter, SpanReporter):
            reporter.submit_score(item)
        elif hasattr(reporter, "report_score"):  # a custom reporter that takes scores
            reporter.report_score(dict(item))
        else:
            log.debug("llm-observe: the current reporter takes no scores; score %r dropped", name)
            return None
        return item["id"]
    except Exception:  # noqa: BLE001 - observability must never break the application
        log.exception("llm-observe: could not queue a score")
        return None


def feedback(trace_id: str, positive: bool = True, comment: str | None = None, *, id: str | None = None,
             name: str = FEEDBACK_NAME) -> str | None:
    """An end user's thumbs up (positive=True) or down on a trace: a boolean score named user_feedback."""
    return score(name, bool(positive), trace_id=trace_id, comment=comment, id=id)


class SpanRef:
    """The span the caller is inside (llm_span, @llm_observe), as far as scores are concerned."""

    __slots__ = ("trace_id", "span_id")

    def __init__(self, trace_id: str | None, span_id: str | None) -> None:
        self.trace_id, self.span_id = trace_id, span_id

    def __bool__(self) -> bool:
        return self.span_id is not None

    def score(self, name: str, value: float | bool | str, *, comment: str | None = None,
              id: str | None = None) -> str | None:
        return score(name, value, trace_id=self.trace_id, span_id=self.span_id, comment=comment, id=id)

    def feedback(self, positive: bool = True, comment: str | None = None, *, id: str | None = None) -> str | None:
        return feedback(self.trace_id, positive, comment, id=id) if self.trace_id else None


def current_span() -> SpanRef:
    """The innermost open span of this thread or task; outside any span a falsy SpanRef whose score() is a no-op
    (with a warning), so instrumented code runs the same with and without an enclosing span."""
    ids = current_span_ids()
    return SpanRef(*ids) if ids else SpanRef(None, None)
