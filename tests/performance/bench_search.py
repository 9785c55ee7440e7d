"""Similarity search benchmark: recall@10 and latency of the real selector over 100k and 1M embeddings.

    .venv/bin/python tests/performance/bench_search.py [--sizes 100000,1000000] [--queries 200]
        [--ef-search 200,400]            # several SEARCH_EF values measured on the same index
        [--m 24 --ef-construction 128]   # build the index with other parameters than the migration's
        [--reuse --sizes 1000000]        # query the database the last run left, without loading again

Target (issue 3): recall@10 >= 0.95 against an exact scan at p50 < 20 ms, with and without
filters, over embeddings spread over 30 days. Filters measured: none, one service (~20 % of
the rows), the last 24 h (~3 %), one service over the last 24 h (~0.7 %) and over 7 days (~5 %).

Data: ~20,000 short, varied prompts (templates x vocabulary, ten domains) embedded with the
real MiniLM model (cached in .data/bench-search/cache, so a rerun skips the model), then
extended to each size with small random perturbations of those real vectors
(v + sigma * g, g ~ N(0, I/384), sigma uniform in [0.15, 0.45], renormalised: cosine 0.91-0.99
to the parent). Every vector gets one span (its prompt_hash), spread uniformly over the last
30 days across five services. 200 held-out prompts (never stored) are the queries.
Each real vector thus has size/20,000 near copies: at 1M, clusters of ~50 near-duplicates,
which is what templated LLM traffic looks like and what an HNSW graph with a small m
connects poorly (the "<=0.5" column counts the queries that found at most half their top 10).

Load: COPY straight into ingest_span (text), ingest_embedding (binary; the global table, one
row per prompt), ingest_embeddingday (binary, half precision; partitioned by day, one row per prompt,
day, service, model and provider) and ingest_embeddingfacet, as the worker writes them, of a fresh
embedded PostgreSQL (own DATA_DIR); the HNSW indexes of the migrations (the global graph and
one graph per day) are dropped before the load and rebuilt after it, timed (sizes are loaded
cumulatively: the 1M set extends the 100k one, so the indexes are rebuilt once per size). Both
graphs are prewarmed (pg_prewarm) before the queries, as a running appliance holds them in its
shared buffers. Queries go through the real selector,
`ingest.selectors.search.similar_spans` (what POST /v1/search/similar runs after embedding
the text); recall@10 is the overlap with a numpy brute-force top 10 under the same filter.
The exact-scan baseline is the same query in SQL with index scans disabled, also used to
check that what was loaded equals what numpy scans.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shutil
import statistics
import struct
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BENCH_DIR = ROOT / ".data" / "bench-search"
SERVICES = ("support-bot", "search", "billing", "coding-assistant", "marketing")
MODELS = (("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4", "anthropic"),
          ("gemini-2.5-flash", "google"), ("mistral-large", "mistral"))
DAYS = 30
K = 10
SIGMA = (0.15, 0.45)
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

# --- prompts -------------------------------------------------------------------
# Ten domains, each a few templates over its own vocabulary (plus a shared one), so the
# vectors form many clusters of related but distinct prompts, like real traffic.
SHARED = {
    "tone": ["briefly", "in plain English", "step by step", "for a beginner", "in detail", "politely",
             "in three bullet points", "as a table", "in one paragraph", "for an executive summary"],
    "who": ["my manager", "a new customer", "my team", "the support agent", "a ten year old", "our investors",
            "the legal department", "a colleague", "my landlord", "the hiring committee"],
}
DOMAINS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "support": ([
        "I ordered a {item} {when} and it still has not arrived, where is my parcel?",
        "The {item} I received is {defect}; can I get a refund or a replacement?",
        "How do I return a {item} that I bought {when}?",
        "My account was charged twice for the {item}, please fix this {tone}",
        "Write a reply to a customer whose {item} arrived {defect}",
        "Cancel my subscription for the {plan} plan and explain the refund policy {tone}",
        "Why was my order of a {item} cancelled without notice?",
    ], {
        "item": ["laptop", "pair of running shoes", "coffee machine", "winter jacket", "phone case", "desk lamp",
                 "blender", "office chair", "bicycle helmet", "set of headphones", "backpack", "smart watch",
                 "vacuum cleaner", "air fryer", "gaming console", "kettle", "sofa", "mattress"],
        "when": ["last week", "two weeks ago", "yesterday", "a month ago", "on Black Friday", "in March",
                 "three days ago", "before Christmas"],
        "defect": ["broken", "scratched", "the wrong colour", "missing a part", "damaged in transit",
                   "not working", "the wrong size", "used"],
        "plan": ["premium", "family", "student", "business", "basic", "annual"],
    }),
    "coding": ([
        "How do I {task} in {lang}?",
        "Write a {lang} function that {task2}",
        "Why does my {lang} code raise {error} when I {task}?",
        "Explain the difference between {a} and {b} in {lang} {tone}",
        "Refactor this {lang} snippet to {task2} without using {a}",
        "Write unit tests in {lang} for a function that {task2}",
        "What is the fastest way to {task} in {lang} for a large input?",
    ], {
        "lang": ["Python", "JavaScript", "Rust", "Go", "Java", "C++", "TypeScript", "SQL", "Bash", "Kotlin",
                 "Ruby", "C#"],
        "task": ["reverse a list", "read a CSV file", "parse JSON", "sort a dictionary by value",
                 "make an HTTP request", "remove duplicates from an array", "connect to PostgreSQL",
                 "handle timeouts", "write to a file", "spawn a thread", "format a date", "merge two maps"],
        "task2": ["counts the words in a text", "checks whether a string is a palindrome",
                  "computes a moving average", "validates an email address", "flattens a nested list",
                  "retries a network call with backoff", "groups records by customer",
                  "finds the shortest path in a graph", "deduplicates log lines", "paginates query results"],
        "error": ["a null pointer exception", "an index out of range error", "a type error",
                  "a deadlock", "a segmentation fault", "a stack overflow", "a timeout", "a key error"],
        "a": ["lists", "tuples", "interfaces", "generics", "closures", "threads", "promises", "iterators",
              "structs", "classes"],
        "b": ["arrays", "sets", "abstract classes", "macros", "callbacks", "coroutines", "async functions",
              "generators", "enums", "records"],
    }),
    "finance": ([
        "Summarise the {report} of {company} for {who} {tone}",
        "What does {term} mean in a {report}?",
        "Should a small business worry about {risk} when {action}?",
        "Draft an email to {who} explaining why {metric} dropped in {quarter}",
        "Compare {term} and {term2} for a {company}",
        "Calculate the {metric} of a {company} with the figures below",
    ], {
        "report": ["quarterly earnings report", "annual report", "balance sheet", "cash flow statement",
                   "audit findings", "budget forecast", "tax return", "invoice ledger"],
        "company": ["retail chain", "software startup", "bakery", "logistics firm", "hospital",
                    "consulting agency", "car dealership", "restaurant group"],
        "term": ["EBITDA", "working capital", "deferred revenue", "amortisation", "gross margin",
                 "accounts receivable", "free cash flow", "burn rate", "churn", "operating leverage"],
        "term2": ["net income", "liquidity", "accrued expenses", "depreciation", "contribution margin",
                  "accounts payable", "runway", "retention"],
        "risk": ["inflation", "currency swings", "late payments", "interest rates", "fraud", "supply costs"],
        "action": ["hiring", "expanding abroad", "taking a loan", "raising prices", "signing a lease"],
        "metric": ["revenue", "profit margin", "customer lifetime value", "conversion rate", "average order value",
                   "return on investment"],
        "quarter": ["Q1", "Q2", "Q3", "Q4", "the last quarter", "the first half of the year"],
    }),
    "travel": ([
        "Plan a {days} trip to {city} for {group} on a {budget} budget",
        "What are the best things to do in {city} in {season}?",
        "Is it safe to travel to {city} {season}, and what should I pack?",
        "Find me a cheap way to get from {city} to {city2}",
        "Write a packing list for a {days} {kind} holiday {season}",
        "Which neighbourhood of {city} is best for {group}?",
    ], {
        "days": ["weekend", "three-day", "one-week", "ten-day", "two-week", "one-month"],
        "city": ["Paris", "Tokyo", "Lisbon", "New York", "Cape Town", "Reykjavik", "Buenos Aires", "Istanbul",
                 "Bangkok", "Vienna", "Marrakech", "Vancouver", "Rome", "Seoul", "Mexico City", "Prague"],
        "city2": ["London", "Berlin", "Madrid", "Kyoto", "Boston", "Sydney", "Lima", "Athens", "Hanoi",
                  "Copenhagen"],
        "group": ["a family with kids", "a couple", "a solo traveller", "students", "retirees", "a business team"],
        "budget": ["tight", "moderate", "luxury", "backpacker"],
        "season": ["in winter", "in summer", "in the rainy season", "in spring", "over Easter", "in autumn"],
        "kind": ["beach", "ski", "hiking", "city", "camping", "road trip"],
    }),
    "health": ([
        "What are common causes of {symptom} in {person}?",
        "Suggest a {diet} meal plan for {person} who wants to {goal}",
        "Explain {condition} to {who} {tone}",
        "Is it normal to have {symptom} after {activity}?",
        "Write a weekly {exercise} routine for {person} who wants to {goal}",
    ], {
        "symptom": ["headaches", "back pain", "trouble sleeping", "a sore throat", "dizziness", "fatigue",
                    "knee pain", "a rash", "heartburn", "a persistent cough"],
        "person": ["an adult", "a teenager", "an older adult", "a runner", "an office worker", "a pregnant woman",
                   "a toddler"],
        "diet": ["vegetarian", "low-carb", "high-protein", "Mediterranean", "vegan", "gluten-free"],
        "goal": ["lose weight", "build muscle", "sleep better", "lower blood pressure", "run a marathon",
                 "reduce stress"],
        "condition": ["type 2 diabetes", "asthma", "high cholesterol", "migraine", "anaemia", "arthritis",
                      "seasonal allergies"],
        "activity": ["running", "a long flight", "drinking coffee", "lifting weights", "a vaccine", "swimming"],
        "exercise": ["strength", "cardio", "yoga", "stretching", "cycling", "swimming"],
    }),
    "legal": ([
        "Explain the {clause} clause in this {contract} {tone}",
        "Can my {party} {action} without my consent?",
        "Draft a {contract} between {who} and a {party}",
        "What are my rights if my {party} {action}?",
        "Summarise the {law} for a {business} owner",
    ], {
        "clause": ["termination", "non-compete", "indemnity", "confidentiality", "force majeure", "liability",
                   "payment terms", "arbitration"],
        "contract": ["employment contract", "lease agreement", "service agreement", "NDA", "partnership agreement",
                     "sales contract", "freelance contract"],
        "party": ["landlord", "employer", "tenant", "supplier", "business partner", "contractor", "client"],
        "action": ["raise the rent", "share my personal data", "end the contract early", "withhold my deposit",
                   "change my working hours", "refuse to pay an invoice"],
        "law": ["GDPR", "data retention rules", "consumer protection law", "employment law", "copyright rules",
                "VAT rules"],
        "business": ["small online shop", "restaurant", "software company", "freelance designer", "clinic"],
    }),
    "cooking": ([
        "Give me a recipe for {dish} using {ingredient}",
        "How long should I cook {ingredient} in {method}?",
        "What can I substitute for {ingredient} in {dish}?",
        "Plan a {course} dinner for {guests} with {diet} options",
        "Why did my {dish} turn out {problem}?",
    ], {
        "dish": ["lasagna", "banana bread", "chicken curry", "risotto", "pancakes", "sourdough bread", "paella",
                 "ramen", "chocolate cake", "tacos", "lentil soup", "pad thai", "quiche", "apple pie"],
        "ingredient": ["eggs", "butter", "chickpeas", "salmon", "tofu", "spinach", "mushrooms", "rice",
                       "sweet potatoes", "coconut milk", "flour", "pork shoulder"],
        "method": ["the oven", "an air fryer", "a slow cooker", "a pressure cooker", "a frying pan", "the grill"],
        "course": ["three-course", "buffet", "two-course", "tapas", "holiday"],
        "guests": ["six guests", "two people", "a family of four", "twenty colleagues", "my in-laws"],
        "diet": ["vegan", "gluten-free", "nut-free", "vegetarian", "dairy-free"],
        "problem": ["too dry", "flat", "soggy", "too salty", "burnt on the bottom", "dense"],
    }),
    "marketing": ([
        "Write a {channel} post announcing our new {product} for {audience}",
        "Suggest five taglines for a {product} aimed at {audience}",
        "Draft a {channel} campaign to win back {audience} who stopped buying our {product}",
        "Rewrite this product description of a {product} to sound more {style}",
        "What KPIs should we track for a {channel} campaign about a {product}?",
    ], {
        "channel": ["LinkedIn", "Instagram", "newsletter", "blog", "TikTok", "press release", "Google Ads",
                    "podcast"],
        "product": ["fitness app", "project management tool", "organic tea", "electric scooter",
                    "budgeting app", "language course", "pet food brand", "coworking space", "solar panel kit",
                    "meal kit"],
        "audience": ["students", "small business owners", "parents", "developers", "retirees", "nurses",
                     "gamers", "remote workers"],
        "style": ["playful", "professional", "luxurious", "friendly", "urgent", "minimalist"],
    }),
    "hr": ([
        "Write a job description for a {role} at a {company}",
        "Prepare interview questions for a {level} {role}",
        "How should I give feedback to a {role} who {issue}?",
        "Draft an onboarding plan for a new {role} {tone}",
        "Write a message to {who} announcing that {news}",
    ], {
        "role": ["data engineer", "nurse", "sales manager", "product designer", "accountant", "teacher",
                 "warehouse supervisor", "backend developer", "customer success manager", "recruiter"],
        "company": ["fintech startup", "hospital", "public school", "retail chain", "game studio", "law firm"],
        "level": ["junior", "senior", "lead", "intern", "principal"],
        "issue": ["misses deadlines", "is often late", "dominates meetings", "needs more autonomy",
                  "wants a promotion", "is burning out"],
        "news": ["we are moving offices", "the team is growing", "bonuses are delayed",
                 "we switch to a four-day week", "a colleague is retiring"],
    }),
    "science": ([
        "Explain {topic} to {who} {tone}",
        "What is the difference between {topic} and {topic2}?",
        "Why does {phenomenon} happen?",
        "Summarise recent research on {topic} {tone}",
        "Write a quiz with five questions about {topic}",
    ], {
        "topic": ["photosynthesis", "black holes", "plate tectonics", "the immune system", "quantum entanglement",
                  "climate change", "DNA replication", "neural networks", "inflation in economics",
                  "the water cycle", "vaccines", "general relativity", "volcanoes", "antibiotic resistance"],
        "topic2": ["cellular respiration", "neutron stars", "erosion", "allergies", "superposition", "weather",
                   "RNA", "decision trees", "deflation", "evaporation"],
        "phenomenon": ["the sky look blue", "ice float on water", "the moon change shape", "bread rise",
                       "metal feel colder than wood", "a rainbow form", "thunder follow lightning",
                       "leaves change colour in autumn"],
    }),
}
PREFIXES = ["", "", "", "Please ", "Quick question: ", "Hi, ", "Can you help? ", "Urgent: "]
SUFFIXES = ["", "", "", " Thanks!", " Keep it short.", " Use simple words.", " Answer in French.",
            " Include an example."]


def generate_prompts(count: int, seed: int = 7) -> list[str]:
    """`count` distinct prompts, deterministic for a seed."""
    rng = random.Random(seed)
    names = sorted(DOMAINS)
    seen: dict[str, None] = {}
    while len(seen) < count:
        templates, vocab = DOMAINS[rng.choice(names)]
        template = rng.choice(templates)
        fields = {**SHARED, **vocab}
        text = template.format_map({name: rng.choice(values) for name, values in fields.items()})
        if text[-1] not in ".?!":
            text += "."
        prefix = rng.choice(PREFIXES)
        if prefix in ("Please ", "Hi, ") and not text.startswith("I "):
            text = text[0].lower() + text[1:]
        text = prefix + text + rng.choice(SUFFIXES)
        seen.setdefault(text, None)
    texts = list(seen)
    rng.shuffle(texts)
    return texts


def prompt_vectors(texts: list[str], cache_dir: Path) -> np.ndarray:
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"minilm-{len(texts)}-{digest}.npy"
    if path.exists():
        print(f"[embed] {len(texts):,} prompt vectors from the cache {path.name}", flush=True)
        return np.load(path)
    from ingest.services.embeddings import embed_texts, load_model

    model = load_model()
    print(f"[embed] embedding {len(texts):,} prompts with {model.name} ({model.device}, {model.dtype}); "
          "cached for the next run", flush=True)
    t0 = time.perf_counter()
    out = []
    step = 2000
    for i in range(0, len(texts), step):
        out.append(np.asarray(embed_texts(texts[i:i + step]), dtype=np.float32))
        print(f"[embed]   {i + len(out[-1]):,}/{len(texts):,} ({time.perf_counter() - t0:.0f} s)", flush=True)
    vectors = np.concatenate(out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    print(f"[embed] {len(texts) / (time.perf_counter() - t0):,.0f} prompts/s", flush=True)
    return vectors


# --- the synthetic corpus --------------------------------------------------------
class Corpus:
    """Row i: vector, parent prompt, service, model, timestamp and prompt/prompt_hash, for i < size."""

    def __init__(self, base_texts: list[str], base_vectors: np.ndarray, size: int, now: datetime, seed: int = 11):
        rng = np.random.default_rng(seed)
        n_base = len(base_texts)
        self.size = size
        self.base_texts = base_texts
        parent = np.empty(size, dtype=np.int64)
        parent[:min(size, n_base)] = np.arange(min(size, n_base))
        if size > n_base:
            parent[n_base:] = rng.integers(0, n_base, size - n_base)
        self.parent = parent
        self.vectors = np.empty((size, base_vectors.shape[1]), dtype=np.float32)
        self.vectors[:min(size, n_base)] = base_vectors[:size]
        for start in range(n_base, size, 100_000):
            stop = min(size, start + 100_000)
            noise = rng.standard_normal((stop - start, base_vectors.shape[1]), dtype=np.float32)
            noise *= (rng.uniform(*SIGMA, stop - start).astype(np.float32) / np.sqrt(base_vectors.shape[1]))[:, None]
            block = base_vectors[parent[start:stop]] + noise
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            self.vectors[start:stop] = block
        self.service = rng.integers(0, len(SERVICES), size).astype(np.int8)
        self.model = rng.integers(0, len(MODELS), size).astype(np.int8)
        # Microseconds before `now`, uniform over the window; rows are loaded in time order.
        self.age_us = rng.integers(0, DAYS * 86_400_000_000, size)
        self.set_now(now)

    def set_now(self, now: datetime) -> None:
        self.now = now
        self.now_us = (now - PG_EPOCH) // timedelta(microseconds=1)

    def prompt(self, i: int) -> str:
        text = self.base_texts[self.parent[i]]
        return text if i < len(self.base_texts) else f"{text} (ticket {i})"

    def keys(self, rows: np.ndarray) -> list[str]:
        return [hashlib.sha256(self.prompt(i).encode()).hexdigest() for i in rows]


def _copy_spans(cur, corpus: Corpus, project_id: int, rows: np.ndarray, keys: list[str]) -> None:
    columns = ("project_id, span_id, timestamp_utc, trace_id, model, provider, service_name, endpoint, environment, "
               "status, finish_reason, prompt_tokens, completion_tokens, latency_ms_total, latency_ms_ttft, "
               "cost_usd_micro, is_sampled, scan_status, prompt, prompt_hash, received_at")
    lines = []
    for i, key in zip(rows.tolist(), keys):
        ts = PG_EPOCH + timedelta(microseconds=corpus.now_us - int(corpus.age_us[i]))
        model, provider = MODELS[corpus.model[i]]
        prompt = corpus.prompt(i)
        lines.append(f"{project_id}\tb-{i:08d}\t{ts.isoformat()}\tt-{i // 3:08d}\t{model}\t{provider}\t"
                     f"{SERVICES[corpus.service[i]]}\t/chat\tproduction\tsuccess\tstop\t{len(prompt) // 4 + 20}\t"
                     f"{120 + i % 400}\t{800 + i % 5000}.5\t{200 + i % 700}.5\t{i % 9000}\tt\tok\t{prompt}\t{key}\t"
                     f"{ts.isoformat()}\n")
    with cur.copy(f"COPY ingest_span ({columns}) FROM STDIN") as copy:
        for start in range(0, len(lines), 10_000):
            copy.write("".join(lines[start:start + 10_000]))


def _copy_embeddings(cur, corpus: Corpus, project_id: int, rows: np.ndarray, keys: list[str]) -> None:
    """Binary COPY built with numpy: every field has a fixed width, so a row is one structured record."""
    dim = corpus.vectors.shape[1]
    model_name = b"all-MiniLM-L6-v2"
    record = np.dtype([
        ("nfields", ">i2"),
        ("l_project", ">i4"), ("project", ">i8"),
        ("l_key", ">i4"), ("key", "S64"),
        ("l_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,)),
        ("l_model", ">i4"), ("model", f"S{len(model_name)}"),
        ("l_created", ">i4"), ("created", ">i8"),
    ])
    data = np.zeros(len(rows), dtype=record)
    data["nfields"] = 5
    data["l_project"], data["project"] = 8, project_id
    data["l_key"], data["key"] = 64, np.array(keys, dtype="S64")
    data["l_vec"], data["dim"], data["vec"] = 4 + 4 * dim, dim, corpus.vectors[rows]
    data["l_model"], data["model"] = len(model_name), model_name
    data["l_created"], data["created"] = 8, corpus.now_us - corpus.age_us[rows]
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    with cur.copy("COPY ingest_embedding (project_id, content_key, embedding, model_name, created_at) "
                  "FROM STDIN WITH (FORMAT binary)") as copy:
        copy.write(header)
        for start in range(0, len(data), 20_000):
            copy.write(data[start:start + 20_000].tobytes())
        copy.write(struct.pack(">h", -1))


def _copy_day_embeddings(cur, corpus: Corpus, project_id: int, rows: np.ndarray, keys: list[str]) -> None:
    """Binary COPY built with numpy: within one (service, model) group every field has a fixed width,
    so a row is one structured record (ingest_embeddingday: a row per day, prompt, service, model
    and provider; here one each, as every vector has one span)."""
    dim = corpus.vectors.shape[1]
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    keys_array = np.array(keys, dtype="S64")
    days = (corpus.now_us - corpus.age_us[rows]) // 86_400_000_000  # days since 2000-01-01 (UTC)
    with cur.copy("COPY ingest_embeddingday (project_id, day, content_key, service_name, model, provider, embedding) "
                  "FROM STDIN WITH (FORMAT binary)") as copy:
        copy.write(header)
        for s_index, service in enumerate(SERVICES):
            for m_index, (model, provider) in enumerate(MODELS):
                pick = np.flatnonzero((corpus.service[rows] == s_index) & (corpus.model[rows] == m_index))
                if not len(pick):
                    continue
                texts = [t.encode() for t in (service, model, provider)]
                record = np.dtype([
                    ("nfields", ">i2"),
                    ("l_project", ">i4"), ("project", ">i8"),
                    ("l_day", ">i4"), ("day", ">i4"),
                    ("l_key", ">i4"), ("key", "S64"),
                    ("l_service", ">i4"), ("service", f"S{len(texts[0])}"),
                    ("l_model", ">i4"), ("model", f"S{len(texts[1])}"),
                    ("l_provider", ">i4"), ("provider", f"S{len(texts[2])}"),
                    ("l_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f2", (dim,)),  # halfvec
                ])
                data = np.zeros(len(pick), dtype=record)
                data["nfields"] = 7
                data["l_project"], data["project"] = 8, project_id
                data["l_day"], data["day"] = 4, days[pick]
                data["l_key"], data["key"] = 64, keys_array[pick]
                for name, text in zip(("service", "model", "provider"), texts):
                    data[f"l_{name}"], data[name] = len(text), text
                data["l_vec"], data["dim"], data["vec"] = 4 + 2 * dim, dim, corpus.vectors[rows[pick]]
                for start in range(0, len(data), 20_000):
                    copy.write(data[start:start + 20_000].tobytes())
        copy.write(struct.pack(">h", -1))


def load_rows(corpus: Corpus, project_id: int, start: int, stop: int) -> tuple[float, float]:
    """COPY rows [start, stop) in time order; answers (span seconds, embedding seconds)."""
    from django.db import connection, transaction

    rows = np.arange(start, stop)
    rows = rows[np.argsort(-corpus.age_us[start:stop], kind="stable")]
    t_spans = t_emb = 0.0
    for chunk_start in range(0, len(rows), 100_000):
        chunk = rows[chunk_start:chunk_start + 100_000]
        keys = corpus.keys(chunk)
        with transaction.atomic(), connection.cursor() as cur:
            t0 = time.perf_counter()
            _copy_spans(cur.cursor, corpus, project_id, chunk, keys)
            t1 = time.perf_counter()
            _copy_embeddings(cur.cursor, corpus, project_id, chunk, keys)
            _copy_day_embeddings(cur.cursor, corpus, project_id, chunk, keys)
            t2 = time.perf_counter()
        t_spans += t1 - t0
        t_emb += t2 - t1
        print(f"[load]   {start + chunk_start + len(chunk):,}/{stop:,} rows "
              f"(spans {t_spans:.0f} s, embeddings {t_emb:.0f} s)", flush=True)
    # The facets of the loaded prompts (as the worker writes them with the day copies).
    t0 = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("INSERT INTO ingest_embeddingfacet (project_id, content_key, service_name, model, provider) "
                    "SELECT DISTINCT project_id, content_key, service_name, model, provider FROM ingest_embeddingday "
                    "WHERE project_id = %s ON CONFLICT DO NOTHING", [project_id])
    t_emb += time.perf_counter() - t0
    return t_spans, t_emb


def _progress(url: str, stop: threading.Event, every: float, total: int) -> None:
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.wait(every):
            row = conn.execute("SELECT phase, tuples_done FROM pg_stat_progress_create_index").fetchone()
            if row:
                print(f"[index]   {time.perf_counter() - started:.0f} s: {row[0]}, {row[1]:,}/{total:,} tuples",
                      flush=True)


def build_index(index_sql: str, maintenance_mem: str, workers: int, total: int) -> float:
    from django.conf import settings
    from django.db import connection

    stop = threading.Event()
    watcher = threading.Thread(target=_progress, args=(settings.DATABASE_URL, stop, 30.0, total), daemon=True)
    watcher.start()
    try:
        with connection.cursor() as cur:
            cur.execute(f"SET maintenance_work_mem = '{maintenance_mem}'")
            cur.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
            t0 = time.perf_counter()
            cur.execute(index_sql)
            elapsed = time.perf_counter() - t0
            cur.execute("RESET maintenance_work_mem")
            cur.execute("RESET max_parallel_maintenance_workers")
    finally:
        stop.set()
        watcher.join()
    return elapsed


def prewarm() -> None:
    """Load the HNSW graphs into PostgreSQL's buffers, as a running appliance has them (pg_prewarm)."""
    from django.db import connection

    t0 = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        cur.execute("SELECT coalesce(sum(pg_prewarm(oid)), 0) FROM (SELECT 'ingest_embedding_hnsw'::regclass AS oid "
                    "UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = 'ingest_embeddingday_hnsw'::regclass) i")
        blocks = cur.fetchone()[0]
    print(f"[prewarm] {blocks * 8 / 1024:,.0f} MB of HNSW graphs in shared_buffers ({time.perf_counter() - t0:.0f} s)",
          flush=True)


# --- queries ------------------------------------------------------------------------
def exact_top(corpus: Corpus, size: int, queries: np.ndarray, mask: np.ndarray | None) -> list[set[int]]:
    """Brute-force top K row indexes per query (cosine on unit vectors = dot product)."""
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), K), dtype=np.int64)
    for start in range(0, size, 200_000):
        stop = min(size, start + 200_000)
        sims = queries @ corpus.vectors[start:stop].T
        if mask is not None:
            sims[~mask[:, start:stop]] = -np.inf
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, stop), sims.shape)], axis=1)
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        best_s = np.take_along_axis(s, top, 1)
        best_i = np.take_along_axis(i, top, 1)
    return [set(row.tolist()) for row in best_i]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def sql_exact(project_id: int, vector: list[float], filters) -> list[str]:
    """The exact-scan baseline: the nearest vectors under the same filters with index scans off (the day
    table has them all with their service; one row per prompt here, as each has one span). The day
    copies are half precision, so its agreement with numpy's fp32 top 10 shows what that costs."""
    from django.db import connection, transaction

    from ingest.selectors.search import _literal, _span_conditions, _vector_conditions

    vector_where, vector_params = _vector_conditions(filters)
    span_filter, span_params = "", []
    if filters.start or filters.end:  # the rows know their day; the window's edges are checked on the spans
        where, span_params = _span_conditions(filters, "s")
        span_filter = (f"AND EXISTS (SELECT 1 FROM ingest_span s WHERE s.project_id = e.project_id "
                       f"AND s.prompt_hash = e.content_key{where})")
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("SET LOCAL enable_indexscan = off")
        cur.execute(f"SELECT e.content_key FROM ingest_embeddingday e WHERE e.project_id = %s{vector_where} {span_filter} "
                    f"ORDER BY e.embedding <=> %s::halfvec(384) LIMIT %s",
                    [project_id, *vector_params, *span_params, _literal(vector), K])
        return [row[0] for row in cur.fetchall()]


def run_filter(name: str, corpus: Corpus, size: int, project_id: int, queries: np.ndarray,
               exact_queries: int, warmup: int, ef_values: list[int] | None) -> list[dict]:
    from django.conf import settings

    from ingest.selectors.search import similar_spans
    from ingest.selectors.spans import SpanFilters

    service_of = [i % len(SERVICES) for i in range(len(queries))]
    parts = set(name.split("+")) - {"none"}
    window = {"24h": 1, "7d": 7}
    days = next((window[p] for p in parts if p in window), None)
    if parts - {"service"} - set(window):
        raise SystemExit(f"unknown filter {name!r}: use none, service, 24h, 7d or combinations like service+24h")
    start = corpus.now - timedelta(days=days) if days else None
    filters = [SpanFilters(service=SERVICES[s] if "service" in parts else None, start=start) for s in service_of]
    mask = None
    if "service" in parts:
        mask = corpus.service[:size][None, :] == np.array(service_of, dtype=np.int8)[:, None]
    if days:
        recent = (corpus.age_us[:size] < days * 86_400_000_000)[None, :]
        mask = np.broadcast_to(recent, (len(queries), size)) if mask is None else mask & recent
    truth_rows = exact_top(corpus, size, queries, mask)
    truth = [set(corpus.keys(np.fromiter(rows, dtype=np.int64))) for rows in truth_rows]
    vectors = queries.tolist()

    exact_ms, exact_recall = [], []
    for vector, flt, want in list(zip(vectors, filters, truth))[:exact_queries]:
        t0 = time.perf_counter()
        got = sql_exact(project_id, vector, flt)
        exact_ms.append((time.perf_counter() - t0) * 1000)
        exact_recall.append(len(set(got) & want) / K)

    results = []
    from ingest.selectors.search import _window_days

    window = _window_days(filters[0])
    day_graphs = window is not None and window <= settings.SEARCH_DAY_GRAPHS_MAX_DAYS
    setting = "SEARCH_DAY_EF" if day_graphs else "SEARCH_EF"
    default_ef = getattr(settings, setting)
    for ef in ef_values or [default_ef]:
        setattr(settings, setting, ef)  # read by the selector on each call
        # Warm the caches with stored vectors, not with the measured queries.
        rng = np.random.default_rng(5)
        for i, row in enumerate(rng.integers(0, size, warmup).tolist()):
            similar_spans(project_id=project_id, vector=corpus.vectors[row].tolist(), k=K,
                          filters=filters[i % len(filters)])
        latencies, recalls = [], []
        for vector, flt, want in zip(vectors, filters, truth):
            t0 = time.perf_counter()
            items = similar_spans(project_id=project_id, vector=vector, k=K, filters=flt)
            latencies.append((time.perf_counter() - t0) * 1000)
            recalls.append(len({item["prompt_hash"] for item in items} & want) / K)
        results.append({
            "size": size, "filter": name, "path": "days" if day_graphs else "global", "ef": ef,
            "default_ef": ef == default_ef, "recall": statistics.fmean(recalls),
            "bad": sum(r <= 0.5 for r in recalls),
            "load": os.getloadavg()[0], "p50": pct(latencies, 50), "p99": pct(latencies, 99),
            "exact_p50": statistics.median(exact_ms) if exact_ms else float("nan"),
            "exact_check": statistics.fmean(exact_recall) if exact_recall else float("nan")})
    setattr(settings, setting, default_ef)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated corpus sizes, ascending")
    parser.add_argument("--prompts", type=int, default=20_000, help="real prompts embedded with MiniLM")
    parser.add_argument("--queries", type=int, default=200, help="held-out query prompts")
    parser.add_argument("--exact-queries", type=int, default=20, help="queries timed on the exact (seq scan) path")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--filters", default="none,service,24h,service+24h,service+7d")
    parser.add_argument("--maintenance-work-mem", default="3GB")
    parser.add_argument("--index-workers", type=int, default=max(0, (os.cpu_count() or 2) - 1),
                        help="max_parallel_maintenance_workers for the HNSW build")
    parser.add_argument("--reuse", action="store_true",
                        help="query the database the last run left (same --sizes/--prompts), without loading")
    parser.add_argument("--m", type=int, help="HNSW m (default: the migration's)")
    parser.add_argument("--ef-construction", type=int, help="HNSW ef_construction (default: the migration's)")
    parser.add_argument("--ef-search", help="comma-separated SEARCH_EF values, each measured on the same index "
                        "(default: the settings' SEARCH_EF)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    filter_names = args.filters.split(",")

    data_dir = BENCH_DIR / "db"
    if args.reuse and len(sizes) != 1:
        parser.error("--reuse queries the one size already loaded: give it with --sizes")
    if not args.reuse:
        shutil.rmtree(data_dir, ignore_errors=True)
    os.environ.update(DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="appliance.settings")
    for name in ("DATABASE_URL", "POSTGRES_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        os.environ.pop(name, None)

    import django

    print(f"[setup] {'the PostgreSQL of the last run' if args.reuse else 'fresh embedded PostgreSQL'} in {data_dir}",
          flush=True)
    django.setup()  # this process starts (and at exit stops) the embedded servers
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from ingest.models import Project
    from ingest.services.partitions import partitions_ensure

    logging.getLogger("ingest.services.partitions").setLevel(logging.WARNING)
    now = datetime.now(timezone.utc)
    if args.reuse:
        project = Project.objects.get(name="bench-search")
    else:
        call_command("migrate", verbosity=0)
        project = Project.objects.create(name="bench-search")
        partitions_ensure(days={(now - timedelta(days=d)).date() for d in range(DAYS + 1)})

    texts = generate_prompts(args.prompts + args.queries)
    vectors = prompt_vectors(texts, BENCH_DIR / "cache")
    base_texts, base_vectors = texts[:args.prompts], vectors[:args.prompts]
    queries = vectors[args.prompts:]
    t0 = time.perf_counter()
    corpus = Corpus(base_texts, base_vectors, sizes[-1], now)
    if args.reuse:
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest_embedding WHERE project_id = %s", [project.id])
            if cur.fetchone()[0] != sizes[0]:
                raise SystemExit(f"--reuse: the database does not hold {sizes[0]:,} embeddings of this corpus")
            cur.execute("SELECT max(timestamp_utc) FROM ingest_span WHERE project_id = %s", [project.id])
            newest = cur.fetchone()[0]
        # Ages come from the seeded generator: the newest row fixes the load's `now`.
        corpus.set_now(newest + timedelta(microseconds=int(corpus.age_us[:sizes[0]].min())))
    print(f"[data] {sizes[-1]:,} vectors from {len(base_texts):,} real ones ({time.perf_counter() - t0:.0f} s); "
          f"{len(queries)} held-out queries", flush=True)

    index_names = ("ingest_embedding_hnsw", "ingest_embeddingday_hnsw")  # the global graph, the day graphs
    index_sqls = {}
    with connection.cursor() as cur:
        for name in index_names:
            cur.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [name])
            # The partitioned index is built per partition.
            index_sqls[name] = cur.fetchone()[0].replace(" ON ONLY ", " ON ")
    if args.m or args.ef_construction:
        import re

        for name, sql in index_sqls.items():
            if args.m:
                sql = re.sub(r"m='?\d+'?", f"m='{args.m}'", sql)
            if args.ef_construction:
                sql = re.sub(r"ef_construction='?\d+'?", f"ef_construction='{args.ef_construction}'", sql)
            index_sqls[name] = sql
    ef_values = [int(x) for x in args.ef_search.split(",")] if args.ef_search else None
    print(f"[setup] {'; '.join(index_sqls.values())}; SEARCH_EF={settings.SEARCH_EF} (global graph), "
          f"SEARCH_DAY_EF={settings.SEARCH_DAY_EF} (day graphs, windows up to "
          f"{settings.SEARCH_DAY_GRAPHS_MAX_DAYS} days), measured: {ef_values or 'those'}; "
          f"SEARCH_EXACT_BELOW={settings.SEARCH_EXACT_BELOW}", flush=True)

    results, builds = [], []
    loaded = 0
    for size in sizes:
        if args.reuse:
            prewarm()
            for name in filter_names:
                results += run_filter(name, corpus, size, project.id, queries, args.exact_queries, args.warmup,
                                      ef_values)
                print(f"[query] {size:,} / {name} done", flush=True)
            continue
        print(f"\n[load] {size:,} embeddings: COPY rows {loaded:,}..{size:,} (HNSW indexes dropped)", flush=True)
        with connection.cursor() as cur:
            for name in index_names:
                cur.execute(f"DROP INDEX IF EXISTS {name}")
        t_spans, t_emb = load_rows(corpus, project.id, loaded, size)
        loaded = size
        t0 = time.perf_counter()
        with connection.cursor() as cur:
            for table in ("ingest_span", "ingest_embedding", "ingest_embeddingday"):
                cur.execute(f"VACUUM (ANALYZE) {table}")
        t_vacuum = time.perf_counter() - t0
        build = {"size": size, "spans": t_spans, "embeddings": t_emb, "vacuum": t_vacuum}
        for name in index_names:
            print(f"[index] building {name} over {size:,} vectors (maintenance_work_mem={args.maintenance_work_mem}, "
                  f"{args.index_workers} parallel workers)", flush=True)
            seconds = build_index(index_sqls[name], args.maintenance_work_mem, args.index_workers, size)
            with connection.cursor() as cur:
                cur.execute("SELECT pg_relation_size(%s::regclass) + coalesce((SELECT sum(pg_relation_size(inhrelid)) "
                            "FROM pg_inherits WHERE inhparent = %s::regclass), 0)", [name, name])
                megabytes = cur.fetchone()[0] / 2**20
            build[name] = (seconds, megabytes)
            print(f"[index] built in {seconds:.0f} s ({megabytes:,.0f} MB)", flush=True)
        builds.append(build)
        prewarm()
        for name in filter_names:
            t0 = time.perf_counter()
            for result in run_filter(name, corpus, size, project.id, queries, args.exact_queries, args.warmup,
                                     ef_values):
                results.append(result)
                print(f"[query] {size:,} / {name} / {result['path']} graph(s), ef {result['ef']}: recall@10 {result['recall']:.3f}, "
                      f"p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, "
                      f"exact p50 {result['exact_p50']:.0f} ms", flush=True)
            print(f"[query]   ({time.perf_counter() - t0:.0f} s)", flush=True)

    from ingest.services.embeddings import embed_texts, load_model

    load_model()
    embed_ms = []
    for text in texts[args.prompts:args.prompts + 50]:
        t0 = time.perf_counter()
        embed_texts([text])
        embed_ms.append((time.perf_counter() - t0) * 1000)

    print()
    print(f"{'size':>10} {'spans COPY':>11} {'emb. COPY':>10} {'vacuum':>8} {'global HNSW':>17} {'day HNSW':>17}")
    for b in builds:
        (g_s, g_mb), (d_s, d_mb) = b["ingest_embedding_hnsw"], b["ingest_embeddingday_hnsw"]
        print(f"{b['size']:>10,} {b['spans']:>9.1f} s {b['embeddings']:>8.1f} s {b['vacuum']:>6.1f} s "
              f"{g_s:>6.0f} s {g_mb:>6,.0f} MB {d_s:>6.0f} s {d_mb:>6,.0f} MB")
    print(f"(loads are cumulative: each size COPYs only the rows beyond the previous one)")
    print()
    print(f"{'size':>10}  {'filter':<12} {'path':>6} {'ef':>4} {'recall@10':>9} {'<=0.5':>5} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'exact p50':>10} {'exact/p50':>9} {'target':>7} {'load':>5}")
    for r in results:
        met = r["recall"] >= 0.95 and r["p50"] < 20
        print(f"{r['size']:>10,}  {r['filter']:<12} {r['path']:>6} {r['ef']:>4} {r['recall']:>9.3f} {r['bad']:>5} "
              f"{r['p50']:>8.1f} {r['p99']:>8.1f} {r['exact_p50']:>10.0f} {r['exact_p50'] / r['p50']:>8.0f}x "
              f"{'met' if met else 'MISSED':>7} {r['load']:>5.1f}")
    print()
    print(f"queries: {len(queries)} held-out prompts (service filter rotates over {len(SERVICES)} services, "
          f"~{100 / len(SERVICES):.0f} % of rows; 24h ~{100 / DAYS:.1f} %; service+24h ~{100 / len(SERVICES) / DAYS:.1f} %; "
          f"service+7d ~{700 / len(SERVICES) / DAYS:.1f} %)")
    print(f"latency: the real selector similar_spans (neighbours + their latest spans), after {args.warmup} warm-up "
          f"queries; path: the global graph or the window's day graphs; ef: hnsw.ef_search (SEARCH_EF for the "
          f"global graph, SEARCH_DAY_EF for each day graph); SEARCH_EXACT_BELOW={settings.SEARCH_EXACT_BELOW}")
    print(f"exact p50: the same query as a sequential scan over {args.exact_queries} queries; its agreement with "
          "numpy: " + ", ".join(f"{r['exact_check']:.3f}" for r in results if r["default_ef"]))
    print("<=0.5: queries (of the held-out ones) that found at most half of their true top 10")
    print(f"load: the 1-minute load average after each row ({os.cpu_count()} CPUs; the machine may be shared)")
    print(f"embedding one query text (MiniLM, not in the figures above): p50 {pct(embed_ms, 50):.1f} ms")
    target = all(r["recall"] >= 0.95 and r["p50"] < 20 for r in results if r["default_ef"])
    print(f"target recall >= 0.95 at p50 < 20 ms (every size and filter, default ef): "
          f"{'met' if target else 'NOT met'}")
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
