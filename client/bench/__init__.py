"""`embedrpc bench`: a load generator for any embedrpc server, and a no-op server to measure it.

Closed loop: `--concurrency N` clients each send a request, wait for its answer,
send the next. Open loop (`--rate R`): requests leave at Poisson arrival times
whatever the server does, at most `--concurrency` in flight (default 1000), and
latency runs from the *intended* send time, so a stalled server shows up in the
percentiles instead of silently slowing the load (no coordinated omission).

Calls are unary Embed with `--batch K` texts each, or requests over
`--streams` long-lived EmbedStream calls (`--stream`). `--processes P` spreads
the clients (and the rate) over P processes. Requests are serialised before
the run starts, so the harness spends its time on gRPC only.

Timeline: all processes start at one instant t0 (time.monotonic, system-wide);
requests sent (or, open loop, due) during [t0, t0 + warmup) are not measured;
then the run measures for `--duration` seconds, or the first `--requests` sends
(with both, whichever ends first).
Sending always stops by t0 + `--time-limit`; answers are awaited at most
`--timeout` longer, and calls still open then are cancelled (counted as CANCELLED).

Figures count successful requests; failed ones are counted by status code under
`errors` (gRPC codes; BAD_RESPONSE for an answer whose vector count differs from
its input count). Rates divide by the time from the start of measurement to the
last measured answer. Latency percentiles come from a Histogram (histogram.py,
three significant digits).

The modules, in the order a run uses them:

    options.py    BenchConfig, the flags that fill it, BenchError
    texts.py      texts: a corpus file, or generated (languages, or a given vocabulary)
    workload.py   the texts serialised into the pool of requests a process sends
    engine.py     the load engine: closed and open loop, unary Embed (connect, drive)
    stream.py     EmbedStream for the engine: many clients over one long-lived stream
    processes.py  --processes: the load spread over processes that start at one instant
    progress.py   the progress line printed each second
    histogram.py  the latency histogram (HdrHistogram's layout)
    report.py     the report: JSON-ready dict and terminal text
    plot.py       --plot: latency over time and its distribution
    runner.py     one load test from start to end; the `embedrpc bench` command
    noop.py       --noop-server: a server that answers at once, to measure the harness

The benchmarks (benchmarks/) drive their gRPC load with `connect` and `drive`, and make
their texts with `TextGenerator`. The names below load on first use, so the command line
can add the bench's flags without loading grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import AnswerFn, WorkerResult, connect, drive, poisson_gaps
    from .histogram import Histogram
    from .noop import NoopEmbedder, serve_noop, start_noop_server
    from .options import BenchConfig, BenchError, add_bench_arguments, config_from_namespace
    from .plot import write_plot
    from .report import build_report, format_report
    from .runner import BenchResult, run, run_bench
    from .texts import LengthSpec, TextGenerator, load_corpus
    from .workload import Pool, Workload, make_workload, pool_from_texts, request_pool

__all__ = [
    "AnswerFn",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Histogram",
    "LengthSpec",
    "NoopEmbedder",
    "Pool",
    "TextGenerator",
    "WorkerResult",
    "Workload",
    "add_bench_arguments",
    "build_report",
    "config_from_namespace",
    "connect",
    "drive",
    "format_report",
    "load_corpus",
    "make_workload",
    "poisson_gaps",
    "pool_from_texts",
    "request_pool",
    "run",
    "run_bench",
    "serve_noop",
    "start_noop_server",
    "write_plot",
]
_WHERE = {
    "AnswerFn": "engine",
    "BenchConfig": "options",
    "BenchError": "options",
    "BenchResult": "runner",
    "Histogram": "histogram",
    "LengthSpec": "texts",
    "NoopEmbedder": "noop",
    "Pool": "workload",
    "TextGenerator": "texts",
    "WorkerResult": "engine",
    "Workload": "workload",
    "add_bench_arguments": "options",
    "build_report": "report",
    "config_from_namespace": "options",
    "connect": "engine",
    "drive": "engine",
    "format_report": "report",
    "load_corpus": "texts",
    "make_workload": "workload",
    "poisson_gaps": "engine",
    "pool_from_texts": "workload",
    "request_pool": "workload",
    "run": "runner",
    "run_bench": "runner",
    "serve_noop": "noop",
    "start_noop_server": "noop",
    "write_plot": "plot",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
