"""Content-Security-Policy: sent with every HTML page, and the console's pages need nothing it forbids.

The browser test (test_browser.py) checks the same pages in Chromium: no violation in its console.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model

from ingest.models import ModelPrice
from tests.console.conftest import make_spans


class _Inline(HTMLParser):
    """Inline scripts, style attributes, <style> elements and on* handlers: what the policy refuses."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and not attrs.get("src") and attrs.get("type") != "application/json":
            self.found.append(f"inline <script> {attrs}")
        if tag == "style":
            self.found.append("<style> element")
        for name in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
        for name in ("href", "src", "action"):
            if (attrs.get(name) or "").strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}=javascript:...>")


def inline_of(html: str) -> list[str]:
    parser = _Inline()
    parser.feed(html)
    return parser.found


@pytest.fixture
def staff_client(client, project):
    staff = get_user_model().objects.create_superuser("root", password="x" * 20)
    project.members.add(staff)
    client.force_login(staff)
    return client


def console_pages(project) -> list[str]:
    base = f"/p/{project.name}/"
    return ["/", "/projects/new/", "/password/", base, base + "?range=24h", base + "spans/?range=24h",
            base + "trace/?id=t-csp", base + "trace/?id=t-csp&span=child", base + "security/",
            base + "similar/?text=hello", base + "settings/", base + "no-such-page/"]


def test_every_console_page_has_the_policy_and_nothing_inline(staff_client, project, other_project):
    make_spans(project, 1, trace_id="t-csp", span_id="root", prompt="mail me at jane@example.com")
    make_spans(project, 1, trace_id="t-csp", span_id="child", parent_span_id="root")
    for url in console_pages(project):
        response = staff_client.get(url)
        assert response.status_code in (200, 404), url
        policy = response["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe-inline" not in policy
        assert not inline_of(response.content.decode()), (url, inline_of(response.content.decode()))
    key_page = staff_client.post(f"/p/{project.name}/settings/keys/", {
        "name": "k", "nonce": staff_client.get(f"/p/{project.name}/settings/").context["key_form"]["nonce"].value()})
    assert key_page.status_code == 201 and not inline_of(key_page.content.decode())


def test_login_and_admin_pages_have_the_policy(client, staff_client):
    from django.test import Client

    anonymous = Client()
    for url in ("/login/", "/admin/login/"):
        response = anonymous.get(url)
        assert response.status_code == 200 and "Content-Security-Policy" in response
        assert not inline_of(response.content.decode()), url
    price = ModelPrice.objects.first()
    for url in ("/admin/", "/admin/ingest/modelprice/", f"/admin/ingest/modelprice/{price.pk}/change/"):
        response = staff_client.get(url)
        assert response.status_code == 200 and "Content-Security-Policy" in response, url
        assert not inline_of(response.content.decode()), (url, inline_of(response.content.decode()))


def test_json_answers_carry_no_policy(client, api_key):
    response = client.get("/v1/spans", headers={"Authorization": f"Bearer {api_key}"})
    assert response["Content-Type"].startswith("application/json")
    assert "Content-Security-Policy" not in response


def test_the_trace_bars_are_data_attributes(staff_client, project):
    # One start for both: each make_spans() reads the clock, and a slow first call (patterns
    # compiled, partitions created) on a loaded machine once put b's end after a's.
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    make_spans(project, 1, start=start, trace_id="t-bars", span_id="a", latency_ms_total=1000)
    make_spans(project, 1, start=start, trace_id="t-bars", span_id="b", parent_span_id="a", latency_ms_total=250)
    body = staff_client.get(f"/p/{project.name}/trace/", {"id": "t-bars"}).content.decode()
    assert 'data-indent="1"' in body and 'data-width="100.00"' in body and 'data-left="0.00"' in body
