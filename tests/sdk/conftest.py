"""Fixtures of the SDK tests: a clean SDK state per test, an ingest sink, the fake provider, a real appliance."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no cost-map download at import
os.environ.setdefault("LITELLM_TELEMETRY", "False")

import instrumentation_sdk as sdk  # noqa: E402
from instrumentation_sdk import _config, _reporter  # noqa: E402
from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.sdk.sink import IngestSink  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SDK_ENV = ("LLM_OBSERVE_URL", "LLM_OBSERVE_API_KEY", "LLM_OBSERVE_SERVICE", "LLM_OBSERVE_SERVICE_NAME",
           "LLM_OBSERVE_ENVIRONMENT", "LLM_OBSERVE_SAMPLING", "LLM_OBSERVE_WAL_PATH", "LLM_OBSERVE_DISABLED",
           "LLM_OBSERVE_SPILL", "LLM_OBSERVE_SPILL_DIR", "OTEL_SERVICE_NAME", "DEPLOYMENT_ENV")
SHM = Path("/dev/shm")


class MemoryReporter:
    """Collects spans as handed over by the SDK (before the delivery pipeline)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []

    def report(self, span: dict) -> None:
        self.spans.append(dict(span))

    def by_endpoint(self, endpoint: str) -> list[dict]:
        return [s for s in self.spans if s.get("endpoint") == endpoint]


@pytest.fixture(autouse=True)
def clean_sdk(monkeypatch, tmp_path):
    for name in SDK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_OBSERVE_WAL_PATH", str(tmp_path / "wal.sqlite3"))
    monkeypatch.setenv("LLM_OBSERVE_EXIT_FLUSH_TIMEOUT", "1")
    # Each test's spill files in a folder of its own (on tmpfs, like the default), removed after it:
    # the spill files of processes a test kills are not left in /dev/shm.
    spill_dir = (SHM if SHM.is_dir() else tmp_path) / f"llm-observe-test-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv("LLM_OBSERVE_SPILL_DIR", str(spill_dir))
    _config.reset_config()
    previous = sdk.set_reporter(None)
    yield
    current = sdk.set_reporter(previous)
    if isinstance(current, sdk.SpanReporter):
        current.close(timeout=1)
    shutil.rmtree(spill_dir, ignore_errors=True)
    sdk.uninstrument_all()
    _reporter.set_metrics_hook(None)
    _config.reset_config()


@pytest.fixture
def memory():
    reporter = MemoryReporter()
    sdk.set_reporter(reporter)
    return reporter


@pytest.fixture
def sink():
    s = IngestSink()
    yield s
    s.down()


@pytest.fixture
def delivered(sink):
    """The real SpanReporter pipeline, delivering to the sink."""
    sdk.configure(url=sink.url, api_key=sink.key, flush_interval=0.05, backoff_initial=0.05, backoff_max=0.2)
    reporter = sdk.SpanReporter()
    sdk.set_reporter(reporter)
    return reporter


@pytest.fixture(scope="session")
def fake():
    with FakeProvider() as provider:
        yield provider


# --- a real appliance, one for the whole SDK session -------------------------------------------


class RunningAppliance:
    def __init__(self, app, key: str) -> None:
        self.app = app
        self.key = key
        self.url = app.url

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def spans(self, **params) -> list[dict]:
        """Every stored span matching the filters (follows the cursor)."""
        items, cursor = [], None
        while True:
            query = {"limit": 1000, **params}
            if cursor:
                query["cursor"] = cursor
            page = httpx.get(f"{self.url}/v1/spans", params=query, headers=self.headers, timeout=30)
            page.raise_for_status()
            data = page.json()
            items.extend(data["items"])
            cursor = data.get("next_cursor")
            if not cursor:
                return items

    def wait_for_spans(self, count: int, timeout: float = 20.0, **params) -> list[dict]:
        deadline = time.monotonic() + timeout
        items: list[dict] = []
        while time.monotonic() < deadline:
            items = self.spans(**params)
            if len(items) >= count:
                return items
            time.sleep(0.2)
        return items


@pytest.fixture(scope="session")
def appliance(tmp_path_factory):
    from tests.appliance.test_serve_e2e import Appliance, _free_port

    name = tmp_path_factory.mktemp("sdk-appliance").name
    data_dir = ROOT / ".data" / "e2e" / f"sdk-{name}"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log = tmp_path_factory.mktemp("sdk-appliance-log") / "serve.log"
    app = Appliance(data_dir, _free_port(), log)
    app.start()
    key = re.search(r"API key \(default\)\s*: (\S+)", app.output()).group(1)
    yield RunningAppliance(app, key)
    stop_appliance(app)
    shutil.rmtree(data_dir, ignore_errors=True)


def stop_appliance(app) -> None:
    """SIGINT like Ctrl-C; then make sure no process of this appliance's tree is left (by pid)."""
    import psutil

    if not app.proc or app.proc.poll() is not None:
        return
    try:
        tree = psutil.Process(app.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        app.stop()
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
