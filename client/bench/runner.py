"""One load test from start to end (`run`), and the `embedrpc bench` command around it
(`run_bench`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .engine import connect, run_share, server_info, shares
from .histogram import Histogram
from .noop import serve_noop
from .options import BenchConfig, BenchError, config_from_namespace
from .plot import write_plot
from .processes import run_processes
from .progress import Progress
from .report import build_report, format_report
from .workload import make_workload


def run_bench(ns: argparse.Namespace) -> int:
    """`embedrpc bench`: 0 when some request succeeded, 1 when none did or the run
    failed, 2 for invalid options."""
    if ns.noop_server is not None:
        return serve_noop(ns.noop_server, dimensions=ns.noop_dimensions)
    try:
        config = config_from_namespace(ns)
        if config.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'embedrpc[bench]'")
    except ValueError as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(config)
    except (BenchError, ValueError) as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nembedrpc bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(result.report))
    return 0 if result.report["requests"] > 0 else 1


@dataclass
class BenchResult:
    report: dict[str, Any]
    latency: Histogram  # measured successes, seconds


def run(config: BenchConfig, *, progress_stream: TextIO | None = None) -> BenchResult:
    """Run one load test; writes --json and --plot files when configured."""
    if config.plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'embedrpc[bench]'") from None
    workload = make_workload(config)
    server = asyncio.run(_probe(config))
    progress = (Progress(config, config.processes, progress_stream or sys.stderr)
                if config.progress else None)
    try:
        if config.processes == 1:
            merged = asyncio.run(run_share(
                config, shares(config)[0], workload, lambda: time.monotonic() + 0.05,
                None if progress is None else (lambda s: progress.add(0, s))))
        else:
            merged = run_processes(config, workload, progress)
    finally:
        if progress is not None:
            progress.finish()
    report = build_report(config, merged, server=server, workload=workload.source)
    result = BenchResult(report, merged.latency)
    if config.json_path:
        Path(config.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if config.plot_path:
        write_plot(config.plot_path, report, merged.latency)
    return result


async def _probe(config: BenchConfig) -> dict[str, Any] | None:
    channel = await connect(config)
    try:
        return await server_info(channel, config)
    finally:
        await channel.close()
