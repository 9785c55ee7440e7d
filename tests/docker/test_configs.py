"""The observability stack's configuration, checked by its own tools where this machine has them.

- docker/prometheus/*.yml: `promtool check config` (Debian's prometheus package), laid out as the
  entrypoint and the compose file lay them out, bearer-token file included.
- docker/grafana/dashboards/*.json: Grafana's dashboard JSON schema (grafana-foundation-sdk).
- docker/tempo/tempo.yaml: every key is one of Tempo 2.8.1's documented configuration keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
HERE = Path(__file__).parent
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))


def promtool(config: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("LLM_OBSERVE_REQUIRE_PROMTOOL"):  # set by .ci/run, which installs it
            pytest.fail("promtool is not installed, and LLM_OBSERVE_REQUIRE_PROMTOOL says CI must have it")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)


def test_bundled_prometheus_config_as_the_entrypoint_lays_it_out(tmp_path):
    # The entrypoint copies prometheus.yml to $DATA_DIR/prometheus/ and writes the scrape token beside it.
    config = tmp_path / "prometheus.yml"
    config.write_text((DOCKER / "prometheus" / "prometheus.yml").read_text().replace("127.0.0.1:8000", "127.0.0.1:8010"))
    missing = promtool(config)
    assert missing.returncode != 0 and "metrics_token" in missing.stdout + missing.stderr  # the token is required
    (tmp_path / "metrics_token").write_text("t" * 40)
    checked = promtool(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
    job = yaml.safe_load(config.read_text())["scrape_configs"][0]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "metrics_token"}


def test_compose_prometheus_config(tmp_path):
    token = tmp_path / "metrics_token"
    token.write_text("t" * 40)
    config = tmp_path / "prometheus.yml"
    text = (DOCKER / "prometheus" / "prometheus-compose.yml").read_text()
    assert "/run/secrets/metrics_token" in text
    config.write_text(text.replace("/run/secrets/metrics_token", str(token)))
    checked = promtool(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def dashboard_errors(dashboard: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((HERE / "grafana-dashboard.jsonschema.json").read_text())
    found = []
    for error in jsonschema.Draft7Validator(schema).iter_errors(dashboard):
        path = list(error.absolute_path)
        # The one place the schema is narrower than Grafana: it allows a variable's query as a string or
        # an object of objects, while Grafana 10+ itself saves a Prometheus variable's query as
        # {"query": "...", "refId": "..."} (what these dashboards hold). Exactly that form is let through.
        if path[:2] == ["templating", "list"] and path[3:] == ["query"] and set(error.instance) == {"query", "refId"} \
                and all(isinstance(v, str) for v in error.instance.values()):
            continue
        found.append(f"{'/'.join(map(str, path))}: {error.message[:200]}")
    return found


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_matches_grafanas_schema(path):
    dashboard = json.loads(path.read_text())
    assert dashboard_errors(dashboard) == []


def test_dashboard_schema_check_can_fail():
    dashboard = json.loads(DASHBOARDS[0].read_text())
    dashboard["links"][0].pop("keepTime")
    dashboard["panels"][0]["gridPos"]["w"] = "wide"
    dashboard["refresh"] = 30
    found = dashboard_errors(dashboard)
    assert any(e.startswith("links/0") and "keepTime" in e for e in found)
    assert any(e.startswith("panels/0") for e in found)
    assert any(e.startswith("refresh") for e in found)


def test_dashboards_use_the_provisioned_datasources():
    provisioned = {}
    for name in ("provisioning/datasources/datasources.yaml", "compose/datasources.yaml"):
        sources = yaml.safe_load((DOCKER / "grafana" / name).read_text())["datasources"]
        provisioned[name] = {(s["type"], s["uid"]) for s in sources}
    assert provisioned["provisioning/datasources/datasources.yaml"] == provisioned["compose/datasources.yaml"]

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]["type"], node["datasource"]["uid"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for path in DASHBOARDS:
        used = set(refs(json.loads(path.read_text()))) - {("grafana", "-- Grafana --")}  # built in (annotations)
        assert used and used <= provisioned["compose/datasources.yaml"], path.name


def key_paths(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            if path != "distributor.receivers":  # an OpenTelemetry Collector receivers block, checked below
                yield from key_paths(value, path)


def test_tempo_config_uses_documented_keys():
    documented = {line for line in (HERE / "tempo-2.8.1-config-keys.txt").read_text().splitlines()
                  if line and not line.startswith("#")}
    config = yaml.safe_load((DOCKER / "tempo" / "tempo.yaml").read_text())
    unknown = [path for path in key_paths(config) if path not in documented]
    assert unknown == []
    assert "ingester.max_block_duraton" not in documented  # the list is not a catch-all
    # The receivers block is the Collector's OTLP receiver: gRPC on 4317 and HTTP on 4318.
    protocols = config["distributor"]["receivers"]["otlp"]["protocols"]
    assert protocols == {"grpc": {"endpoint": "0.0.0.0:4317"}, "http": {"endpoint": "0.0.0.0:4318"}}
    storage = config["storage"]["trace"]
    assert storage["wal"]["path"].startswith("${DATA_DIR}/") and storage["local"]["path"].startswith("${DATA_DIR}/")
