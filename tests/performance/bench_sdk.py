"""SDK overhead benchmark: @llm_observe and llm_span next to an OpenTelemetry SDK span.

    .venv/bin/python tests/performance/bench_sdk.py [--calls 40000] [--rounds 5] [--rate 20000] [--seconds 10]

Per-call overhead = latency of the instrumented no-op call minus the bare no-op call
(p50 and p99, microseconds). OpenTelemetry runs in the same process and the same
rounds (interleaved, so a noisy neighbour hits both alike): TracerProvider +
BatchSpanProcessor + InMemorySpanExporter, measured as a decorator and as a
`with` block. Our spans are really delivered: the reporter posts them to a local
stand-in for POST /v1/spans running in another process.

Then report() alone next to OpenTelemetry's span.end() (handing a finished span to
its BatchSpanProcessor), p50/p99: report() with the spill file (the default: the span is
serialised into a memory-mapped file on /dev/shm before report() returns, so a SIGKILL
loses nothing) and without it (`spill=False`: queued in memory only), interleaved round by
round in this process, so the difference is the cost of the spill file. Then memory (RSS)
while reporting a sustained 20,000 spans/s: once with the ingest endpoint up, once with it
down (the SDK writes to its SQLite WAL). Targets: overhead at most half of OpenTelemetry's,
report() p99 under 50 us, RSS flat.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _sink_process(port_queue: mp.Queue, stop: mp.Event) -> None:
    """The appliance's POST /v1/spans contract at its cheapest: read the body, answer 202.

    It does not parse the spans, so the figures show what the SDK itself can ship
    (the real appliance is slower; then the SDK's WAL absorbs the difference).
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"success":true,"accepted":0,"duplicates":0,"rejected":[],"span_warnings":[]}'
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self._headers_buffer.append(b"\r\n" + body)  # one write: no Nagle / delayed-ACK stall
            self.flush_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port_queue.put(server.server_address[1])
    stop.wait()
    server.shutdown()


def start_sink() -> tuple[mp.Process, mp.Event, int]:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_sink_process, args=(ports, stop), daemon=True)
    proc.start()
    return proc, stop, ports.get(timeout=60)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def time_calls(fn, n: int) -> list[float]:
    clock = time.perf_counter_ns
    out = [0.0] * n
    for i in range(n):
        t0 = clock()
        fn()
        out[i] = (clock() - t0) / 1000.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40_000, help="calls per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=20_000, help="reports/s in the memory test")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each memory test")
    args = parser.parse_args()

    sink_proc, sink_stop, port = start_sink()
    tmp = tempfile.mkdtemp(prefix="bench-sdk-")
    os.environ.update(LLM_OBSERVE_URL=f"http://127.0.0.1:{port}", LLM_OBSERVE_API_KEY="bench-key",
                      LLM_OBSERVE_SERVICE="bench", LLM_OBSERVE_WAL_PATH=f"{tmp}/wal.sqlite3")

    import instrumentation_sdk as sdk

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    reporter = sdk.get_reporter()

    def bare():
        return 1

    @sdk.llm_observe(service="bench", endpoint="noop")
    def observed():
        return 1

    @tracer.start_as_current_span("noop")
    def otel_decorated():
        return 1

    def ours_span():
        with sdk.llm_span(model="gpt-4o"):
            pass

    def otel_span():
        with tracer.start_as_current_span("noop"):
            pass

    variants = {"bare": bare, "@llm_observe": observed, "llm_span": ours_span,
                "otel decorator": otel_decorated, "otel with-block": otel_span}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm up
        time_calls(fn, 2000)
    gc.disable()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].extend(time_calls(fn, args.calls))
            exporter.clear()
        gc.collect()
    gc.enable()
    # These loops report far faster than any sender ships: the excess went to the WAL. Let it
    # drain, so each following measurement starts from a steady state.
    started = time.perf_counter()
    reporter.flush(300)
    while reporter._backlog and time.perf_counter() - started < 300:
        time.sleep(0.1)
    took = time.perf_counter() - started

    base50, base99 = pct(samples["bare"], 50), pct(samples["bare"], 99)
    print(f"Per-call overhead, {args.rounds} x {args.calls:,} calls each, bare call p50 {base50:.2f} us "
          f"(overhead = instrumented - bare)")
    print(f"{'variant':<18}{'p50 us':>10}{'p99 us':>10}")
    figures = {}
    for name in variants:
        if name == "bare":
            continue
        p50 = pct(samples[name], 50) - base50
        p99 = pct(samples[name], 99) - base99
        figures[name] = (p50, p99)
        print(f"{name:<18}{p50:>10.2f}{p99:>10.2f}")
    for ours, theirs in (("@llm_observe", "otel decorator"), ("llm_span", "otel with-block")):
        print(f"{ours} / {theirs}: p50 {figures[ours][0] / figures[theirs][0]:.2f}x, "
              f"p99 {figures[ours][1] / figures[theirs][1]:.2f}x")
    print(f"delivered to the ingest stand-in: {reporter.stats['sent']:,} spans, {reporter.stats['wal_replayed']:,} of "
          f"them replayed from the WAL (queue full: the loops report ~200,000/s); backlog empty {took:.1f}s "
          f"after the loops")

    # report() alone, with and without the spill file, next to OpenTelemetry's span end
    span = {"model": "gpt-4o", "provider": "openai", "prompt_tokens": 812, "completion_tokens": 164,
            "latency_ms_total": 1834.2, "status": "success", "prompt": "Summarise the last three invoices"}
    without_spill = sdk.SpanReporter(spill=False)
    paths = {"report(), spill file": reporter, "report(), no spill": without_spill}
    alone: dict[str, list[float]] = {name: [] for name in (*paths, "otel span.end()")}
    clock = time.perf_counter_ns
    per_round = 20_000
    for _ in range(args.rounds):
        for name, target in paths.items():
            out = alone[name]
            for _ in range(per_round):
                t0 = clock()
                target.report(span)
                out.append((clock() - t0) / 1000.0)
            target._drain(time.monotonic() + 60)  # delivered or in the WAL: the next round starts even
        out = alone["otel span.end()"]
        for _ in range(per_round):
            started = tracer.start_span("noop")
            t0 = clock()
            started.end()
            out.append((clock() - t0) / 1000.0)
        exporter.clear()
    print(f"\nHanding over a finished span, {args.rounds} x {per_round:,} calls each (interleaved)")
    print(f"{'path':<24}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    for name, values in alone.items():
        print(f"{name:<24}{pct(values, 50):>10.2f}{pct(values, 99):>10.2f}{max(values):>10.0f}")
    on, off = alone["report(), spill file"], alone["report(), no spill"]
    print(f"cost of the spill file: p50 +{pct(on, 50) - pct(off, 50):.2f} us, p99 +{pct(on, 99) - pct(off, 99):.2f} us "
          f"({reporter._spill.written if reporter._spill else 0:,} spans written to it, "
          f"{reporter.stats['spill_skipped']:,} not)")
    without_spill.close(timeout=5)

    # memory under a sustained rate
    def sustained(label: str) -> None:
        gc.collect()
        start_rss = rss_mb()
        peak_rss, peak_queue, reported = start_rss, 0, 0
        tick = 0.01
        per_tick = int(args.rate * tick)
        sent_before, wal_before = reporter.stats["sent"], reporter.stats["wal_written"]
        t_start = time.perf_counter()
        next_tick = t_start
        samples_rss = []
        while time.perf_counter() - t_start < args.seconds:
            for _ in range(per_tick):
                reporter.report(span)
            reported += per_tick
            peak_queue = max(peak_queue, len(reporter._queue))
            next_tick += tick
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if reported % (per_tick * 50) == 0:
                samples_rss.append(rss_mb())
                peak_rss = max(peak_rss, samples_rss[-1])
        elapsed = time.perf_counter() - t_start
        reporter._drain(time.monotonic() + 60)  # sent or in the WAL (flush() would wait for a down endpoint)
        end_rss = rss_mb()
        quarters = [samples_rss[min(len(samples_rss) - 1, len(samples_rss) * q // 4)] for q in (1, 2, 3, 4)] \
            if samples_rss else []
        print(f"{label}: {reported:,} reports in {elapsed:.1f}s ({reported / elapsed:,.0f}/s); "
              f"RSS start {start_rss:.1f} MB, at each quarter {' / '.join(f'{q:.1f}' for q in quarters)} MB, "
              f"peak {peak_rss:.1f} MB, after flush {end_rss:.1f} MB; "
              f"queue peak {peak_queue:,} (bound {reporter.config.queue_size:,}); "
              f"sent {reporter.stats['sent'] - sent_before:,}, to WAL {reporter.stats['wal_written'] - wal_before:,}")

    sustained(f"sustained {args.rate:,}/s, appliance up")
    sink_stop.set()
    sink_proc.join(10)
    sustained(f"sustained {args.rate:,}/s, appliance down (WAL)")
    reporter.close(timeout=5)
    provider.shutdown()


if __name__ == "__main__":
    main()
