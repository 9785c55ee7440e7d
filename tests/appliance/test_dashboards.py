"""The Grafana dashboards shipped in the image query metrics the appliance really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import ingest.kafka_metrics  # noqa: F401 - registers the Kafka pipeline's metrics
import ingest.metrics  # noqa: F401

DASHBOARDS = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_every_dashboard_query_names_an_exposed_metric():
    known = exposed_names()
    files = sorted(DASHBOARDS.glob("*.json"))
    assert {f.stem for f in files} >= {"cost", "errors", "latency", "security", "pipeline"}
    uids, unknown, queries = set(), [], 0
    for path in files:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] not in uids, f"{path.name}: uid {dashboard['uid']} used twice"
        uids.add(dashboard["uid"])
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        exprs += [v["query"]["query"] for v in dashboard.get("templating", {}).get("list", []) if v.get("query")]
        for expr in exprs:
            queries += 1
            unknown += [(path.name, name) for name in re.findall(r"\bllm_[a-z0-9_]+", expr) if name not in known]
    assert queries > 30
    assert not unknown, unknown
