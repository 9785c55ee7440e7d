"""Span names and kinds in the console: badges in every span list, the explorer's kind filter, and
what the cost column says for tools, estimates, duplicates and unknown prices."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from tests.console.conftest import make_spans


def url(name, **kw):
    from django.urls import reverse

    return reverse(name, kwargs=kw)


def agent_trace(project, trace_id="t-agent"):
    """An agent run: agent -> tool + LLM call, as an instrumented framework would send it."""
    now = datetime.now(timezone.utc) - timedelta(minutes=10)
    make_spans(project, 1, trace_id=trace_id, span_id=f"{trace_id}-agent", start=now, kind="agent", name="support_agent",
               model=None, provider=None, prompt_tokens=None, completion_tokens=None)
    make_spans(project, 1, trace_id=trace_id, span_id=f"{trace_id}-tool", parent_span_id=f"{trace_id}-agent",
               start=now + timedelta(seconds=1), kind="TOOL", name="lookup_order", model=None, provider=None,
               prompt_tokens=None, completion_tokens=None, prompt='{"order": 42}')
    make_spans(project, 1, trace_id=trace_id, span_id=f"{trace_id}-llm", parent_span_id=f"{trace_id}-agent",
               start=now + timedelta(seconds=2), kind="llm", name="chat gpt-4o")


def test_explorer_shows_kind_badges_and_names(logged_in, project):
    agent_trace(project)
    page = logged_in.get(url("console:explorer", project=project.name), {"range": "24h"})
    body = page.content.decode()
    assert {s["kind"] for s in page.context["page"]["items"]} == {"AGENT", "TOOL", "LLM"}
    assert '<span class="badge kind kind-tool" title="span kind">tool</span> lookup_order' in body
    assert '<span class="badge kind kind-agent" title="span kind">agent</span> support_agent' in body
    assert '<span class="badge kind kind-llm" title="span kind">llm</span> chat gpt-4o' in body
    assert 'style=' not in body  # CSP: no inline styles


@pytest.mark.parametrize("given", ["TOOL", "tool", " Tool "])
def test_explorer_filters_by_kind_in_any_case(logged_in, project, given):
    agent_trace(project)
    make_spans(project, 3)  # plain LLM calls of 1.8.1 clients (no kind sent): stored as LLM
    page = logged_in.get(url("console:explorer", project=project.name), {"kind": given, "range": "24h"})
    items = page.context["page"]["items"]
    assert [s["name"] for s in items] == ["lookup_order"]
    assert '<option value="TOOL" selected>tool</option>' in page.content.decode()
    llm = logged_in.get(url("console:explorer", project=project.name), {"kind": "llm", "range": "24h"})
    assert len(llm.context["page"]["items"]) == 4 and {s["kind"] for s in llm.context["page"]["items"]} == {"LLM"}


def test_an_unknown_kind_filter_is_a_message_not_an_error(logged_in, project):
    agent_trace(project)
    page = logged_in.get(url("console:explorer", project=project.name), {"kind": "hammer", "range": "24h"})
    assert page.status_code == 200
    assert "kind: Select a valid choice" in page.content.decode()
    assert "Those filters were ignored" in page.content.decode()


def cost_cell(body: str, name: str) -> str:
    """The cost cell of the explorer row of a span (by name)."""
    row = next(r for r in body.split("<tr>") if f"</span> {name}</td>" in r)
    return re.findall(r'<td class="num">(.*?)</td>', row, re.S)[1]


def test_cost_of_a_tool_or_chain_is_not_applicable_never_an_unknown_price(logged_in, project):
    agent_trace(project)
    body = logged_in.get(url("console:explorer", project=project.name), {"range": "24h"}).content.decode()
    assert "n/a" in cost_cell(body, "lookup_order") and "n/a" in cost_cell(body, "support_agent")
    assert "$" in cost_cell(body, "chat gpt-4o")
    detail = logged_in.get(url("console:trace", project=project.name), {"id": "t-agent", "span": "t-agent-tool"})
    text = detail.content.decode()
    assert "no price known for this model" not in text
    assert re.search(r"<dt>cost</dt><dd><span class=\"muted\"[^>]*>n/a</span></dd>", text)


def test_an_llm_span_of_an_unpriced_model_says_so(logged_in, project):
    make_spans(project, 1, trace_id="t-x", span_id="x-1", model="my-own-finetune", provider="acme", name="chat mine")
    detail = logged_in.get(url("console:trace", project=project.name), {"id": "t-x"}).content.decode()
    assert "no price known for this model" in detail


def test_an_estimated_cost_is_marked_as_such(logged_in, project):
    make_spans(project, 1, trace_id="t-est", span_id="est-1", token_count_method="estimated", name="chat est",
               prompt_tokens=1000, completion_tokens=0)
    body = logged_in.get(url("console:explorer", project=project.name), {"range": "24h"}).content.decode()
    assert re.search(r"~\$[0-9.]+ \(estimated\)", cost_cell(body, "chat est"))
    detail = logged_in.get(url("console:trace", project=project.name), {"id": "t-est"}).content.decode()
    assert "(estimated)</span>" in detail and "price version" in detail


def test_a_duplicate_span_links_to_the_span_that_carries_the_cost(logged_in, project):
    now = datetime.now(timezone.utc) - timedelta(minutes=3)
    make_spans(project, 1, trace_id="t-dup", span_id="sdk-span", start=now, response_id="chatcmpl-1", name="chat a")
    make_spans(project, 1, trace_id="t-dup", span_id="otel-span", start=now + timedelta(milliseconds=5),
               response_id="chatcmpl-1", name="chat b")
    page = logged_in.get(url("console:trace", project=project.name), {"id": "t-dup"})
    spans = {s["span_id"]: s for s in page.context["spans"]}
    dup = next(s for s in spans.values() if s["duplicate_of"])
    kept = spans[dup["duplicate_of"]]
    assert kept["duplicate_of"] is None
    detail = logged_in.get(url("console:trace", project=project.name),
                           {"id": "t-dup", "span": dup["span_id"]}).content.decode()
    link = url("console:span", project=project.name) + f"?id={kept['span_id']}"
    assert f'<span class="muted">duplicate of</span> <a href="{link}"' in detail
    assert 'class="badge dup"' in detail


def test_trace_tree_names_non_llm_spans_instead_of_showing_their_ids(logged_in, project):
    agent_trace(project)
    page = logged_in.get(url("console:trace", project=project.name), {"id": "t-agent"})
    body = page.content.decode()
    tree = body.split('<table class="tree">')[1].split("</table>")[0]
    for span_id, label in (("t-agent-agent", "support_agent"), ("t-agent-tool", "lookup_order"),
                           ("t-agent-llm", "chat gpt-4o")):
        assert re.search(rf'span={span_id}">{re.escape(label)}</a>', tree), label
    assert 'kind-agent' in tree and 'kind-tool' in tree and 'kind-llm' in tree
    detail = logged_in.get(url("console:trace", project=project.name), {"id": "t-agent", "span": "t-agent-tool"})
    assert "lookup_order <small" in detail.content.decode()


def test_security_page_lists_flagged_spans_with_name_and_kind(logged_in, project):
    make_spans(project, 1, kind="tool", name="send_email", model=None, prompt_tokens=None, completion_tokens=None,
               prompt="mail me at jane@example.com")
    body = logged_in.get(url("console:security", project=project.name), {"range": "24h"}).content.decode()
    assert '<span class="badge kind kind-tool" title="span kind">tool</span> send_email' in body


def test_similar_page_lists_name_and_kind(logged_in, project, monkeypatch):
    rows = make_spans(project, 1, kind="retriever", name="vector_search", model=None, prompt_tokens=None,
                      completion_tokens=None, prompt="find invoices")
    item = {**rows[0], "score": 0.91}
    monkeypatch.setattr("console.views.search_similar", lambda **kw: [item])
    body = logged_in.get(url("console:similar", project=project.name), {"text": "invoices"}).content.decode()
    assert '<span class="badge kind kind-retriever" title="span kind">retriever</span> vector_search' in body


def test_kind_class_of_an_unknown_value_is_the_unknown_badge():
    from console.templatetags.console_tags import kind_class, span_label

    assert kind_class("TOOL") == "kind-tool" and kind_class("x\" onclick=") == "kind-unknown"
    assert kind_class(None) == "kind-unknown"
    assert span_label({"span_id": "ab12", "model": "gpt-4o"}) == "gpt-4o"
    assert span_label({"span_id": "ab12", "name": "plan"}) == "plan"
    assert span_label({"span_id": "ab12"}) == "ab12"
