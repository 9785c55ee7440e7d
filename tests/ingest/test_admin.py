"""The Django admin over projects, keys, prices and patterns, through the test client."""

from __future__ import annotations

import hashlib
import re
import uuid

import orjson
import pytest
from django.db import connection

from ingest.models import ApiKey, DetectionPattern, ModelPrice, Project, Span
from ingest.services.api_keys import api_key_create

KEY_RE = re.compile(r"llmo_[0-9a-f]+_[A-Za-z0-9_-]+")


@pytest.fixture
def staff(client, django_user_model):
    user = django_user_model.objects.create_superuser(username="root", email="", password="x-long-password-1")
    client.force_login(user)
    return client


def price_form(**overrides):
    data = {"provider": "openai", "model": "gpt-4o", "input_price_per_1m": "2.50", "output_price_per_1m": "10.00",
            "cached_input_price_per_1m": "", "version": "2026-11", "effective_date": "", "source": "admin"}
    data.update(overrides)
    return data


def pattern_form(**overrides):
    data = {"name": "p", "type": "INJECTION_ATTEMPT", "regex": "", "phrases": "[]", "validator": "",
            "placeholder": "", "enabled": "on", "description": "", "source": "admin"}
    data.update(overrides)
    return data


def post_span(client, key, **fields):
    body = {"span_id": str(uuid.uuid4()), "trace_id": "t", "model": "gpt-4o", "provider": "openai",
            "prompt_tokens": 1000, "completion_tokens": 100, "status": "success", **fields}
    return client.post("/v1/spans", orjson.dumps(body), content_type="application/json",
                       headers={"Authorization": f"Bearer {key}"})


# --- access ----------------------------------------------------------------------------------


def test_anonymous_user_is_sent_to_the_login_page(client, db):
    response = client.get("/admin/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    response = client.get("/admin/ingest/modelprice/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_non_staff_user_cannot_use_the_admin(client, django_user_model):
    user = django_user_model.objects.create_user(username="viewer", password="x-long-password-1")
    client.force_login(user)
    for path in ("/admin/", "/admin/ingest/modelprice/", "/admin/ingest/apikey/add/"):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), path
    response = client.post("/admin/ingest/modelprice/add/", price_form())
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert ModelPrice.objects.count() == 0


def test_staff_superuser_can_use_the_admin(staff):
    assert staff.get("/admin/").status_code == 200
    for model in ("project", "apikey", "modelprice", "detectionpattern"):
        assert staff.get(f"/admin/ingest/{model}/").status_code == 200, model
        assert staff.get(f"/admin/ingest/{model}/add/").status_code == 200, model


# --- prices ----------------------------------------------------------------------------------


def test_adding_a_price_normalises_it_and_marks_it_as_admin(staff):
    response = staff.post("/admin/ingest/modelprice/add/", price_form(provider=" OpenAI ", model="GPT-4o",
                                                                      source="config"))
    assert response.status_code == 302, response.content
    row = ModelPrice.objects.get()
    assert (row.provider, row.model, row.source) == ("openai", "gpt-4o", ModelPrice.Source.ADMIN)


@pytest.mark.parametrize("field", ["input_price_per_1m", "output_price_per_1m", "cached_input_price_per_1m"])
def test_negative_price_is_refused_with_the_error_shown(staff, field):
    response = staff.post("/admin/ingest/modelprice/add/", price_form(**{field: "-1"}))
    assert response.status_code == 200
    assert "prices cannot be negative" in response.content.decode()
    assert field in response.context["adminform"].form.errors
    assert ModelPrice.objects.count() == 0


@pytest.mark.parametrize("provider, model", [("openai", "gpt-4o"), ("OpenAI", "GPT-4o ")])
def test_duplicate_provider_and_model_is_refused(staff, provider, model):
    assert staff.post("/admin/ingest/modelprice/add/", price_form()).status_code == 302
    response = staff.post("/admin/ingest/modelprice/add/", price_form(provider=provider, model=model,
                                                                      input_price_per_1m="9"))
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert ModelPrice.objects.count() == 1
    assert ModelPrice.objects.get().input_price_per_1m == 2.5


def test_editing_a_price_marks_it_admin_and_the_next_span_uses_it(client, staff, api_key, settings):
    settings.CONFIG_REFRESH_SECONDS = 0
    row = ModelPrice.objects.create(provider="openai", model="gpt-4o", input_price_per_1m="2.50",
                                    output_price_per_1m="10.00", version="2026-01", source=ModelPrice.Source.CONFIG)
    assert post_span(client, api_key, span_id="before").status_code == 202
    assert Span.objects.get(span_id="before").cost_usd_micro == 1000 * 2.5 + 100 * 10

    response = staff.post(f"/admin/ingest/modelprice/{row.pk}/change/",
                          price_form(input_price_per_1m="5.00", version="2026-02", source="config"))
    assert response.status_code == 302, response.content
    row.refresh_from_db()
    assert row.source == ModelPrice.Source.ADMIN and row.version == "2026-02"

    assert post_span(client, api_key, span_id="after").status_code == 202
    after = Span.objects.get(span_id="after")
    assert after.cost_usd_micro == 1000 * 5 + 100 * 10
    assert after.price_version == "2026-02"


# --- detection patterns ----------------------------------------------------------------------


def test_pattern_with_a_broken_regex_is_refused_with_the_error_shown(staff):
    response = staff.post("/admin/ingest/detectionpattern/add/", pattern_form(name="bad", regex="(unclosed"))
    assert response.status_code == 200
    content = response.content.decode()
    assert "does not compile" in content and "missing )" in content
    assert DetectionPattern.objects.count() == 0


def test_pattern_with_a_good_regex_is_saved_as_admin(staff):
    response = staff.post("/admin/ingest/detectionpattern/add/",
                          pattern_form(name="good", regex=r"ignore\s+previous", source="config"))
    assert response.status_code == 302, response.content
    assert DetectionPattern.objects.get(name="good").source == ModelPrice.Source.ADMIN


def test_pattern_with_a_duplicate_name_is_refused(staff):
    DetectionPattern.objects.create(name="email", type="PII_STRUCTURAL", regex="@")
    response = staff.post("/admin/ingest/detectionpattern/add/", pattern_form(name="email", regex="x"))
    assert response.status_code == 200 and "already exists" in response.content.decode()
    assert DetectionPattern.objects.count() == 1


# --- API keys --------------------------------------------------------------------------------


def test_adding_a_key_shows_it_once_and_stores_only_its_hash(staff, project):
    response = staff.post("/admin/ingest/apikey/add/",
                          {"project": project.pk, "name": "ci", "revoked_at_0": "", "revoked_at_1": ""},
                          follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    keys = [k for m in shown for k in KEY_RE.findall(m)]
    assert len(keys) == 1, shown
    raw = keys[0]

    api_key = ApiKey.objects.get()
    assert api_key.project == project and api_key.name == "ci"
    assert api_key.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert raw.startswith(f"llmo_{api_key.prefix}_")
    secret = raw.split("_", 2)[2]
    with connection.cursor() as cur:
        cur.execute("SELECT row_to_json(k)::text FROM ingest_apikey k")
        (row,) = cur.fetchone()
    assert raw not in row and secret not in row

    # the key is not shown again: neither on the change page nor in the list
    for path in (f"/admin/ingest/apikey/{api_key.pk}/change/", "/admin/ingest/apikey/"):
        assert secret not in staff.get(path).content.decode()
    # and it works
    assert staff.get("/v1/spans", headers={"Authorization": f"Bearer {raw}"}).status_code == 200


def test_revoke_action_revokes_and_the_key_then_gets_403(client, staff, project):
    key_a, raw_a = api_key_create(project=project, name="a")
    key_b, raw_b = api_key_create(project=project, name="b")
    keep, raw_keep = api_key_create(project=project, name="keep")
    assert post_span(client, raw_a).status_code == 202  # also warms the key cache

    response = staff.post("/admin/ingest/apikey/", {"action": "revoke", "_selected_action": [key_a.pk, key_b.pk]})
    assert response.status_code == 302
    revoked = {k.name: k.revoked_at for k in ApiKey.objects.all()}
    assert revoked["a"] is not None and revoked["b"] is not None and revoked["keep"] is None

    for raw in (raw_a, raw_b):
        denied = post_span(client, raw)
        assert denied.status_code == 403 and denied.json()["rule"] == "revoked_key"
    assert post_span(client, raw_keep).status_code == 202


def test_revoking_twice_keeps_the_first_revocation_time(staff, project):
    api_key, _ = api_key_create(project=project)
    staff.post("/admin/ingest/apikey/", {"action": "revoke", "_selected_action": [api_key.pk]})
    first = ApiKey.objects.get().revoked_at
    staff.post("/admin/ingest/apikey/", {"action": "revoke", "_selected_action": [api_key.pk]})
    assert ApiKey.objects.get().revoked_at == first
    assert Project.objects.count() == 1
