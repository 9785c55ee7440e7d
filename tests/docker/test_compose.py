"""Every docker/docker-compose*.yaml against the Compose Specification's JSON schema.

There is no Docker engine here, so `docker compose config` cannot check them; the schema
(tests/docker/compose-spec.json, see README.md there) is what it validates against. Each file is
checked as written and after variable interpolation (defaults, required variables given), and
for what the docs promise: ports on 127.0.0.1 unless PUBLISH_ADDRESS says otherwise, a 60 s
stop grace period for the app, and mounted files that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
COMPOSE_FILES = sorted(DOCKER.glob("docker-compose*.yaml"))
# What a user must set for each file (the rest have defaults).
REQUIRED = {
    "docker-compose.prod.yaml": {"DATABASE_URL": "postgresql://u:p@db:5432/llm", "REDIS_URL": "redis://:p@r:6379/0",
                                 "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "SECRET_KEY": "x" * 40,
                                 "ALLOWED_HOSTS": "observe.example.com,127.0.0.1"},
    "docker-compose.prod-all.yaml": {"POSTGRES_PASSWORD": "ab12", "REDIS_PASSWORD": "cd34", "SECRET_KEY": "x" * 40,
                                     "METRICS_AUTH_TOKEN": "t" * 40, "GRAFANA_ADMIN_PASSWORD": "g"},
}
VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current and not (op == "?" and current is not None):
                raise KeyError(f"{name}: {arg}")
            return current
        return current or ""

    return VARIABLE.sub(one, value)


def errors(document) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_compose_files_are_the_ones_the_docs_name():
    assert [p.name for p in COMPOSE_FILES] == [
        "docker-compose.prod-all.yaml", "docker-compose.prod.yaml", "docker-compose.yaml"]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_valid_against_the_compose_schema(path):
    raw = load(path)
    assert errors(raw) == []
    resolved = interpolate(raw, REQUIRED.get(path.name, {}))
    assert errors(resolved) == []
    for name in REQUIRED.get(path.name, {}):  # each required variable is really required
        with pytest.raises(KeyError, match=name):
            interpolate(raw, {k: v for k, v in REQUIRED[path.name].items() if k != name})


def test_the_schema_check_can_fail():
    broken = load(DOCKER / "docker-compose.yaml")
    broken["services"]["api"]["ports"] = "8002:8000"  # a string, not a list
    broken["services"]["api"]["stop_grace_perod"] = "60s"
    found = errors(broken)
    assert any(e.startswith("services/api/ports") for e in found)
    assert any("stop_grace_perod" in e for e in found)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_ports_on_loopback_unless_asked(path):
    raw = load(path)
    env = REQUIRED.get(path.name, {})
    published = 0
    for name, service in interpolate(raw, env)["services"].items():
        for port in service.get("ports", []):
            published += 1
            assert port.startswith("127.0.0.1:"), f"{path.name} {name} publishes {port} beyond loopback"
    assert published
    for service in interpolate(raw, {**env, "PUBLISH_ADDRESS": "0.0.0.0"})["services"].values():
        assert all(port.startswith("0.0.0.0:") for port in service.get("ports", []))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_app_services_stop_gracefully_and_mounts_exist(path):
    services = load(path)["services"]
    for name, service in services.items():
        if str(service.get("image", "")).startswith("${LLM_OBSERVE_IMAGE"):
            assert service["stop_grace_period"] == "60s", name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{path.name} {name} mounts missing {source}"


def test_prod_all_topology():
    doc = interpolate(load(DOCKER / "docker-compose.prod-all.yaml"), REQUIRED["docker-compose.prod-all.yaml"])
    services = doc["services"]
    assert {"web", "consumer", "worker", "kafka", "postgres", "redis", "prometheus", "grafana", "tempo"} <= set(services)
    assert services["web"]["deploy"]["replicas"] == "2" and services["consumer"]["deploy"]["replicas"] == "2"
    assert "--skip-prepare" in services["web"]["command"] and "--skip-prepare" in services["consumer"]["command"]
    assert "--skip-prepare" not in services["worker"]["command"]  # the one that migrates
    for name in ("web", "consumer", "worker"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and env["WITH_OBSERVABILITY_STACK"] == "0"
        assert env["METRICS_AUTH_TOKEN"] == "t" * 40
    # Prometheus scrapes the app with the same token, from the compose secret.
    assert doc["secrets"]["metrics_token"] == {"environment": "METRICS_AUTH_TOKEN"}
    assert services["prometheus"]["secrets"][0]["target"] == "metrics_token"
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus-compose.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert scrape["dns_sd_configs"][0]["names"] == ["web", "consumer", "worker"]
