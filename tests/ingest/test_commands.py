"""Management commands: create_api_key, bootstrap, maintain_partitions."""

from __future__ import annotations

import io
import re
from datetime import datetime, time, timedelta, timezone

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from ingest.models import ApiKey, Project, SpanKey
from ingest.services.partitions import partition_name, partitions_ensure, partitions_list


def run(*args, **kwargs) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **kwargs)
    return out.getvalue(), err.getvalue()


# --- create_api_key --------------------------------------------------------------------------


def test_create_api_key_prints_only_the_key_and_it_works(client, db):
    out, err = run("create_api_key", "--project", "billing")
    lines = out.splitlines()
    assert len(lines) == 1 and out == lines[0] + "\n"
    raw = lines[0]
    assert re.fullmatch(r"llmo_[0-9a-f]+_[A-Za-z0-9_-]+", raw)
    assert "billing" in err  # the "created project" note goes to stderr, keeping stdout pipeable
    project = Project.objects.get(name="billing")
    api_key = ApiKey.objects.get()
    assert api_key.project == project and api_key.name == "cli"
    response = client.get("/v1/spans", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200 and response.json()["items"] == []


def test_create_api_key_for_an_existing_project(db, project):
    out, err = run("create_api_key", "--project", project.name, "--name", "deploy", "--no-create")
    assert len(out.splitlines()) == 1
    assert err == ""
    assert Project.objects.count() == 1
    assert ApiKey.objects.get().name == "deploy" and ApiKey.objects.get().project == project
    # a second key for the same project is a different key
    again, _ = run("create_api_key", "--project", project.name)
    assert again != out and ApiKey.objects.count() == 2


def test_create_api_key_no_create_with_an_unknown_project_fails(db):
    with pytest.raises(CommandError, match="no project named 'ghost'"):
        run("create_api_key", "--project", "ghost", "--no-create")
    assert Project.objects.count() == 0 and ApiKey.objects.count() == 0


@pytest.mark.parametrize("name", ["not a slug", "a/b", "ü-nicode", "semi;colon", ""])
def test_create_api_key_refuses_a_non_slug_project_name(db, name):
    with pytest.raises(CommandError, match="slug"):
        run("create_api_key", "--project", name)
    assert Project.objects.count() == 0 and ApiKey.objects.count() == 0


def test_create_api_key_requires_project(db):
    with pytest.raises(CommandError, match="--project"):
        run("create_api_key")


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_creates_admin_project_and_key_once(client, db):
    out, _ = run("bootstrap")
    login = re.search(r"login\s*:\s*(\S+) / (\S+)", out)
    key = re.search(r"API key \(default\)\s*:\s*(llmo_\S+)", out)
    assert login and key, out
    username, password = login.groups()
    raw = key.group(1)

    User = get_user_model()
    user = User.objects.get()
    assert user.username == username == "admin"
    assert user.is_superuser and user.is_staff and user.check_password(password)
    project = Project.objects.get()
    assert project.name == "default" and list(project.members.all()) == [user]
    assert ApiKey.objects.get().project == project
    assert password != "password" and len(password) >= 16
    assert client.get("/v1/spans", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    assert client.login(username=username, password=password)

    again, _ = run("bootstrap")
    assert "nothing to bootstrap" in again
    assert password not in again and "llmo_" not in again
    assert User.objects.count() == 1 and Project.objects.count() == 1 and ApiKey.objects.count() == 1


def test_bootstrap_with_an_existing_superuser_does_nothing(db, django_user_model):
    django_user_model.objects.create_superuser(username="ops", email="", password="x-long-password-1")
    out, _ = run("bootstrap")
    assert "nothing to bootstrap" in out
    assert Project.objects.count() == 0 and ApiKey.objects.count() == 0


def test_bootstrap_reuses_an_existing_project(db):
    existing = Project.objects.create(name="team")
    out, _ = run("bootstrap", "--username", "boss", "--project", "team")
    assert "API key (team)" in out
    assert Project.objects.get() == existing
    assert ApiKey.objects.get().project == existing
    assert get_user_model().objects.get().username == "boss"


# --- maintain_partitions ---------------------------------------------------------------------


def test_maintain_partitions_creates_ahead_and_drops_expired(db, settings, project):
    settings.RETENTION_DAYS = 30
    settings.PARTITIONS_AHEAD_DAYS = 3
    today = datetime.now(timezone.utc).date()
    old, recent = today - timedelta(days=40), today - timedelta(days=20)
    assert set(partitions_ensure(days={old, recent})) <= {old, recent}
    assert {old, recent} <= set(partitions_list())

    def at(day):
        return datetime.combine(day, time(12), tzinfo=timezone.utc)

    SpanKey.objects.bulk_create([
        SpanKey(project=project, span_id="old", timestamp_utc=at(old)),
        SpanKey(project=project, span_id="just-expired", timestamp_utc=at(today - timedelta(days=31))),
        SpanKey(project=project, span_id="recent", timestamp_utc=at(recent)),
        SpanKey(project=project, span_id="now", timestamp_utc=datetime.now(timezone.utc)),
    ])

    out, _ = run("maintain_partitions")
    match = re.fullmatch(r"partitions: (\d+) created, (\d+) dropped; 0 spans past their project's retention deleted\n",
                         out)
    assert match, out
    days = set(partitions_list())
    assert {today + timedelta(days=n) for n in range(4)} <= days
    assert old not in days and recent in days
    assert int(match.group(2)) >= 1
    assert all(day >= today - timedelta(days=30) for day in days)
    assert sorted(SpanKey.objects.values_list("span_id", flat=True)) == ["now", "recent"]

    # a second run has nothing left to do
    out, _ = run("maintain_partitions")
    assert out == "partitions: 0 created, 0 dropped; 0 spans past their project's retention deleted\n"


def test_maintain_partitions_keeps_the_partition_at_the_retention_edge(db, settings):
    settings.RETENTION_DAYS = 30
    today = datetime.now(timezone.utc).date()
    edge, past_edge = today - timedelta(days=30), today - timedelta(days=31)
    partitions_ensure(days={edge, past_edge})
    run("maintain_partitions")
    days = set(partitions_list())
    assert edge in days and past_edge not in days
    from django.db import connection

    with connection.cursor() as cur:
        # A day's span and embedding partitions go (and stay) together.
        for parent in ("ingest_span", "ingest_embeddingday"):
            cur.execute("SELECT to_regclass(%s), to_regclass(%s)",
                        [partition_name(past_edge, parent), partition_name(edge, parent)])
            assert cur.fetchone() == (None, partition_name(edge, parent))
