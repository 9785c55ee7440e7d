"""Number formatting, query-string and span helpers for the console templates."""

from __future__ import annotations

from django import template
from django.urls import reverse
from django.utils.http import urlencode

from ingest.kinds import SPAN_KINDS

register = template.Library()


@register.filter
def intcomma_(value) -> str:
    if value is None:
        return "–"
    return f"{int(value):,}"


@register.filter
def usd(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value == 0:
        return "$0"
    if abs(value) < 0.01:
        return f"${value:.6f}".rstrip("0")
    return f"${value:,.2f}"


@register.filter
def micro_usd(value) -> str:
    return "–" if value is None else usd(value / 1e6)


@register.filter
def ms(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value >= 10_000:
        return f"{value / 1000:,.1f} s"
    if value >= 100:
        return f"{value:,.0f} ms"
    return f"{value:.1f} ms"


@register.filter
def percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


@register.filter
def duration(seconds) -> str:
    seconds = int(seconds)
    if seconds % 86400 == 0:
        return f"{seconds // 86400} day" + ("s" if seconds // 86400 > 1 else "")
    if seconds % 3600 == 0:
        return f"{seconds // 3600} hour" + ("s" if seconds // 3600 > 1 else "")
    return f"{seconds // 60} min"


@register.simple_tag(takes_context=True)
def query(context, **changes) -> str:
    """The current query string with some parameters replaced (None or '' removes them); page is reset."""
    params = {k: v for k, v in context["request"].GET.items() if k != "page"}
    for key, value in changes.items():
        if value in (None, ""):
            params.pop(key, None)
        else:
            params[key] = value
    return "?" + urlencode(params)


@register.filter
def make_list_words(value: str) -> list[str]:
    return value.split()


@register.filter
def pretty_json(value) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


@register.simple_tag
def trace_url(project: str, trace_id: str, span_id: str | None = None) -> str:
    """The trace page, ids in the query string: they may hold '/', '?', '#', '..' or anything else."""
    params = {"id": trace_id, **({"span": span_id} if span_id else {})}
    return reverse("console:trace", kwargs={"project": project}) + "?" + urlencode(params)


@register.simple_tag
def span_url(project: str, span_id: str) -> str:
    return reverse("console:span", kwargs={"project": project}) + "?" + urlencode({"id": span_id})


@register.filter
def kind_class(kind) -> str:
    """The CSS class of a kind badge; anything else (a stored value we do not know) looks like UNKNOWN."""
    return f"kind-{kind.lower()}" if kind in SPAN_KINDS else "kind-unknown"


@register.filter
def span_label(span) -> str:
    """What names a span in a list: its name, else its model, else (last resort) its id."""
    return span.get("name") or span.get("model") or span.get("span_id") or ""


@register.filter
def cost_status(span) -> str:
    """Why a span costs what it does (SpanOut.cost_status): priced, estimated, not_applicable,
    duplicate, unknown_price or no_tokens."""
    from ingest.schemas import SpanOut

    return span.get("cost_status") or SpanOut.resolve_cost_status(span)
