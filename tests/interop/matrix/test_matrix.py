"""The interop matrix: real instrumentation libraries, each in its own venv (or npm), against a running appliance.

Each library's script (libs/<lib>/run.py, or tests/interop/node/openinference-openai.mjs) makes its calls to
the fake provider and exports to the appliance with a key of its own project; the spans are read back through
GET /v1/spans and compared field by field with libs/<lib>/expected.yaml. The matrix goes to stdout and
test-output/interop-matrix.md; the test fails listing every WRONG cell.

    make test-interop-matrix      (pytest -m interop_matrix tests/interop/matrix)
    MATRIX_LIBS=traceloop,openlit make test-interop-matrix      (only those libraries)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.fakeprovider.server import FakeProvider
from tests.interop.matrix.matrix import evaluate, load_expected, matrix_libraries, render
from tests.interop.matrix.runner import calls_of, run_library
from tests.interop.matrix.venvs import ensure_all, libraries
from tests.interop.test_interop_e2e import Appliance, appliance  # noqa: F401 - the module's appliance fixture

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.interop_matrix
SETTLE_SECONDS = 4  # spans (and logs joined to them) stop changing for this long: all has landed


def project_key(app: Appliance, project: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env["DATA_DIR"] = str(app.data_dir)
    out = subprocess.run([sys.executable, "manage.py", "create_api_key", "--project", project], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def stored_spans(app: Appliance, key: str, want_at_least: int, timeout: float = 60) -> list[dict]:
    """Every span of the key's project, once the count has stopped changing."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while True:
        response = httpx.get(f"{app.url}/v1/spans", params={"limit": 1000},
                             headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        snapshot = sorted((s["span_id"], str(s.get("prompt")), str(s.get("response"))) for s in items)
        if snapshot != last:
            last, stable_since = snapshot, time.monotonic()
        settled = time.monotonic() - stable_since >= SETTLE_SECONDS
        if (settled and len(items) >= want_at_least) or time.monotonic() > deadline:
            return items
        time.sleep(0.5)


def run_one(app: Appliance, fake: FakeProvider, lib: str) -> tuple[str, dict, list[dict], float]:
    started = time.monotonic()
    expected = load_expected(lib)
    key = project_key(app, f"matrix-{lib.replace('_', '-')}")
    service = f"matrix-{lib}"
    result = run_library(lib, appliance_url=app.url, api_key=key, fake=fake, service=service)
    calls = calls_of(result)
    problem = None
    if result.returncode != 0:
        problem = f"exit {result.returncode}: {result.stderr.strip()[-400:]}"
    else:
        missing = [c for c in expected["calls"] if c not in [x["call"] for x in calls]]
        if missing:
            problem = f"calls not made: {missing}"
    # spans to wait for: a call's `spans: N`, else one per label (two labels may name one span: `counted`)
    want = sum((v.get("spans") or len(v["each"])) if isinstance(v, dict) else len(v)
               for v in expected["calls"].values())
    spans = stored_spans(app, key, want, timeout=60 if not problem else 10)
    return lib, {"problem": problem, "service": service, "stdout": result.stdout, "stderr": result.stderr}, spans, \
        time.monotonic() - started


def test_interop_matrix(appliance, capsys):
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of /v1/spans otherwise
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    only = [lib for lib in os.environ.get("MATRIX_LIBS", "").split(",") if lib]
    built = ensure_all([lib for lib in libraries() if not only or lib in only],
                       node=not only or "node_openinference" in only)
    timings["venvs and npm ci (parallel; cached ones 0)"] = time.monotonic() - t0
    for name, (seconds, was_built) in built.items():
        timings[f"  {name} ({'built' if was_built else 'cached'})"] = seconds

    libs = [lib for lib in matrix_libraries() if not only or lib in only]
    assert libs, f"MATRIX_LIBS={only} names no library with an expected.yaml"
    results = []
    out_dir = ROOT / "test-output"
    out_dir.mkdir(exist_ok=True)
    t1 = time.monotonic()
    with FakeProvider(served_suffix="-2024-07-18") as fake, ThreadPoolExecutor(max_workers=3) as pool:
        for lib, run, spans, seconds in pool.map(lambda lib: run_one(appliance, fake, lib), libs):
            timings[f"  run {lib}"] = seconds
            (out_dir / f"interop-matrix-{lib}.log").write_text(run["stdout"] + "\n--- stderr ---\n" + run["stderr"])
            # what the appliance stored, to diagnose a WRONG cell
            (out_dir / f"interop-matrix-{lib}.spans.json").write_text(
                json.dumps(sorted(spans, key=lambda s: (s["timestamp_utc"], s["span_id"])), indent=1, default=str))
            results.append(evaluate(lib, load_expected(lib), spans, run, run["service"]))
    timings["scripts and checks (3 at a time)"] = time.monotonic() - t1
    timings["whole matrix test (without the appliance start)"] = time.monotonic() - t0

    table = render(results, timings)
    report = "interop-matrix.md" if libs == matrix_libraries() else "interop-matrix-partial.md"  # MATRIX_LIBS
    (out_dir / report).write_text("# Interop matrix\n\n" + table)
    with capsys.disabled():
        print("\n" + table)
    wrong = [line for r in results for line in r.wrong]
    assert not wrong, f"{len(wrong)} WRONG checks (test-output/{report}):\n" + "\n".join(wrong)
