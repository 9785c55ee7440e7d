"""Login throttling of the console and the admin, counted in the real Redis (console.throttle)."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command
from django.test import Client
from prometheus_client import REGISTRY

PASSWORD = "correct horse battery staple"
LOGIN_PAGES = {"console": "/login/", "admin": "/admin/login/"}


@pytest.fixture
def ops(db):
    return get_user_model().objects.create_user("ops", password=PASSWORD, is_staff=True)


def attempt(page: str, username: str, password: str, address: str = "10.0.0.1"):
    client = Client(REMOTE_ADDR=address)
    return client, client.post(LOGIN_PAGES[page], {"username": username, "password": password})


def lockouts(scope: str) -> float:
    return REGISTRY.get_sample_value("llm_login_lockouts_total", {"scope": scope}) or 0.0


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.parametrize("page", LOGIN_PAGES)
def test_an_account_is_locked_after_repeated_failures_even_with_the_right_password(ops, settings, page):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 5
    before = lockouts("account")
    for i in range(4):
        _, response = attempt(page, "ops", f"wrong {i}", address=f"10.0.1.{i}")  # a different address each time
        assert response.status_code == 200 and "Too many failed attempts" not in response.content.decode()
    _, fifth = attempt(page, "ops", "wrong 5", address="10.0.1.5")
    assert "Too many failed attempts; try again in 15 minutes." in fifth.content.decode()
    assert lockouts("account") == before + 1
    _, other_spelling = attempt(page, " OPS", "wrong 6", address="10.0.1.6")  # the same account name
    assert "Too many failed attempts" in other_spelling.content.decode()
    client, right = attempt(page, "ops", PASSWORD, address="10.0.1.7")
    assert right.status_code == 200 and not logged_in(client)
    assert "Too many failed attempts; try again in 15 minutes." in right.content.decode()
    # authenticate() itself refuses, whoever calls it (LockoutBackend).
    assert authenticate(None, username="ops", password=PASSWORD) is None
    assert lockouts("account") == before + 1  # one lock, one count


def test_an_address_is_locked_whatever_account_it_tries(ops, settings):
    settings.LOGIN_FAILURES_PER_ADDRESS = 4
    before = lockouts("address")
    for i in range(4):
        attempt("console", f"user{i}", "guess", address="10.0.2.1")
    client, response = attempt("console", "ops", PASSWORD, address="10.0.2.1")
    assert not logged_in(client) and "Too many failed attempts" in response.content.decode()
    assert lockouts("address") == before + 1
    # Another address is not concerned, and X-Forwarded-For is not trusted by default.
    client, response = attempt("console", "ops", PASSWORD, address="10.0.2.2")
    assert response.status_code == 302 and logged_in(client)
    forged = Client(REMOTE_ADDR="10.0.2.1", HTTP_X_FORWARDED_FOR="10.9.9.9")
    forged.post("/login/", {"username": "ops", "password": PASSWORD})
    assert not logged_in(forged)


def test_a_trusted_proxy_hop_gives_the_client_address(ops, settings):
    settings.LOGIN_FAILURES_PER_ADDRESS = 2
    settings.LOGIN_TRUSTED_PROXY_HOPS = 1
    proxy = "10.0.3.1"
    for _ in range(2):
        Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR="203.0.113.7").post("/login/", {"username": "x", "password": "y"})
    locked = Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR="203.0.113.7")
    locked.post("/login/", {"username": "ops", "password": PASSWORD})
    other = Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR="203.0.113.8")
    other.post("/login/", {"username": "ops", "password": PASSWORD})
    assert not logged_in(locked) and logged_in(other)


def test_a_successful_login_clears_the_account_counter(ops, settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 3
    for _ in range(2):
        attempt("console", "ops", "wrong")
    client, response = attempt("console", "ops", PASSWORD)
    assert logged_in(client)
    for _ in range(2):  # two more: without the reset this would be the 4th failure, past the limit
        attempt("console", "ops", "wrong")
    client, response = attempt("console", "ops", PASSWORD)
    assert logged_in(client)


def test_the_lock_ends_and_can_be_lifted(ops, settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 2
    for _ in range(2):
        attempt("admin", "ops", "wrong")
    client, _ = attempt("admin", "ops", PASSWORD)
    assert not logged_in(client)
    call_command("login_unlock", user="ops", stdout=io.StringIO())
    client, response = attempt("admin", "ops", PASSWORD)
    assert response.status_code == 302 and logged_in(client)
    settings.LOGIN_LOCKOUT_SECONDS = 1
    for _ in range(2):
        attempt("console", "ops", "wrong", address="10.0.4.1")
    import time

    time.sleep(2.1)  # Redis expires the lock
    client, _ = attempt("console", "ops", PASSWORD, address="10.0.4.1")
    assert logged_in(client)


def test_the_metric_is_exposed_from_the_start(client):
    from ingest.metrics import metrics_exposition

    body, _ = metrics_exposition()
    assert b'llm_login_lockouts_total{scope="account"}' in body
    assert b'llm_login_lockouts_total{scope="address"}' in body


def test_without_redis_logins_go_on_unthrottled(ops, settings, caplog):
    """A dead cache must not lock the operators out of the appliance they need to repair."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0", "OPTIONS": {"socket_connect_timeout": 1}}}
    settings.LOGIN_FAILURES_PER_ACCOUNT = 1
    attempt("console", "ops", "wrong")
    client, response = attempt("console", "ops", PASSWORD)
    assert response.status_code == 302 and logged_in(client)
    assert "login throttling is off" in caplog.text
