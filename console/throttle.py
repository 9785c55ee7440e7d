"""Login throttling for the console and the admin, on the shared cache (Redis), so every worker agrees.

Two counters of failed logins, each over a window of LOGIN_LOCKOUT_SECONDS: one per account name
(whether it exists or not, so a lock tells nothing about which names exist) and one per client
address. Past LOGIN_FAILURES_PER_ACCOUNT / LOGIN_FAILURES_PER_ADDRESS failures that account or
address is locked for LOGIN_LOCKOUT_SECONDS: every attempt is refused, the right password included.
A successful login clears its account's counter (not its address's: an attacker with one
account of their own could otherwise reset their address between guesses).

The client address is REMOTE_ADDR. Behind a reverse proxy that is the proxy's address, so every
user shares one address counter; X-Forwarded-For is not trusted (anyone can send it) unless
LOGIN_TRUSTED_PROXY_HOPS says how many proxies append to it.

Pieces: `LockoutBackend`, first in AUTHENTICATION_BACKENDS, refuses locked attempts for any
caller of authenticate(); the form classes say why; signal handlers (connected in
ConsoleConfig.ready) count failures and successes. If the cache is unreachable, logins go on
unthrottled (logged): an appliance whose Redis is down must still let its operators in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from prometheus_client import Counter

import ingest.metrics  # noqa: F401 - its process-wide settings (no *_created series) apply here too

log = logging.getLogger(__name__)

LOCKOUTS = Counter("llm_login_lockouts", "Console/admin logins locked after repeated failures, by what was locked",
                   ["scope"])  # account | address
SCOPES = ("account", "address")
for _scope in SCOPES:
    LOCKOUTS.labels(_scope)  # exposed at 0 from the start, so rate() and alerts have a series


def _limits() -> dict[str, int]:
    return {"account": settings.LOGIN_FAILURES_PER_ACCOUNT, "address": settings.LOGIN_FAILURES_PER_ADDRESS}


def client_address(request) -> str | None:
    if request is None:
        return None
    hops = settings.LOGIN_TRUSTED_PROXY_HOPS
    if hops:
        forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.META.get("REMOTE_ADDR") or None


def _key(kind: str, scope: str, value: str) -> str:
    if scope == "account":
        value = value.strip().casefold()
    return f"login:{kind}:{scope}:{hashlib.sha256(value.encode('utf-8', 'replace')).hexdigest()[:40]}"


def _subjects(username, address) -> list[tuple[str, str]]:
    return [(scope, value) for scope, value in (("account", username), ("address", address))
            if isinstance(value, str) and value]


def lockout_remaining(*, username, address) -> int:
    """Seconds left of a lock on this account or this address; 0 when neither is locked."""
    subjects = _subjects(username, address)
    if not subjects:
        return 0
    try:
        until = cache.get_many([_key("lock", scope, value) for scope, value in subjects]).values()
    except Exception:  # noqa: BLE001 - see the module docstring: no cache, no throttling
        log.exception("login throttling is off: the cache cannot be read")
        return 0
    return max((math.ceil(u - time.time()) for u in until), default=0) if until else 0


def login_failed(*, username, address) -> None:
    window = settings.LOGIN_LOCKOUT_SECONDS
    limits = _limits()
    try:
        for scope, value in _subjects(username, address):
            key = _key("fail", scope, value)
            cache.add(key, 0, timeout=window)  # the window starts at the first failure
            try:
                failures = cache.incr(key)
            except ValueError:  # expired between add and incr
                failures = 1
                cache.set(key, failures, timeout=window)
            if failures >= limits[scope]:
                lock = _key("lock", scope, value)
                if cache.add(lock, time.time() + window, timeout=window):
                    LOCKOUTS.labels(scope).inc()
                    log.warning("login: %s locked for %d s after %d failed attempts (%s)", scope, window, failures,
                                value if scope == "address" else "account name withheld")
                cache.delete(key)
    except Exception:  # noqa: BLE001
        log.exception("login throttling is off: the cache cannot be written")


def login_succeeded(*, username) -> None:
    try:
        if isinstance(username, str) and username:
            cache.delete(_key("fail", "account", username))
    except Exception:  # noqa: BLE001
        log.exception("login throttling: the cache cannot be written")


def login_unlock(*, username: str | None = None, address: str | None = None) -> None:
    """Lift a lock at once (manage.py login_unlock)."""
    for scope, value in _subjects(username, address):
        cache.delete_many([_key("lock", scope, value), _key("fail", scope, value)])


def lockout_message(seconds: int) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    return f"Too many failed attempts; try again in {minutes} minute{'s' if minutes > 1 else ''}."


def _username(credentials: dict):
    return credentials.get(get_user_model().USERNAME_FIELD, credentials.get("username"))


def on_login_failed(sender, credentials, request=None, **kwargs) -> None:
    login_failed(username=_username(credentials), address=client_address(request))


def on_logged_in(sender, request, user, **kwargs) -> None:
    login_succeeded(username=user.get_username())


class LockoutBackend:
    """Refuses every authentication of a locked account or from a locked address.

    PermissionDenied stops authenticate() before the password is even checked by the next backend.
    No get_user(): it never logs anyone in, and force_login() picks the first backend that has one.
    """

    def authenticate(self, request, **credentials):
        if lockout_remaining(username=_username(credentials), address=client_address(request)):
            raise PermissionDenied("locked after too many failed logins")
        return None


class _Throttled:
    def clean(self):
        username = self.cleaned_data.get("username")
        address = client_address(self.request)
        remaining = lockout_remaining(username=username, address=address)
        if remaining:
            raise forms.ValidationError(lockout_message(remaining), code="locked")
        try:
            return super().clean()
        except forms.ValidationError:
            # The attempt that reaches the limit says so at once rather than on the next try.
            remaining = lockout_remaining(username=username, address=address)
            if remaining:
                raise forms.ValidationError(lockout_message(remaining), code="locked") from None
            raise


class ThrottledAuthenticationForm(_Throttled, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(_Throttled, AdminAuthenticationForm):
    pass
