"""Issue 17, item 2: the overview's "1h" (whole hours from the roll-ups) and the explorer's "1h" (the
last 60 minutes) are different windows: each page says which it shows, and the overview's links
open the explorer on its own window, so their counts agree."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone

import pytest
from django.urls import reverse

from tests.console.conftest import make_spans


@pytest.fixture
def two_windows(project):
    """One span at the top of the hour that holds now-1h (in the overview's 1h, not the explorer's), one recent."""
    now = datetime.now(timezone.utc)
    hour = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    if now - timedelta(hours=1) - hour < timedelta(seconds=5):
        pytest.skip("too close to the top of an hour for the two windows to differ")
    make_spans(project, 1, start=hour, service_name="billing")
    make_spans(project, 1, start=now - timedelta(minutes=10), service_name="billing")
    return hour


def test_each_page_says_which_window_it_shows(logged_in, project, two_windows):
    overview = logged_in.get(reverse("console:overview", kwargs={"project": project.name}), {"range": "1h"})
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", overview.content.decode()))
    assert f"Showing {two_windows:%Y-%m-%d %H:%M} – " in text
    assert "whole hours, read from the hourly roll-ups (the last 60 minutes, widened to the top of their first hour)" in text
    assert overview.context["data"]["totals"]["spans"] == 2

    explorer = logged_in.get(reverse("console:explorer", kwargs={"project": project.name}), {"range": "1h"})
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", explorer.content.decode()))
    start = explorer.context["start"]
    assert f"Showing {start:%Y-%m-%d %H:%M:%S} – " in text and "the last 60 minutes, to the second" in text
    assert len(explorer.context["page"]["items"]) == 1


def test_the_overviews_links_show_its_own_window(logged_in, project, two_windows):
    overview = logged_in.get(reverse("console:overview", kwargs={"project": project.name}), {"range": "1h"})
    body = overview.content.decode()
    table = body.split("<h2>By service</h2>", 1)[1].split("</table>", 1)[0]
    href = html.unescape(re.search(r'<a href="([^"]+)">billing</a>', table).group(1))
    assert f"start={two_windows:%Y-%m-%dT%H}%3A00" in href and "range=custom" in href and "end=" not in href
    explorer = logged_in.get(href)
    assert len(explorer.context["page"]["items"]) == 2  # as many as the overview's row counts
    row = next(r for r in overview.context["data"]["breakdowns"]["service"] if r["name"] == "billing")
    assert row["spans"] == 2


def test_a_past_custom_range_ends_with_its_last_whole_hour(logged_in, project):
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=6)
    make_spans(project, 1, start=start + timedelta(minutes=10))
    make_spans(project, 1, start=start + timedelta(hours=1, minutes=50))  # after the range's end, in its last hour
    make_spans(project, 1, start=start + timedelta(hours=2, minutes=5))  # after that hour: in neither
    params = {"start": f"{start:%Y-%m-%dT%H:%M}", "end": f"{start + timedelta(hours=1, minutes=30):%Y-%m-%dT%H:%M}"}
    overview = logged_in.get(reverse("console:overview", kwargs={"project": project.name}), params)
    assert overview.context["data"]["window_end"] == start + timedelta(hours=2)
    assert overview.context["data"]["totals"]["spans"] == 2
    table = overview.content.decode().split("<h2>By model</h2>", 1)[1].split("</table>", 1)[0]
    href = html.unescape(re.search(r'<a href="([^"]+)">gpt-4o</a>', table).group(1))
    assert f"end={start + timedelta(hours=2):%Y-%m-%dT%H}%3A00" in href
    assert len(logged_in.get(href).context["page"]["items"]) == 2


def test_the_security_pages_links_show_its_own_window(logged_in, project, two_windows):
    make_spans(project, 1, start=two_windows, service_name="support", prompt="mail anna@example.com")
    page = logged_in.get(reverse("console:security", kwargs={"project": project.name}), {"range": "1h"})
    assert page.context["data"]["totals"]["pii"] == 1
    body = page.content.decode()
    assert f"Showing {two_windows:%Y-%m-%d %H:%M} – " in re.sub(r"<[^>]+>", "", body)
    href = html.unescape(re.search(r'<a href="([^"]+)">support</a>', body).group(1))
    assert len(logged_in.get(href).context["page"]["items"]) == 1
    assert len(page.context["recent"]["items"]) == 1
