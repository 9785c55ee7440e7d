# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-faults test-interop-matrix bench check fuzz sdk-patterns vendor

$(STAMP): pyproject.toml sdk/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "llm-observe needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ./sdk -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## Refresh the console's chart library from npm (console/frontend/package-lock.json pins it).
## The copy under console/static/console/vendor/ is committed, so installing needs no Node.js.
vendor:
	@command -v npm >/dev/null || { echo "npm (Node.js) is needed to refresh the console's chart library"; exit 1; }
	cd console/frontend && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	mkdir -p console/static/console/vendor
	cp console/frontend/node_modules/chart.js/dist/chart.umd.min.js console/static/console/vendor/
	cp console/frontend/node_modules/chart.js/LICENSE.md console/static/console/vendor/chart.js.LICENSE.md

## Bring the appliance up on http://127.0.0.1:8000 with embedded PostgreSQL and Valkey (data in ./.data).
run: install
	$(PY) manage.py serve

## The default test suite (what CI runs).
test: install
	$(PY) -m pytest

## Fault tests (CI runs them after `make test`): Kafka mode through a consumer SIGKILL, a broker and a
## database restart under load; the database's disk filling up (needs root for a tmpfs mount).
test-faults: install
	$(PY) -m pytest -m faults

## The interop matrix (CI runs it after the fault tests): each instrumentation library users run
## (OpenInference, OpenLLMetry, openlit, the OpenTelemetry openai-v2, pydantic-ai, Node.js) in its own
## virtualenv (cached in .data/interop-venvs, installed from tests/interop/matrix/libs/*/requirements.txt)
## calls a local fake provider and exports to a running appliance; every stored field is checked.
## The table lands in test-output/interop-matrix.md.
test-interop-matrix: install
	DATA_DIR=$(CURDIR)/.data-matrix $(PY) -m pytest tests/interop/matrix -m interop_matrix -q

## Long fuzzing (not part of `make test`, which runs the same tests for seconds with a fixed seed):
## schemathesis over the whole OpenAPI with both key styles, FUZZ_SECONDS each, new seed each run.
FUZZ_SECONDS ?= 300
fuzz: install
	LLM_OBSERVE_FUZZ_SECONDS=$(FUZZ_SECONDS) LLM_OBSERVE_FUZZ_SEED=random $(PY) -m pytest -q \
		tests/interop/test_interop_e2e.py -k schemathesis

## Benchmarks (not part of `make test`; bench_security installs Presidio and spaCy's small English model to compare with).
bench: install
	$(PY) tests/performance/bench_ingest.py
	$(PY) tests/performance/bench_scanner.py
	$(PY) -m pip install -q -r tests/performance/requirements-presidio.txt
	$(PY) tests/performance/bench_security.py --split heldout
	$(PY) tests/performance/bench_kafka.py
	$(PY) tests/performance/bench_sdk.py
	$(PY) tests/performance/bench_otlp.py
	$(PY) tests/performance/bench_search.py
	$(PY) tests/performance/bench_embeddings.py
	$(PY) tests/performance/bench_console.py

check: install
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

## Regenerate the SDK's copy of config/patterns.yaml.
sdk-patterns: install
	$(PY) -c 'import json, yaml; d = yaml.safe_load(open("config/patterns.yaml")); open("sdk/instrumentation_sdk/default_patterns.json", "w").write(json.dumps(d, indent=1) + "\n")'
