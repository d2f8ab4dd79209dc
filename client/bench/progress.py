"""The live progress line: one per second on stderr, once every process reported that
second."""

from __future__ import annotations

import math
from typing import Any, TextIO

from .histogram import Histogram
from .options import BenchConfig


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.2f}"


class Progress:
    """Prints one line per second on stderr once every process reported that second."""

    def __init__(self, config: BenchConfig, processes: int, stream: TextIO) -> None:
        self.config, self.processes, self.stream = config, processes, stream
        self.ticks: dict[int, list[dict[str, Any]]] = {}
        self.tty = stream.isatty()
        self.last_ok = 0

    def add(self, process: int, snapshot: dict[str, Any]) -> None:
        got = self.ticks.setdefault(snapshot["tick"], [])
        got.append(snapshot)
        if len(got) == self.processes:
            del self.ticks[snapshot["tick"]]
            self._print(got)

    def _print(self, snapshots: list[dict[str, Any]]) -> None:
        interval = Histogram()
        for s in snapshots:
            interval.merge(Histogram.from_dict(s["interval"]))
        ok = sum(s["ok"] for s in snapshots)
        total = self.config.warmup + (self.config.measure_seconds or 0)
        of = f"/{total:.0f}s" if self.config.measure_seconds is not None else "s"
        line = (f"{snapshots[0]['t']:5.1f}{of} {snapshots[0]['phase']:9} "
                f"{ok - self.last_ok:7,d} req/s  "
                f"p50 {_ms(interval.percentile(50))} ms  p99 {_ms(interval.percentile(99))} ms"
                f"  in flight {sum(s['in_flight'] for s in snapshots):4d}  "
                f"errors {sum(s['errors'] for s in snapshots):,d}")
        self.last_ok = ok
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
