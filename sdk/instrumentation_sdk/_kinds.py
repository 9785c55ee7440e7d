"""Span kinds: what a span is (a model call, a tool, a chain of steps...), as the appliance knows them.

Only LLM and EMBEDDING spans are model calls the appliance prices; the others are the
steps around them. The list mirrors the appliance's (the SDK imports nothing from it).
"""

from __future__ import annotations

from typing import Any

SPAN_KINDS = ("LLM", "CHAIN", "TOOL", "AGENT", "RETRIEVER", "EMBEDDING", "RERANKER", "GUARDRAIL", "EVALUATOR",
              "UNKNOWN")
_BY_NAME = {kind.lower(): kind for kind in SPAN_KINDS}

NAME_MAX = 500


def as_kind(value: Any) -> str | None:
    """The canonical spelling of a kind given in any case, or None when it names none."""
    if not isinstance(value, str):
        return None
    return _BY_NAME.get(value.strip().lower())


def kind_or_raise(value: Any) -> str:
    """`kind=` given by the caller: a bad one is a programming error, said at the call, not lost later."""
    kind = as_kind(value)
    if kind is None:
        raise ValueError(f"kind must be one of {', '.join(SPAN_KINDS)} (any case), not {value!r}")
    return kind


def span_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"name must be a string, not {type(value).__name__}")
    return value[:NAME_MAX]
