"""What a span is: its kind, and which kinds are model calls (priced, counted in roll-ups).

One vocabulary for every convention we ingest (OpenInference span kinds, GenAI operation
names, OpenLLMetry's traceloop.span.kind, the 1.8.1 `span_type`, our SDK's `kind=`).
"""

from __future__ import annotations

SPAN_KINDS = ("LLM", "CHAIN", "TOOL", "AGENT", "RETRIEVER", "EMBEDDING", "RERANKER", "GUARDRAIL", "EVALUATOR",
              "UNKNOWN")
# Kinds that are one call of a model: they have tokens and a price.
MODEL_CALL_KINDS = frozenset({"LLM", "EMBEDDING", "RERANKER"})

# Other spellings of the kinds, lower case.
_ALIASES = {
    "chat": "LLM", "completion": "LLM", "text_completion": "LLM", "generate_content": "LLM", "generation": "LLM",
    "llm_call": "LLM",
    "workflow": "CHAIN", "task": "CHAIN", "pipeline": "CHAIN", "prompt": "CHAIN",
    "function": "TOOL", "execute_tool": "TOOL", "tool_call": "TOOL",
    "invoke_agent": "AGENT", "create_agent": "AGENT",
    "retrieval": "RETRIEVER", "retrieve": "RETRIEVER",
    "embeddings": "EMBEDDING", "embed": "EMBEDDING",
    "rerank": "RERANKER",
    "guard": "GUARDRAIL",
    "eval": "EVALUATOR", "evaluation": "EVALUATOR",
}


def kind_normalize(value: object) -> str | None:
    """The canonical kind for a spelling of one, None when it names none."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    upper = text.upper()
    if upper in SPAN_KINDS:
        return upper
    return _ALIASES.get(text.lower())


def kind_of(*, kind: str | None, model: str | None, has_tokens: bool) -> str:
    """The kind to store: the one given, else LLM for what looks like a model call, else UNKNOWN."""
    if kind:
        return kind
    return "LLM" if model or has_tokens else "UNKNOWN"


def is_model_call(kind: str | None, model: str | None = None) -> bool:
    """Priced and counted as a call: a model-call kind, or a span of unknown kind that names a model."""
    if kind in MODEL_CALL_KINDS:
        return True
    return kind in (None, "UNKNOWN") and bool(model)


def counts_as_call(row: dict) -> bool:
    """Whether a stored row is counted in roll-ups, metrics and budgets.

    Model calls are; so are spans of unknown kind (1.8.1's manual reports, which say nothing
    of what they are). Chains, tools, agents ... are not: their time and tokens are their
    children's. A duplicate is not: the span it names carries the call.
    """
    if row.get("duplicate_of"):
        return False
    kind = row.get("kind")
    return kind is None or kind == "UNKNOWN" or kind in MODEL_CALL_KINDS
