"""Compare what the appliance stored for each library's calls with the library's table of expected values.

`libs/<lib>/expected.yaml` (data, not code):

    library: what is tested, with versions
    calls:                      # in the order the script makes them; each call is one trace (or `traces: N`)
      plain:
        - span: llm             # a label, used by `parent` / `duplicate_of` and in the report
          select: {depth: 0, index: 0}   # where in the call's span tree (depth 0 = root; index among that
                                         # depth's spans by start time; `depth: any` any depth;
                                         # `name:` keeps only spans of that name;
                                         # `counted: true` only spans that are no duplicate, false only those
                                         # that are: a call seen by two instrumentations has one span that
                                         # counts, whichever the appliance chose)
          want: {field: expectation, ...}

A call is the traces that belong together: those sharing a response id or linked by `duplicate_of`, or
overlapping in time (two instrumentations that each start a trace for the same call, e.g. OpenLLMetry beside
the anthropic SDK's own tracing; the scripts make their calls one after another). A call with more than one
trace says so as a mapping `{traces: N, each: [span, ...]}`; every other call must be exactly one trace.

An expectation is a value (equal), null (must be absent), or a mapping of checks that must all hold:
`contains: text`, `once: text` (occurs exactly once), `not_contains: text`, `present: true`, `gt: n`,
`between: [a, b]`, `less_than_field: other_field`, `at_most_field: other_field`, `cost: model` (the span's own tokens priced with
config/model_prices.yaml, as the appliance does: one ROUND_HALF_UP at the end; `cost: {model: m, prompt_tokens: n,
completion_tokens: n, cached_tokens: n}` prices those tokens instead), `in: [a, b]`.
`parent` and `duplicate_of` name another span's label (or null). A call can say `spans: N` for the
number of spans its trace must have (default: as many as listed). A span may list `gaps: {field: why}`:
data the library itself does not send (or sends wrong), which the appliance cannot make up; a failed
check there shows as `gap`, listed but not failing.

Each checked field belongs to one matrix column (COLUMNS); a cell is ok, WRONG(got vs want) or n/a.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
LIBS = Path(__file__).resolve().parent / "libs"

# matrix column -> span fields it covers
COLUMNS: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "spans": ("spans",),
    "service": ("service_name",),
    "name": ("name",),
    "kind": ("kind",),
    "model": ("model",),
    "provider": ("provider",),
    "prompt": ("prompt",),
    "response": ("response",),
    "tokens": ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"),
    "token_method": ("token_count_method",),
    "latency": ("latency_ms_total",),
    "ttft": ("latency_ms_ttft",),
    "status": ("status", "finish_reason"),
    "error_type": ("error_type",),
    "cost": ("cost_usd_micro", "cost_status"),
    "parent": ("parent",),
    "duplicate_of": ("duplicate_of",),
    "response_id": ("response_id",),
}
FIELD_COLUMN = {f: col for col, fields in COLUMNS.items() for f in fields}


def matrix_libraries() -> list[str]:
    return sorted(p.name for p in LIBS.iterdir() if (p / "expected.yaml").is_file())


def load_expected(lib: str) -> dict:
    return yaml.safe_load((LIBS / lib / "expected.yaml").read_text())


# --- prices ---------------------------------------------------------------------------
_PRICES: list[dict] | None = None


def _price_rows() -> list[dict]:
    global _PRICES
    if _PRICES is None:
        data = yaml.safe_load((ROOT / "config" / "model_prices.yaml").read_text())
        _PRICES = data if isinstance(data, list) else data.get("prices") or data.get("models") or []
    return _PRICES


def expected_cost(price_model: str, span: dict) -> int | None:
    row = next((r for r in _price_rows() if r.get("model") == price_model), None)
    if row is None or (span.get("prompt_tokens") is None and span.get("completion_tokens") is None):
        return None
    prompt = span.get("prompt_tokens") or 0
    cached = min(span.get("cached_tokens") or 0, prompt)
    inp = Decimal(str(row["input_price_per_1m"]))
    cached_price = Decimal(str(row.get("cached_input_price_per_1m") or row["input_price_per_1m"]))
    total = (prompt - cached) * inp + cached * cached_price \
        + (span.get("completion_tokens") or 0) * Decimal(str(row["output_price_per_1m"]))
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- checks ---------------------------------------------------------------------------
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check(field_name: str, got: Any, want: Any, span: dict, service: str = "") -> str | None:
    """None when `got` meets `want`, else why not."""
    if want == "$SERVICE":
        want = service
    if want is None:
        return None if got is None else f"got {_short(got)}, want absent"
    if not isinstance(want, dict):
        return None if got == want else f"got {_short(got)}, want {_short(want)}"
    problems = []
    for op, arg in want.items():
        if op == "present":
            ok = (got is not None) == bool(arg)
        elif op == "contains":
            ok = isinstance(got, str) and arg in got
        elif op == "not_contains":
            ok = not (isinstance(got, str) and arg in got)
        elif op == "once":
            ok = isinstance(got, str) and got.count(arg) == 1
            if not ok and isinstance(got, str):
                problems.append(f"{_short(arg, 30)} occurs {got.count(arg)}x")
                continue
        elif op == "gt":
            ok = isinstance(got, (int, float)) and got > arg
        elif op == "between":
            ok = isinstance(got, (int, float)) and arg[0] <= got <= arg[1]
        elif op in ("less_than_field", "at_most_field"):
            other = span.get(arg)
            ok = isinstance(got, (int, float)) and isinstance(other, (int, float)) \
                and (got < other if op == "less_than_field" else got <= other)
        elif op == "in":
            ok = got in arg
        elif op == "cost":
            # {cost: model}: the span's own tokens priced; {cost: {model: m, prompt_tokens: n, ...}}: those tokens
            want_cost = expected_cost(arg, span) if isinstance(arg, str) else expected_cost(arg["model"], arg)
            ok = want_cost is not None and got == want_cost
            if not ok:
                priced = f"{arg} x the span's tokens" if isinstance(arg, str) else \
                    f"{arg['model']} x " + ", ".join(f"{k} {v}" for k, v in arg.items() if k != "model")
                problems.append(f"got {_short(got)}, want {want_cost} ({priced})")
                continue
        else:
            raise ValueError(f"unknown check {op!r} for {field_name}")
        if not ok:
            problems.append(f"got {_short(got)}, want {op} {_short(arg)}")
    return "; ".join(problems) or None


# --- one library ----------------------------------------------------------------------
@dataclass
class Result:
    lib: str
    title: str
    cells: dict[str, list[str]] = field(default_factory=dict)  # column -> problems ([] = ok)
    gaps: dict[str, list[str]] = field(default_factory=dict)  # column -> the library's own gaps

    def record(self, column: str, problem: str | None, where: str, gap: str | None = None) -> None:
        bucket = self.cells.setdefault(column, [])
        if problem and gap:
            self.gaps.setdefault(column, []).append(f"{where}: {problem} [library: {gap}]")
        elif problem:
            bucket.append(f"{where}: {problem}")

    def cell(self, column: str) -> str:
        if column not in self.cells:
            return "n/a"
        problems = self.cells[column]
        if problems:
            return f"WRONG({len(problems)})"
        return "gap" if self.gaps.get(column) else "ok"

    @property
    def wrong(self) -> list[str]:
        return [f"{self.lib} / {c}: {p}" for c, ps in self.cells.items() for p in ps]


def _tree(spans: list[dict]) -> dict[str, int]:
    by_id = {s["span_id"]: s for s in spans}
    depth: dict[str, int] = {}

    def d(span: dict, seen: int = 0) -> int:
        if span["span_id"] in depth:
            return depth[span["span_id"]]
        parent = by_id.get(span.get("parent_span_id") or "")
        value = 0 if parent is None or seen > 50 else d(parent, seen + 1) + 1
        depth[span["span_id"]] = value
        return value

    for span in spans:
        d(span)
    return depth


def traces_in_order(spans: list[dict]) -> list[list[dict]]:
    """The spans grouped by trace, traces in the order their first span started."""
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    groups = [sorted(group, key=lambda s: (s["timestamp_utc"], s["span_id"])) for group in by_trace.values()]
    return sorted(groups, key=lambda g: g[0]["timestamp_utc"])


def _interval(trace: list[dict]) -> tuple[datetime, datetime]:
    starts = [datetime.fromisoformat(str(s["timestamp_utc"]).replace("Z", "+00:00")) for s in trace]
    ends = [start + timedelta(milliseconds=s.get("latency_ms_total") or 0) for start, s in zip(starts, trace)]
    return min(starts), max(ends)


def calls_in_order(spans: list[dict]) -> list[list[list[dict]]]:
    """The traces grouped by call (see the module doc), calls in the order their first span started."""
    traces = traces_in_order(spans)
    group = list(range(len(traces)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    def join(i: int, j: int) -> None:
        group[find(i)] = find(j)

    trace_of_span = {s["span_id"]: i for i, trace in enumerate(traces) for s in trace}
    trace_of_response: dict[str, int] = {}
    for i, trace in enumerate(traces):
        for s in trace:
            if s.get("duplicate_of") in trace_of_span:
                join(i, trace_of_span[s["duplicate_of"]])
            if s.get("response_id"):
                join(i, trace_of_response.setdefault(s["response_id"], i))
    intervals = [_interval(trace) for trace in traces]
    for i in range(len(traces)):
        for j in range(i + 1, len(traces)):
            if intervals[i][0] < intervals[j][1] and intervals[j][0] < intervals[i][1]:
                join(i, j)
    calls: dict[int, list[list[dict]]] = {}
    for i, trace in enumerate(traces):
        calls.setdefault(find(i), []).append(trace)
    return sorted(calls.values(), key=lambda c: c[0][0]["timestamp_utc"])


def evaluate(lib: str, expected: dict, spans: list[dict], run: dict, service: str = "") -> Result:
    result = Result(lib, expected.get("library", lib))
    result.record("run", run.get("problem"), "script")
    calls: dict[str, list[dict]] = expected["calls"]
    grouped = calls_in_order(spans)
    if len(grouped) != len(calls):
        result.record("spans", f"{len(grouped)} calls stored ({len(traces_in_order(spans))} traces), want "
                      f"{len(calls)}: {', '.join(calls)}", "all calls")
    for (call, wanted), traces in zip(calls.items(), grouped):
        n_want = wanted.get("spans") if isinstance(wanted, dict) else None
        span_specs = wanted["each"] if isinstance(wanted, dict) else wanted
        n_want = n_want or len(span_specs)
        traces_want = (wanted.get("traces") if isinstance(wanted, dict) else None) or 1
        trace = sorted((s for t in traces for s in t), key=lambda s: (s["timestamp_utc"], s["span_id"]))
        result.record("spans", None if len(traces) == traces_want else
                      f"{len(traces)} traces ({'; '.join(', '.join(str(s.get('name')) for s in t) for t in traces)})"
                      f", want {traces_want}", call)
        result.record("spans", None if len(trace) == n_want else
                      f"{len(trace)} spans ({', '.join(str(s.get('name')) for s in trace)}), want {n_want}", call)
        depth = _tree(trace)
        labelled: dict[str, dict] = {}
        for spec in span_specs:
            select = spec.get("select", {})
            at_depth = [s for s in trace if select.get("depth", 0) in (depth[s["span_id"]], "any")
                        and select.get("name", s.get("name")) == s.get("name")
                        and select.get("counted", s.get("duplicate_of") is None) == (s.get("duplicate_of") is None)]
            index = select.get("index", 0)
            if index >= len(at_depth):
                named = f" named {select['name']!r}" if "name" in select else ""
                if "counted" in select:
                    named += " that counts the call" if select["counted"] else " that is a duplicate"
                result.record("spans", f"no span {spec['span']!r}{named} at depth {select.get('depth', 0)} "
                              f"index {index}", call)
                continue
            labelled[spec["span"]] = at_depth[index]
        labels_of: dict[str, list[str]] = {}  # one span may have two labels (by name, and by counted)
        for label, s in labelled.items():
            labels_of.setdefault(s["span_id"], []).append(label)
        for spec in span_specs:
            span = labelled.get(spec["span"])
            where = f"{call}/{spec['span']}"
            for field_name, want in (spec.get("want") or {}).items():
                column = FIELD_COLUMN[field_name]
                if span is None:
                    result.record(column, "span missing", where)
                    continue
                if field_name in ("parent", "duplicate_of"):
                    ref = span.get("parent_span_id" if field_name == "parent" else "duplicate_of")
                    got = None if ref is None else "/".join(labels_of.get(ref, [f"<{ref}>"]))
                    ok = ref is None if want is None else ref == (labelled.get(want) or {}).get("span_id")
                    problem = None if ok else f"got {got}, want {want}"
                else:
                    problem = check(field_name, span.get(field_name), want, span, service)
                if problem:
                    problem = f"{field_name} {problem}"
                result.record(column, problem, where, (spec.get("gaps") or {}).get(field_name))
    return result


def render(results: list[Result], timings: dict[str, float] | None = None) -> str:
    columns = list(COLUMNS)
    lines = ["| library | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        lines.append(f"| {r.lib} | " + " | ".join(r.cell(c) for c in columns) + " |")
    lines.append("")
    lines.append("Libraries:")
    for r in results:
        lines.append(f"- {r.lib}: {r.title}")
    wrong = [(r.lib, c, p) for r in results for c in columns for p in r.cells.get(c, [])]
    if wrong:
        lines += ["", f"WRONG cells ({len(wrong)} checks):", ""]
        lines += [f"- {lib} / {col}: {problem}" for lib, col, problem in wrong]
    gaps = [(r.lib, c, p) for r in results for c in columns for p in r.gaps.get(c, [])]
    if gaps:
        lines += ["", f"Gaps of the libraries themselves ({len(gaps)}; not failures of the appliance):", ""]
        lines += [f"- {lib} / {col}: {problem}" for lib, col, problem in gaps]
    if timings:
        lines += ["", "Timings:", ""] + [f"- {k}: {v:.1f} s" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
