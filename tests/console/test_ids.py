"""Ids are whatever a key holder sent: every console page renders them, and every link it draws works.

Spans with hostile ids are stored through the real ingest services; then the console is crawled
(every same-site link of every page, as a member) and no answer may be a 5xx.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from django.contrib.auth import get_user_model

from ingest.schemas import MAX_ID
from tests.console.conftest import make_spans

HOSTILE_IDS = [
    "a/b", "/leading", "trailing/", "a//b", "%", "%2F", "%2e%2e", "100%sure", "what?x=1&y=2", "#fragment", "a#b",
    "with spaces inside", "..", ".", "../..", "./x", "a/../b", "ünïcødé-😀-中文", "\u202eevil", "tab\tid", "new\nline",
    "\"quoted'", "<script>alert(1)</script>", "a&b=c", "+plus+", "back\\slash", "semi;colon", "x" * MAX_ID,
]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def links_of(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.links


def crawl(client, starts: list[str], depth: int = 2) -> dict[str, int]:
    """Every same-site console link up to `depth` clicks from `starts`: url -> status. Each page once.

    The links of a span list reached by a link are fetched but not followed: they only combine
    the same filters again (a user of a service sorted by cost, ...), thousands of pages.
    """
    seen: dict[str, int] = {}
    queue = deque((url, 0) for url in starts)
    while queue:
        url, level = queue.popleft()
        if url in seen:
            continue
        response = client.get(url)
        seen[url] = response.status_code
        if level == depth or response.status_code != 200 or not response["Content-Type"].startswith("text/html"):
            continue
        if level and urlsplit(url).path.endswith("/spans/"):
            continue
        for href in links_of(response.content.decode()):
            parts = urlsplit(urljoin(url, href))
            if not parts.netloc and parts.path.startswith("/p/"):
                queue.append((parts.path + (f"?{parts.query}" if parts.query else ""), level + 1))
    return seen


@pytest.fixture
def hostile(project):
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    for i, value in enumerate(HOSTILE_IDS):
        # The id as a trace, as a span (child of a root in that trace), and in the other id-like fields.
        make_spans(project, 1, span_id=f"root-{i}", trace_id=value, start=start + timedelta(seconds=2 * i),
                   user_id=value, session_id=value, service_name=value[:200])
        make_spans(project, 1, span_id=value, trace_id=value, parent_span_id=f"root-{i}",
                   start=start + timedelta(seconds=2 * i + 1), prompt="mail me at jane@example.com")
    return project


def test_every_page_and_link_works_with_hostile_ids(logged_in, hostile):
    base = f"/p/{hostile.name}/"
    starts = [base + "?range=24h", base + "spans/?range=24h", base + "spans/?range=24h&page=2",
              base + "security/?range=24h", base + "similar/"]
    for value in HOSTILE_IDS:
        starts += [f"{base}similar/?{_q(span=value)}", f"{base}span/?{_q(id=value)}",
                   f"{base}trace/?{_q(id=value, span=value)}", f"{base}spans/?{_q(trace=value)}"]
    statuses = crawl(logged_in, starts)
    errors = {url: status for url, status in statuses.items() if status >= 500}
    assert not errors, errors
    # Every stored trace was reached through a link, and showed the right spans.
    traces = {url for url, status in statuses.items() if urlsplit(url).path == base + "trace/" and status == 200}
    for value in HOSTILE_IDS:
        response = logged_in.get(f"{base}trace/?{_q(id=value, span=value)}")
        assert response.status_code == 200, value
        assert response.context["trace_id"] == value
        assert {s["span_id"] for s in response.context["spans"]} == {f"root-{HOSTILE_IDS.index(value)}", value}
        assert response.context["selected"]["span_id"] == value
        assert any(_params(url).get("id") == value for url in traces), f"no link led to trace {value!r}"
        assert "<script>alert(1)</script>" not in response.content.decode()


def test_span_links_lead_to_their_trace(logged_in, hostile):
    for value in HOSTILE_IDS:
        response = logged_in.get(f"/p/{hostile.name}/span/?{_q(id=value)}")
        assert response.status_code == 302
        assert _params(response["Location"]) == {"id": value, "span": value}


@pytest.mark.parametrize("value", ["a/b", "a/../b", "what?x=1&y=2", "100%sure", "ünïcødé-😀-中文"])
def test_former_path_urls_redirect_to_the_query_form(logged_in, hostile, value):
    from urllib.parse import quote

    response = logged_in.get(f"/p/{hostile.name}/traces/{quote(value, safe='')}/?span={quote(value, safe='')}")
    assert response.status_code == 302 and _params(response["Location"]) == {"id": value, "span": value}
    followed = logged_in.get(response["Location"])
    assert followed.status_code == 200 and followed.context["selected"]["span_id"] == value
    response = logged_in.get(f"/p/{hostile.name}/spans/{quote(value, safe='')}/", follow=True)
    assert response.status_code == 200 and response.context["selected"]["span_id"] == value


@pytest.mark.parametrize("value", ["", "x" * (MAX_ID + 1), "x" * 1024, "a\x00b", "no-such-id"])
def test_ids_no_span_can_have_are_a_404(logged_in, hostile, value):
    for page in ("trace", "span"):
        assert logged_in.get(f"/p/{hostile.name}/{page}/", {"id": value}).status_code == 404
    assert logged_in.get(f"/p/{hostile.name}/similar/", {"span": value}).status_code == 200


def test_staff_see_the_same_pages(client, hostile):
    staff = get_user_model().objects.create_user("root", password="x" * 20, is_staff=True)
    client.force_login(staff)
    statuses = crawl(client, [f"/p/{hostile.name}/spans/?range=24h", f"/p/{hostile.name}/security/?range=24h"],
                     depth=1)
    assert statuses and not {u: s for u, s in statuses.items() if s >= 500}


def _q(**params) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


def _params(url: str) -> dict:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
