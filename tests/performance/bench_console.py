"""Console benchmark: overview and explorer response times with 1,000,000 spans over 30 days.

    .venv/bin/python tests/performance/bench_console.py [--spans 1000000] [--days 30] [--requests 30] [--reuse]

Fills a fresh embedded PostgreSQL (own DATA_DIR) with spans spread over the last 30 days
(COPY, the span table's real shape: prompts, responses, 1 % flagged), builds the roll-ups
with the same code ingestion uses (rollups_rebuild), then requests each console page
through Django's full stack (middleware, login, view, selectors, template) and times the
page next to its selector alone (the SQL it runs), in the same run.
Targets (issue 5): overview p95 < 500 ms, explorer p95 < 300 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORDS = ("invoice account balance refund shipping order customer policy summary translate explain contract "
         "clause payment delay status ticket escalate product warranty laptop parcel return address").split()
MODELS = [("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4", "anthropic"),
          ("gemini-2.5-flash", "google"), ("mistral-large", "mistral")]
SERVICES = ["support-bot", "search", "billing", "checkout", "agent"]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(project_id: int, n: int, days: int) -> None:
    from django.db import connection

    from ingest.services.partitions import partitions_ensure
    from ingest.services.spans import COLUMNS, copy_values

    rng = random.Random(7)
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=days)
    partitions_ensure(days={(start + timedelta(days=d)).date() for d in range(days + 2)})
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) for _ in range(500)]
    base = {name: None for name in COLUMNS}
    t0 = time.perf_counter()
    chunk = 50_000
    for offset in range(0, n, chunk):
        with connection.cursor() as cur, cur.copy(f"COPY ingest_span ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for i in range(offset, min(n, offset + chunk)):
                model, provider = MODELS[i % 5]
                flagged = i % 100 == 0
                prompt_tokens, completion_tokens = rng.randint(50, 4000), rng.randint(10, 800)
                ts = start + timedelta(seconds=rng.random() * days * 86400)
                row = {**base, "project_id": project_id, "span_id": f"b{i}", "timestamp_utc": ts,
                       "trace_id": f"t{i // 4}", "schema_version": 1, "model": model, "provider": provider,
                       "service_name": SERVICES[(i // 5) % 5], "environment": "production",
                       "user_id": f"user-{rng.randint(1, 2000)}", "session_id": f"sess-{rng.randint(1, 20000)}",
                       "status": "error" if i % 37 == 0 else "success", "prompt_tokens": prompt_tokens,
                       "completion_tokens": completion_tokens, "latency_ms_total": rng.lognormvariate(7, 0.6),
                       "latency_ms_ttft": rng.lognormvariate(5.5, 0.4), "cost_usd_micro": prompt_tokens * 3,
                       "price_version": "2026-11", "is_sampled": False, "retry_count": 0,
                       "pii_detected": flagged and i % 200 == 0, "injection_attempt": flagged and i % 200 != 0,
                       "matched_patterns": (["email"] if i % 200 == 0 else ["ignore_previous_instructions"])
                       if flagged else None, "scan_status": "ok",
                       "prompt": texts[i % 500], "response": texts[(i * 7) % 500], "received_at": ts}
                copy.write_row(copy_values(row))
        done = min(n, offset + chunk)
        rate = done / (time.perf_counter() - t0)
        print(f"\r[load] {done:,}/{n:,} spans ({rate:,.0f}/s)", end="", flush=True)
    print(flush=True)


def time_calls(fn, count: int) -> list[float]:
    for _ in range(3):
        fn()  # warm: caches, plans
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="keep the loaded data of an earlier run")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()

    data_dir = ROOT / ".data" / "bench-console"
    if not args.reuse:
        shutil.rmtree(data_dir, ignore_errors=True)
    os.environ.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="appliance.settings",
                      ALLOWED_HOSTS="testserver,127.0.0.1,localhost")
    for name in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        os.environ.pop(name, None)

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.utils import timezone as djtz

    from ingest.models import Project
    from ingest.selectors.overview import overview_get
    from ingest.selectors.security import security_overview
    from ingest.selectors.spans import SpanFilters, span_explore
    from ingest.services.rollups import rollups_rebuild

    call_command("migrate", verbosity=0)
    project, created = Project.objects.get_or_create(name="bench")
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest_span WHERE project_id = %s", [project.id])
        have = cur.fetchone()[0]
    if have != args.spans:
        print(f"[setup] loading {args.spans:,} spans over {args.days} days into {data_dir}", flush=True)
        with connection.cursor() as cur:
            cur.execute("DELETE FROM ingest_span WHERE project_id = %s", [project.id])
        t0 = time.perf_counter()
        load(project.id, args.spans, args.days)
        print(f"[load] {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        rollups_rebuild(project_id=project.id, progress=lambda n: print(f"\r[rollups] {n:,} spans", end="", flush=True))
        print(f"\n[rollups] rebuilt from the span table in {time.perf_counter() - t0:.0f} s", flush=True)
        with connection.cursor() as cur:
            cur.execute("ANALYZE")
    user, _ = get_user_model().objects.get_or_create(username="bench")
    project.members.add(user)
    client = Client()
    client.force_login(user)

    now = djtz.now()

    def page(path, **params):
        def call():
            response = client.get(path, params)
            assert response.status_code == 200, (path, response.status_code)
        return call

    week = SpanFilters(start=now - timedelta(days=7), end=now)
    month = SpanFilters(start=now - timedelta(days=30), end=now)
    cases = [
        ("overview 30 days", "overview", page("/p/bench/", range="30d"),
         lambda: overview_get(project_id=project.id, start=now - timedelta(days=30), end=now)),
        ("overview 7 days", "overview", page("/p/bench/", range="7d"),
         lambda: overview_get(project_id=project.id, start=now - timedelta(days=7), end=now)),
        ("overview 24 h", "overview", page("/p/bench/", range="24h"),
         lambda: overview_get(project_id=project.id, start=now - timedelta(hours=24), end=now)),
        ("explorer 7 d, newest first", "explorer", page("/p/bench/spans/", range="7d"),
         lambda: span_explore(project_id=project.id, filters=week)),
        ("explorer 30 d, one service, page 5", "explorer", page("/p/bench/spans/", range="30d", service="billing", page=5),
         lambda: span_explore(project_id=project.id, filters=SpanFilters(start=month.start, end=now, service="billing"),
                              page=5)),
        ("explorer 30 d, one user", "explorer", page("/p/bench/spans/", range="30d", user="user-77"),
         lambda: span_explore(project_id=project.id, filters=SpanFilters(start=month.start, end=now, user_id="user-77"))),
        ("explorer 30 d, flagged only", "explorer", page("/p/bench/spans/", range="30d", flag="flagged"),
         lambda: span_explore(project_id=project.id, filters=SpanFilters(start=month.start, end=now, flag="flagged"))),
        ("explorer 30 d, prompt contains", "explorer", page("/p/bench/spans/", range="30d", q="warranty refund"),
         lambda: span_explore(project_id=project.id, filters=SpanFilters(start=month.start, end=now,
                                                                          text="warranty refund"))),
        ("explorer 7 d, sorted by cost", "explorer", page("/p/bench/spans/", range="7d", sort="cost"),
         lambda: span_explore(project_id=project.id, filters=week, sort="cost")),
        ("explorer 30 d, slowest first", "explorer", page("/p/bench/spans/", range="30d", sort="latency"),
         lambda: span_explore(project_id=project.id, filters=month, sort="latency")),
        ("security 30 days", "overview", page("/p/bench/security/", range="30d"),
         lambda: security_overview(project_id=project.id, start=now - timedelta(days=30), end=now)),
    ]
    targets = {"overview": 500, "explorer": 300}
    print(f"\n{args.spans:,} spans over {args.days} days; {args.requests} requests per case, after 3 warm-ups\n")
    print(f"{'case':38} {'page p50':>9} {'page p95':>9} {'query p50':>10} {'query p95':>10} {'target':>8}")
    misses = []
    for name, kind, call_page, call_query in cases:
        if args.only and args.only not in name:
            continue
        # A substring search that reads every prompt runs into the query timeout: fewer rounds.
        count = max(5, args.requests // 6) if "contains" in name else args.requests
        pages = time_calls(call_page, count)
        queries = time_calls(call_query, count)
        target = targets[kind]
        ok = pct(pages, 95) < target
        if not ok:
            misses.append(name)
        print(f"{name:38} {pct(pages, 50):7.1f}ms {pct(pages, 95):7.1f}ms {pct(queries, 50):8.1f}ms "
              f"{pct(queries, 95):8.1f}ms {'<' + str(target):>6}ms {'ok' if ok else 'MISSED'}", flush=True)
    ran = [c for c in cases if not args.only or args.only in c[0]]
    print(f"\n{len(ran) - len(misses)} of {len(ran)} cases under their p95 target"
          + (f"; missed: {', '.join(misses)}" if misses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
