"""The report of a run: a JSON-ready dict (`build_report`) and its text for a terminal
(`format_report`)."""

from __future__ import annotations

import os
import platform
from typing import Any

import grpc

from embedrpc import __version__

from .engine import WorkerResult
from .histogram import Histogram
from .options import BenchConfig

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def _latency_ms(hist: Histogram) -> dict[str, float | None]:
    if not hist.count:
        return {**dict.fromkeys(PERCENTILES), "max": None, "mean": None, "min": None}
    out: dict[str, float | None] = {name: round(hist.percentile(p) * 1000, 4)
                                    for name, p in PERCENTILES.items()}
    out["max"] = round(hist.max * 1000, 4)
    out["mean"] = round(hist.mean * 1000, 4)
    out["min"] = round(hist.min * 1000, 4)
    return out


def build_report(config: BenchConfig, result: WorkerResult, *, elapsed: float | None = None,
                 server: dict[str, Any] | None = None, workload: str = "") -> dict[str, Any]:
    """The report as a JSON-ready dict. `elapsed` (seconds) defaults to the time from the
    start of measurement to the last measured answer."""
    if elapsed is None:
        if result.last_done is not None and result.measure_start is not None:
            elapsed = result.last_done - result.measure_start
        else:
            elapsed = config.measure_seconds or 0.0
    elapsed = max(elapsed, 1e-9)
    # What the answers hold: embeddings, or (--rerank) scored query-document pairs.
    item = "pairs" if config.rerank else "embeddings"
    report: dict[str, Any] = {
        "requests_per_s": round(result.ok / elapsed, 3),
        f"{item}_per_s": round(result.embeddings / elapsed, 3),
        "tokens_per_s": round(result.tokens / elapsed, 3),
        "latency_ms": _latency_ms(result.latency),
        "errors": dict(sorted(result.errors.items())),
        "requests": result.ok,
        "failed": sum(result.errors.values()),
        item: result.embeddings,
        "tokens": result.tokens,
        "sent": result.sent,
        "elapsed_s": round(elapsed, 4),
        "warmup": {"requests": result.warmup_ok, "failed": result.warmup_errors},
        "stopped_at_time_limit": result.stopped_at_limit,
    }
    if config.open_loop:
        report["send_lag_ms"] = _latency_ms(result.send_lag)
    report["timeline"] = [
        {"second": s, "requests": result.timeline[s].count if s in result.timeline else 0,
         "errors": result.timeline_errors.get(s, 0),
         **{f"{k}_ms": v for k, v in _latency_ms(result.timeline.get(s, Histogram())).items()
            if k in ("p50", "p99", "max")}}
        for s in sorted(set(result.timeline) | set(result.timeline_errors))]
    report["config"] = {
        "target": config.target, "mode": "open" if config.open_loop else "closed",
        "call": "EmbedStream" if config.stream else "Rerank" if config.rerank else "Embed",
        "documents": config.documents if config.rerank else None, "model": config.model,
        "concurrency": config.in_flight, "rate": config.rate, "batch": config.batch,
        "streams": config.streams if config.stream else None,
        "processes": config.processes, "duration_s": config.measure_seconds,
        "requests": config.requests, "warmup_s": config.warmup,
        "time_limit_s": config.time_limit, "timeout_s": config.timeout,
        "encoding": config.encoding, "dimensions": config.dimensions,
        "query_fraction": config.query_fraction, "workload": workload, "seed": config.seed,
    }
    report["server"] = server
    report["harness"] = {"embedrpc": __version__, "grpcio": grpc.__version__,
                         "python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "platform": platform.platform(),
                         "histogram_relative_precision": result.latency.relative_precision}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    c = report["config"]
    s = report.get("server") or {}
    if s:
        model = (f" · model {s['model']} (reranker)" if s.get("task") == "rerank"
                 else f" · model {s['model']} ({s['dimensions']} dims)")
    else:
        model = ""
    item = "pairs" if c["call"] == "Rerank" else "embeddings"
    if c["mode"] == "open":
        load = f"open loop {c['rate']:,.0f} req/s (Poisson), ≤{c['concurrency']} in flight"
    else:
        load = f"closed loop, {_n(c['concurrency'], 'client')}"
    if c["call"] == "EmbedStream":
        call = f"EmbedStream ({_n(c['streams'], 'stream')} per process)"
    elif c["call"] == "Rerank":
        call = "unary Rerank"
    else:
        call = "unary Embed"
    per = (f"a query and {_n(c['documents'], 'document')} per request" if c["call"] == "Rerank"
           else f"{_n(c['batch'], 'text')} per request · {c['encoding']}")
    measured = (f"{report['elapsed_s']:.2f} s" if c["requests"] is None
                else f"{c['requests']:,d} requests in {report['elapsed_s']:.2f} s")
    lat = report["latency_ms"]
    lines = [
        f"target {c['target']}{model}",
        f"{load}, {_n(c['processes'], 'process', 'es')} · {call}, {per}",
        f"measured {measured} after {c['warmup_s']:g} s warm-up",
        f"  requests    {report['requests']:>12,d}   {report['requests_per_s']:>12,.1f} /s",
        f"  {item:<10}  {report[item]:>12,d}   {report[item + '_per_s']:>12,.1f} /s",
        f"  tokens      {report['tokens']:>12,d}   {report['tokens_per_s']:>12,.1f} /s",
        "  latency ms  " + "  ".join(
            f"{name} {fmt_ms(lat[key])}" for name, key in
            (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"),
             ("max", "max"), ("mean", "mean"))),
    ]
    if "send_lag_ms" in report:
        lag = report["send_lag_ms"]
        lines.append(f"  send lag ms p99 {fmt_ms(lag['p99'])}  max {fmt_ms(lag['max'])}"
                     f"  (sent {report['sent']:,d})")
    errors = report["errors"]
    lines.append("  errors      " + (", ".join(f"{code} {n:,d}" for code, n in errors.items())
                                     if errors else "none"))
    if report["stopped_at_time_limit"]:
        lines.append("  stopped at the time limit before the run was complete")
    return "\n".join(lines)


def _n(count: int, noun: str, plural: str = "s") -> str:
    return f"{count:,d} {noun}{'' if count == 1 else plural}"


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
