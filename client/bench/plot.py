"""`--plot`: a PNG of a run's latency over time and its percentile distribution
(matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .histogram import Histogram
from .report import fmt_ms


def write_plot(path: str | Path, report: dict[str, Any], latency: Histogram) -> None:
    """PNG: per-second p50/p99/max latency and throughput; the percentile distribution."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    over_time, spectrum = fig.subplots(1, 2)
    timeline = report["timeline"]
    seconds = [row["second"] + 1 for row in timeline]
    for key, style in (("p50_ms", "-"), ("p99_ms", "--"), ("max_ms", ":")):
        values = [np.nan if row[key] is None else row[key] for row in timeline]
        over_time.plot(seconds, values, style, marker=".", label=key[:-3])
    over_time.set_ylim(bottom=0)
    over_time.set_xlabel("second of measurement")
    over_time.set_ylabel("latency, ms")
    over_time.set_title("Latency over time (per second)")
    rate_axis = over_time.twinx()
    rate_axis.bar(seconds, [row["requests"] for row in timeline], color="0.85", zorder=0,
                  label="requests/s")
    rate_axis.set_ylabel("requests completed per second")
    over_time.set_zorder(rate_axis.get_zorder() + 1)
    over_time.patch.set_visible(False)
    over_time.legend(loc="lower center", ncols=3, framealpha=0.9)

    # HdrHistogram-style percentile spectrum: x = 1 / (1 - quantile), log scale.
    if latency.count:
        xs, ys, seen = [1.0], [latency.min * 1000], 0
        for value, n in latency.buckets():
            seen += n
            q = min(seen / latency.count, 1 - 1 / (10 * latency.count))
            xs.append(1 / (1 - q))
            ys.append(value * 1000)
        spectrum.step(xs, ys, where="pre")
        spectrum.set_xscale("log")
        ticks = [t for t in (2, 10, 100, 1000, 10000, 100000) if t <= xs[-1] * 1.01]
        spectrum.set_xticks(ticks, [f"{100 * (1 - 1 / t):g}%" for t in ticks])
    spectrum.set_xlabel("percentile")
    spectrum.set_ylabel("latency, ms")
    lat = report["latency_ms"]
    spectrum.set_title(f"Latency distribution (p50 {fmt_ms(lat['p50'])} ms, "
                       f"p99 {fmt_ms(lat['p99'])} ms, n={report['requests']:,d})")
    spectrum.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100)
