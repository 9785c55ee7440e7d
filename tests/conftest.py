from __future__ import annotations

import pytest

from ingest.services.api_keys import api_key_create
from ingest.services.partitions import partitions_forget_cache
from ingest.services.pricing import price_table_reset
from ingest.services.scanning import scanner_reset
from ingest.selectors.api_keys import api_key_cache_clear


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    # Each test's transaction is rolled back, partitions and prices with it.
    partitions_forget_cache()
    price_table_reset()
    scanner_reset()
    api_key_cache_clear()
    yield
    partitions_forget_cache()
    price_table_reset()
    scanner_reset()
    api_key_cache_clear()


@pytest.fixture
def project(db):
    from ingest.models import Project

    return Project.objects.create(name="acme")


@pytest.fixture
def api_key(project):
    _, raw = api_key_create(project=project, name="test")
    return raw


@pytest.fixture
def api(client, api_key):
    """The Django test client with the key in the Authorization header."""

    class Api:
        key = api_key

        def post(self, path, data=None, *, raw=None, headers=None, **kw):
            import orjson

            body = raw if raw is not None else orjson.dumps(data)
            return client.post(path, body, content_type="application/json",
                               headers={"Authorization": f"Bearer {self.key}", **(headers or {})}, **kw)

        def get(self, path, params=None, headers=None):
            return client.get(path, params or {}, headers={"Authorization": f"Bearer {self.key}", **(headers or {})})

    return Api()
