"""Console parameter fuzz: every query parameter of every page, the ids in paths and the forms, with
hostile and random values, as a member and as staff. The one assertion: no answer is a 5xx.

Bounded for CI (about a minute on two cores): a fixed list of hostile values for every
parameter, then a fixed number of random Hypothesis examples. The test client re-raises a view's
exception, so a failure shows the traceback and the request.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.conf import settings as django_settings
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.console.conftest import make_spans

# Hypothesis keeps caches (unicode tables) in its home folder, by default .hypothesis/ in the
# checkout, where pytest would then warn about it on every run.
set_hypothesis_home_dir(str(django_settings.DATA_DIR / "hypothesis"))

# Query parameters of each project page (path under /p/<name>/).
PAGES = {
    "": ["range", "start", "end"],
    "spans/": ["range", "start", "end", "service", "model", "provider", "status", "kind", "user", "session",
               "trace", "flag", "q", "sort", "page"],
    "security/": ["range", "start", "end"],
    "similar/": ["text", "span", "service", "range", "start", "end", "k"],
    "trace/": ["id", "span"],
    "span/": ["id"],
    "settings/": [],
}
# Pages outside a project: path -> parameters.
OTHER_PAGES = {"/": ["p"], "/projects/new/": ["name"], "/login/": ["next"], "/password/": []}

HOSTILE = [
    "", " ", "\x00", "a\x00b", "x" * 10_000, "ünïcødé 😀 中文", "\u202e\u200b", "../", "../../../etc/passwd", "..", ".",
    "a/b", "%", "%zz", "%00", "?#&=", "<script>alert(1)</script>", "\"'`", "\r\nSet-Cookie: x=1", "\\", "null",
    "0001-01-01", "0001-01-01T00:00:00", "0001-01-01T00:00:00-14:00", "0001-01-01T00:00:00+14:00",
    "9999-12-31", "9999-12-31T23:59:59", "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59+14:00",
    "2024-02-30T25:61:61", "2024-01-01T00:00:00+99:99", "1970-01-01T00:00:00Z", "-1", "0", "-999999999999",
    "99999999999999999999999999999", "1e308", "1e309", "NaN", "-inf", "0x10", "1.5", "custom", "24h", "30d",
    "time", "cost", "flagged", "success", "tool", " LLM ", "[]", "{}", "x" * 129,
]
# Query strings no dict can express: broken percent-encoding, repeated and empty names.
RAW_QUERIES = [
    "range=%", "start=%zz", "start=%FF%FE%FD", "id=%ED%A0%80", "id=%C0%AE%C0%AE%2F", "span=%00", "q=%25%25%",
    "page=1&page=2&page=-5", "range=1h&range=custom&start=0001-01-01&start=9999-12-31", "id=a&id=b", "a", "=x",
    "&&&", ";;", "id", "start", "k=1&k=1e999", "text=" + "%F0%9F%98%80" * 300, "id=" + "%2F" * 2000,
]
PATH_VALUES = ["a", "a/b", "..", "%2e%2e", "%252F", "%00", "%FF", "x" * 1024, "%E2%80%AE", "a%3Fb%23c", "99999999999999999999"]


def assert_no_5xx(response, what):
    assert response.status_code < 500, f"{what}: {response.status_code}"


@pytest.fixture
def clients(project, member):
    make_spans(project, 3, trace_id="t/1", user_id="u/1", session_id="s 1")
    make_spans(project, 1, span_id="x/../y", trace_id="t/1", prompt="mail me at jane@example.com")
    staff = get_user_model().objects.create_user("root", password="x" * 20, is_staff=True)
    logged = {}
    for who, user in (("member", member), ("staff", staff)):
        client = Client()
        client.force_login(user)
        logged[who] = client
    return logged


def page_paths(project) -> dict[str, list[str]]:
    paths = {f"/p/{project.name}/{page}": params for page, params in PAGES.items()}
    return {**paths, **OTHER_PAGES}


def test_hostile_query_parameters(clients, project):
    for who, client in clients.items():
        # Staff differ from members in what they may see, not in how parameters are read: half the list.
        values = HOSTILE if who == "member" else HOSTILE[::2]
        for path, params in page_paths(project).items():
            for param in params:
                for value in values:
                    assert_no_5xx(client.get(path, {param: value}), f"{who} GET {path} {param}={value[:60]!r}")
            for raw in RAW_QUERIES:
                assert_no_5xx(client.get(f"{path}?{raw}"), f"{who} GET {path}?{raw[:60]}")
            everything = {param: "0001-01-01T00:00:00+14:00" for param in params}
            assert_no_5xx(client.get(path, everything), f"{who} GET {path} all parameters")


def test_hostile_path_ids(clients, project):
    for who, client in clients.items():
        for value in PATH_VALUES:
            for path in (f"/p/{project.name}/traces/{value}/", f"/p/{project.name}/spans/{value}/",
                         f"/p/{project.name}/traces/{value}/?span={value}", f"/p/{value}/", f"/p/{value}/spans/",
                         f"/p/{project.name}/settings/keys/{value}/revoke/"):
                assert_no_5xx(client.get(path), f"{who} GET {path[:80]}")
                assert_no_5xx(client.get(path, follow=True), f"{who} GET {path[:80]} (followed)")
            revoke = f"/p/{project.name}/settings/keys/{value}/revoke/"
            assert_no_5xx(client.post(revoke), f"{who} POST {revoke[:80]}")


def test_hostile_forms(clients, project):
    forms = {
        f"/p/{project.name}/settings/": ["sampling_rate", "redaction_mode", "retention_days"],
        f"/p/{project.name}/settings/keys/": ["name", "nonce"],
        "/projects/new/": ["name"],
        "/password/": ["old_password", "new_password1", "new_password2"],
        "/login/": ["username", "password", "next"],
    }
    for who, client in clients.items():
        for path, fields in forms.items():
            for value in HOSTILE[::4]:  # the login and password forms hash a password each time
                assert_no_5xx(client.post(path, {f: value for f in fields}), f"{who} POST {path} {value[:60]!r}")
            assert_no_5xx(client.post(path, "a=%&b=%zz&a=1", content_type="application/x-www-form-urlencoded"),
                          f"{who} POST {path} broken body")
    # Hostile revokes, by a member, of keys that are not theirs or do not exist.
    for key_id in ("0", "-1", "99999999999999999999", "1" * 40):
        assert_no_5xx(clients["member"].post(f"/p/{project.name}/settings/keys/{quote(key_id)}/revoke/"), key_id)


_value = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE),
                   st.datetimes().map(lambda d: d.isoformat()),
                   st.integers(min_value=-(10**30), max_value=10**30).map(str))


def test_random_query_parameters(clients, project):
    paths = page_paths(project)
    every_param = sorted({p for params in paths.values() for p in params})

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(path=st.sampled_from(sorted(paths)), who=st.sampled_from(sorted(clients)),
           params=st.lists(st.tuples(st.sampled_from(every_param), _value), max_size=6))
    def run(path, who, params):
        # A list of pairs: the same name may come twice (?a=1&a=2).
        query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params)
        assert_no_5xx(clients[who].get(f"{path}?{query}"), f"{who} GET {path}?{query[:200]}")

    run()
