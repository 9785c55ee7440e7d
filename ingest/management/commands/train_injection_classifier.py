"""Train the tier-2 injection classifier (ingest/data/injection_classifier.json) on the corpus's train split.

    manage.py train_injection_classifier [--corpus tests/security/corpus/corpus.jsonl] [--max-fp 0.005]

Logistic regression (L2, class-balanced, Newton's method in numpy: deterministic) over the MiniLM
vectors of the normalised texts. Positives: kind=injection; negatives: kind=clean and kind=pii
(a prompt with an e-mail address is not an attack) and EXEMPLARS below (framework JSON that
tier 1 used to flag). The held-out split is never trained on: it is only scored, at the end.

The regularisation and the threshold are chosen by 5-fold cross-validation on the train split,
folds by template family (the held-out split is split by family too, so a fold's texts come
from phrasings the rest never saw): the threshold is the lowest at which the out-of-fold
false positives on clean prompts stay within --max-fp (0.005: tier 1 flags about 0.4 % of the
clean train prompts itself, and the two tiers together should stay near 1 %).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError

FOLDS = 5
LAMBDAS = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
ROOT = Path(__file__).resolve().parents[3]

# Structural framework JSON seen in real traces (LangChain output parsers, OpenAI-style message
# lists, tool results): not attacks, whatever their keys say.
_LC_MESSAGE = ('{{"content": "{c}", "additional_kwargs": {{}}, "response_metadata": {{}}, "type": "ai", '
               '"name": null, "id": "run-{i}", "example": false, "tool_calls": [], "invalid_tool_calls": [], '
               '"usage_metadata": null}}')
_CONTENTS = ["The capital of France is Paris.", "Here is the summary of the meeting notes.", "42",
             "Sure! The refund was issued on Monday.", "I could not find any order with that number.",
             "{\\\"answer\\\": \\\"yes\\\", \\\"confidence\\\": 0.82}", "Step 1: open the settings page.",
             "SELECT count(*) FROM orders WHERE status = 'late';"]
EXEMPLARS: list[str] = [
    *(_LC_MESSAGE.format(c=c, i=f"{n:04x}-7f3a") for n, c in enumerate(_CONTENTS)),
    '{"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": '
    '"What is the weather in Berlin?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", '
    '"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Berlin\\"}"}}]}, '
    '{"role": "tool", "tool_call_id": "call_1", "content": "{\\"temp_c\\": 7}"}]}',
    '[{"role": "user", "content": "Summarise the ticket"}, {"role": "assistant", "content": "The customer wants '
    'a refund.", "tool_calls": []}]',
    '{"input": "What is 2 + 2?", "chat_history": [], "agent_scratchpad": [], "intermediate_steps": []}',
    '{"text": "{\\"action\\": \\"Final Answer\\", \\"action_input\\": \\"The order ships tomorrow.\\"}"}',
    '{"generations": [[{"text": "Paris", "generation_info": {"finish_reason": "stop"}, "type": "ChatGeneration", '
    '"message": {"content": "Paris", "tool_calls": [], "invalid_tool_calls": []}}]], "llm_output": null}',
    'content=\'The invoice total is 129.95 EUR.\' additional_kwargs={} response_metadata={\'finish_reason\': '
    '\'stop\', \'model_name\': \'gpt-4o-mini\'} id=\'run-1c2d\' tool_calls=[] invalid_tool_calls=[]',
    'AIMessage(content=\'\', additional_kwargs={\'tool_calls\': [{\'id\': \'call_9\', \'function\': {\'arguments\':'
    ' \'{"query": "late orders"}\', \'name\': \'search_orders\'}, \'type\': \'function\'}]}, tool_calls=[{\'name\':'
    ' \'search_orders\', \'args\': {\'query\': \'late orders\'}, \'id\': \'call_9\'}])',
    '{"tool_calls": [], "invalid_tool_calls": [], "content": ""}',
    '{"function_call": null, "tool_calls": null, "role": "assistant", "content": "Done."}',
    '{"name": "search_orders", "arguments": {"customer_id": 1842, "status": "shipped"}}',
    '{"type": "function", "function": {"name": "get_current_time", "description": "Current time in a timezone", '
    '"parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}',
    '{"tools": [{"name": "calculator", "description": "Evaluates arithmetic", "input_schema": {"type": "object", '
    '"properties": {"expression": {"type": "string"}}}}], "tool_choice": {"type": "auto"}}',
    '{"output": {"answer": "Two orders are late.", "sources": ["orders.csv"]}, "parser": "PydanticOutputParser"}',
    '{"question": "Which plan includes SSO?", "context": ["Enterprise plan: SSO, audit log", "Team plan: 10 '
    'seats"], "tool_calls": []}',
    '<tool_result tool_use_id="toolu_01">{"rows": 3, "status": "ok"}</tool_result>',
    '{"role": "tool", "name": "lookup_customer", "content": "{\\"id\\": 77, \\"tier\\": \\"gold\\"}"}',
    '{"query": "refund policy", "documents": [{"page_content": "Refunds are issued within 14 days.", "metadata": '
    '{"source": "faq.md"}}]}',
    'The output should be formatted as a JSON instance that conforms to the JSON schema below. Here is the output '
    'schema: {"properties": {"answer": {"title": "Answer", "type": "string"}}, "required": ["answer"]}',
    'Answer the following questions as best you can. You have access to the following tools: search, calculator. '
    'Use the following format: Question, Thought, Action, Action Input, Observation, Final Answer.',
    '{"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "HumanMessage"], "kwargs": '
    '{"content": "How many tickets are open?", "type": "human"}}',
    '{"steps": [{"tool": "sql_db_query", "tool_input": "SELECT COUNT(*) FROM tickets WHERE open", "log": '
    '"Invoking sql_db_query"}], "return_values": {"output": "12"}}',
]


def _fold(family: str) -> int:
    return int(hashlib.sha256(family.encode()).hexdigest()[:8], 16) % FOLDS


def fit(x: np.ndarray, y: np.ndarray, lam: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2 logistic regression, classes weighted to equal total weight; (coef, intercept) on standardised x."""
    n, d = x.shape
    weights = np.where(y == 1, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1)) * n
    design = np.hstack([x, np.ones((n, 1))])
    beta = np.zeros(d + 1)
    penalty = np.full(d + 1, lam)
    penalty[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        grad = design.T @ (weights * (p - y)) + penalty * beta
        hess = (design * (weights * p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:-1], float(beta[-1])


def fit_raw(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """fit() on standardised features, folded back to coefficients over the raw vectors."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    coef, intercept = fit((x - mean) / std, y, lam)
    return coef / std, intercept - float((coef * mean / std).sum())


def predict(x: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ coef + intercept)))


def threshold_for(scores: np.ndarray, clean: np.ndarray, max_fp: float) -> float:
    """The lowest threshold (score >= t is flagged) with at most max_fp of the clean scores flagged."""
    ordered = np.sort(scores[clean])[::-1]
    allowed = int(np.floor(max_fp * len(ordered)))
    # Flag strictly above the (allowed+1)-th highest clean score.
    return float(np.nextafter(ordered[allowed], 1.0)) if allowed < len(ordered) else 0.5


def metrics(flagged: np.ndarray, y: np.ndarray, clean: np.ndarray) -> dict:
    tp = int((flagged & (y == 1)).sum())
    fp = int((flagged & (y == 0)).sum())
    positives = int((y == 1).sum())
    return {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(positives, 1), 4),
            "fp_clean": round(float(flagged[clean].mean()) if clean.any() else 0.0, 4),
            "fp_negatives": round(fp / max(int((y == 0).sum()), 1), 4), "injections": positives,
            "negatives": int((y == 0).sum()), "clean": int(clean.sum())}


class Command(BaseCommand):
    help = "Train the tier-2 prompt-injection classifier on the corpus's train split and write its weights."

    def add_arguments(self, parser):
        parser.add_argument("--corpus", default=str(ROOT / "tests" / "security" / "corpus" / "corpus.jsonl"))
        parser.add_argument("--out", default=None, help="weights file (default: the shipped one)")
        parser.add_argument("--max-fp", type=float, default=0.005,
                            help="largest share of clean train prompts flagged out of fold (default 0.005)")
        parser.add_argument("--max-windows", type=int, default=None,
                            help="windows of a long prompt at evaluation (default: INJECTION_TIER2_MAX_WINDOWS)")

    def handle(self, *args, corpus: str, out: str | None, max_fp: float, max_windows: int | None, **options):
        from instrumentation_sdk.scanning import default_scanner

        from ingest.services.embeddings import MODEL_NAME, embed_texts, load_model
        from ingest.services.injection_classifier import WEIGHTS_PATH, views

        path = Path(corpus)
        if not path.exists():
            raise CommandError(f"no corpus at {path}")
        raw = path.read_bytes()
        items = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        train = [i for i in items if i.get("split") == "train"]
        heldout = [i for i in items if i.get("split") == "heldout"]
        if not train:
            raise CommandError("the corpus has no train split")
        texts = [i["text"] for i in train] + EXEMPLARS
        y = np.array([i["kind"] == "injection" for i in train] + [False] * len(EXEMPLARS), dtype=np.float64)
        clean = np.array([i["kind"] == "clean" for i in train] + [True] * len(EXEMPLARS))
        families = [i.get("family") or i["id"] for i in train] + [f"exemplar-{n}" for n in range(len(EXEMPLARS))]
        folds = np.array([_fold(f) for f in families])

        started = time.monotonic()
        model = load_model()
        # Each text is trained on by its first view (its start, what its stored embedding holds) and
        # scored, as the worker scores it, by the highest of its views (windows, folded, decoded).
        cut = [views(t, max_windows=max_windows) for t in texts]
        distinct = sorted({v for pieces in cut for v in pieces})
        vectors = dict(zip(distinct, np.asarray(embed_texts(distinct), dtype=np.float64)))
        # Positives by their start only (a chunk of an attack can be harmless); negatives by every view
        # (every part of a clean prompt is clean), which keeps clean documents' chunks under the threshold.
        rows = [(i, v) for i, pieces in enumerate(cut) for v in (pieces[:1] if y[i] else dict.fromkeys(pieces))]
        owner = np.array([i for i, _ in rows])
        x = np.stack([vectors[v] for _, v in rows])
        labels = y[owner]
        self.stdout.write(f"embedded {len(texts)} train texts ({len(train)} corpus + {len(EXEMPLARS)} exemplars, "
                          f"{len(distinct)} views) with {MODEL_NAME} {model.backend} {model.dtype} "
                          f"in {time.monotonic() - started:.1f}s")

        def score(indices, coef, intercept) -> np.ndarray:
            return np.array([predict(np.stack([vectors[v] for v in cut[i]]), coef, intercept).max() for i in indices])

        best = None
        for lam in LAMBDAS:
            oof = np.zeros(len(y))
            for k in range(FOLDS):
                test = folds == k
                fit_rows = ~test[owner]
                coef, intercept = fit_raw(x[fit_rows], labels[fit_rows], lam)
                oof[test] = score(np.flatnonzero(test), coef, intercept)
            threshold = threshold_for(oof, clean, max_fp)
            cv = metrics(oof >= threshold, y, clean)
            self.stdout.write(f"  cv lambda={lam:<5} threshold={threshold:.4f} precision={cv['precision']:.3f} "
                              f"recall={cv['recall']:.3f} fp_clean={cv['fp_clean']:.3f}")
            if best is None or cv["recall"] > best[2]["recall"]:
                best = (lam, threshold, cv)
        lam, threshold, cv = best
        coef, intercept = fit_raw(x, labels, lam)
        train_metrics = metrics(score(range(len(y)), coef, intercept) >= threshold, y, clean)
        self.stdout.write(f"chosen lambda={lam} threshold={threshold:.4f} (out-of-fold fp_clean <= {max_fp})")
        self.stdout.write(f"train (in-sample): {train_metrics}")

        weights = {
            "format": 1,
            "model": "logistic_regression",
            "embedder": MODEL_NAME,
            "embedder_backend": f"{model.backend}-{model.dtype}",
            "dimensions": len(coef),
            "threshold": round(threshold, 6),
            "lambda": lam,
            "max_fp": max_fp,
            "views": "start, sentence chunks, folded, decoded segments; positives trained on the start only",
            "corpus": {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                       "sha256": hashlib.sha256(raw).hexdigest(), "train_items": len(train),
                       "exemplars": len(EXEMPLARS)},
            "cv": cv,
            "train_metrics": train_metrics,
            "intercept": round(intercept, 7),
            "coef": [float(f"{c:.7g}") for c in coef],
        }
        weights["version"] = "lr-" + hashlib.sha256(json.dumps(
            [weights["coef"], weights["intercept"], weights["threshold"]]).encode()).hexdigest()[:12]
        if heldout:
            weights["heldout_metrics"] = self._heldout(heldout, weights, max_windows, default_scanner())
        target = Path(out) if out else WEIGHTS_PATH
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(weights, indent=1) + "\n", encoding="utf-8")
        self.stdout.write(f"wrote {target} ({weights['version']})")

    def _heldout(self, heldout: list[dict], weights: dict, max_windows: int | None, scanner) -> dict:
        """Scores of the held-out split (never trained on): tier 2 alone, tier 1 alone, tier 1 or 2."""
        from ingest.services.injection_classifier import InjectionClassifier

        clf = InjectionClassifier(coef=np.asarray(weights["coef"]), intercept=weights["intercept"],
                                  threshold=weights["threshold"], version=weights["version"],
                                  embedder=weights["embedder"], metadata={})
        started = time.monotonic()
        tier2 = np.array(clf.predict_texts([i["text"] for i in heldout], max_windows=max_windows)) >= clf.threshold
        seconds = time.monotonic() - started
        tier1 = np.array([scanner.scan(i["text"]).injection_attempt for i in heldout])
        y = np.array([i["kind"] == "injection" for i in heldout], dtype=np.float64)
        clean = np.array([i["kind"] == "clean" for i in heldout])
        result = {"tier2": metrics(tier2, y, clean), "tier1": metrics(tier1, y, clean),
                  "tier1_or_tier2": metrics(tier1 | tier2, y, clean)}
        self.stdout.write(f"heldout ({len(heldout)} items, tier 2 in {seconds:.1f}s):")
        for name, m in result.items():
            self.stdout.write(f"  {name:<15} precision={m['precision']:.3f} recall={m['recall']:.3f} "
                              f"fp_clean={m['fp_clean']:.3f} fp_negatives={m['fp_negatives']:.3f}")
        by_cls: dict[str, list[int]] = {}
        for item, t1, t2 in zip(heldout, tier1, tier2):
            counts = by_cls.setdefault(f"{item['kind']}/{item.get('cls', '')}", [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += bool(t1)
            counts[2] += bool(t2)
            counts[3] += bool(t1 or t2)
        self.stdout.write("  flagged by class (n: tier1 tier2 tier1|2):")
        for name, (n, a, b, c) in sorted(by_cls.items()):
            self.stdout.write(f"    {name:<40} {n:>4}: {a:>4} {b:>4} {c:>4}")
        result["by_class"] = {name: dict(zip(("n", "tier1", "tier2", "tier1_or_tier2"), v))
                              for name, v in sorted(by_cls.items())}
        return result
