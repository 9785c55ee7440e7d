"""Issue 17, item 1: the overview's "(none)" rows (spans without a model, provider or service) open
the explorer on exactly those spans, as many as the row counts."""

from __future__ import annotations

import html
import re

import pytest
from django.urls import reverse

from tests.console.conftest import make_spans


def overview(client, project):
    return client.get(reverse("console:overview", kwargs={"project": project.name}), {"range": "24h"})


def none_link(page: str, label: str) -> str:
    """The href of the "(none)" row of the "By <label>" table."""
    table = page.split(f"<h2>By {label}</h2>", 1)[1].split("</table>", 1)[0]
    hrefs = re.findall(r'<a href="([^"]+)"><span class="muted">\(none\)</span></a>', table)
    assert len(hrefs) == 1, table
    return html.unescape(hrefs[0])


def explorer_rows(client, href: str) -> list[str]:
    response = client.get(href)
    assert response.status_code == 200
    return [s["span_id"] for s in response.context["page"]["items"]]


@pytest.mark.parametrize("label,fields", [("model", {"model": None, "provider": None}),
                                          ("provider", {"provider": None}),
                                          ("service", {"service_name": None})])
def test_a_none_row_lists_the_spans_it_counts(logged_in, project, label, fields):
    make_spans(project, 4)
    plain = {s["span_id"] for s in make_spans(project, 3, **fields)}
    # Not model calls, so not in the overview's counts: an agent and its tool, with nothing set either.
    make_spans(project, 2, kind="agent", name="planner", prompt_tokens=None, completion_tokens=None,
               **{**fields, "model": None})
    page = overview(logged_in, project)
    row = next(r for r in page.context["data"]["breakdowns"][label] if r["missing"])
    assert row["spans"] == 3
    href = none_link(page.content.decode(), label)
    assert f"missing={label}" in href and "%28none%29" not in href
    assert set(explorer_rows(logged_in, href)) == plain


def test_missing_and_calls_filters_in_the_explorer(logged_in, project):
    make_spans(project, 2)
    no_model = {s["span_id"] for s in make_spans(project, 2, model=None, provider=None)}
    agents = {s["span_id"] for s in make_spans(project, 1, kind="agent", model=None, provider=None,
                                               prompt_tokens=None, completion_tokens=None)}
    url = reverse("console:explorer", kwargs={"project": project.name})
    assert set(explorer_rows(logged_in, f"{url}?missing=model")) == no_model | agents
    assert set(explorer_rows(logged_in, f"{url}?missing=model&calls=1")) == no_model
    # A model chosen in the menu wins over "(none)"; an unknown field is an error on the page, not a 500.
    assert len(explorer_rows(logged_in, f"{url}?missing=model&model=gpt-4o")) == 2
    page = logged_in.get(f"{url}?missing=colour")
    assert page.status_code == 200 and "can be asked to be empty" in page.content.decode()
    # The filter shows as a removable chip, and the filter form keeps it.
    body = logged_in.get(f"{url}?missing=model&calls=1").content.decode()
    assert "model: (none) ×" in body and 'name="missing" value="model"' in body and 'name="calls" value="1"' in body


def test_the_security_pages_none_rows_link_too(logged_in, project):
    flagged = {s["span_id"] for s in make_spans(project, 2, service_name=None, user_id=None,
                                                prompt="mail me at anna@example.com")}
    make_spans(project, 2, service_name=None, user_id=None)  # not flagged
    make_spans(project, 1, prompt="mail me at bob@example.com", user_id="u1")  # flagged, has a service and user
    page = logged_in.get(reverse("console:security", kwargs={"project": project.name}), {"range": "24h"})
    body = page.content.decode()
    for label in ("service", "user"):
        href = none_link(body, label)
        assert set(explorer_rows(logged_in, href)) == flagged, label
