from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from django.contrib.auth import get_user_model

from ingest.models import Project
from ingest.services.spans import spans_prepare, spans_store

_ids = itertools.count()


def make_spans(project, n, *, start=None, **fields):
    """Store n spans through the real ingest path (prepare = scan + price, store = COPY + roll-ups)."""
    start = start or datetime.now(timezone.utc) - timedelta(hours=1)
    items = []
    for i in range(n):
        item = {"span_id": f"s{next(_ids)}", "trace_id": fields.get("trace_id", f"t{i}"),
                "timestamp_utc": (start + timedelta(seconds=i)).isoformat(), "model": "gpt-4o", "provider": "openai",
                "service_name": "billing", "prompt_tokens": 100, "completion_tokens": 50, "latency_ms_total": 200 + i,
                "prompt": f"question number {i}", "response": "an answer"}
        item.update({k: v for k, v in fields.items() if k != "trace_id"})
        items.append(item)
    prepared = spans_prepare(project=project, items=items)
    assert not prepared.rejected, prepared.rejected
    spans_store(rows=prepared.rows)
    return prepared.rows


@pytest.fixture(autouse=True)
def shipped_config(db):
    """The shipped price table and patterns, as `make run` loads them."""
    import io

    from django.core.management import call_command

    call_command("load_config", stdout=io.StringIO())


@pytest.fixture(autouse=True)
def own_cache_keys(settings):
    """Each test its own key prefix in the real Redis: login failures of one test never lock another."""
    import copy
    import uuid

    caches = copy.deepcopy(settings.CACHES)
    caches["default"]["KEY_PREFIX"] = f"test-{uuid.uuid4().hex}"
    settings.CACHES = caches


@pytest.fixture
def member(db, project):
    user = get_user_model().objects.create_user("alice", password="correct horse battery")
    project.members.add(user)
    return user


@pytest.fixture
def other_project(db):
    return Project.objects.create(name="globex")


@pytest.fixture
def logged_in(client, member):
    client.force_login(member)
    return client
