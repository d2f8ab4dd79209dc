"""A log-bucketed latency histogram (the HdrHistogram layout) with exact percentile rules.

Values are recorded in seconds and stored as whole multiples of `unit` (1 µs by
default). Values below 2·H units (H = 2**sub_bucket_bits, 1024 by default) get
one bucket each; above that, every power-of-two range [2**k, 2**(k+1)) is split
into H equal buckets. A bucket is then never wider than 1/H of its lowest value,
and a value is reported as its bucket's midpoint, so

    |reported - recorded| <= max(unit / 2, recorded / (2·H))

(0.5 µs or 1/2048 ≈ 0.05% with the defaults: three significant digits). Memory
grows with the range of values, not their number: a few thousand buckets span
1 µs..1 h.

Percentiles use the nearest-rank rule: the value at percentile p is the
smallest recorded value v such that at least p% of the values are <= v (the
`inverted_cdf` method of numpy.percentile). min, max and mean are exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any


class Histogram:
    """Counts of values in log-linear buckets; mergeable and serialisable."""

    __slots__ = ("_counts", "_half", "_total", "bits", "count", "max", "min", "unit")

    def __init__(self, *, unit: float = 1e-6, sub_bucket_bits: int = 10) -> None:
        if not unit > 0:
            raise ValueError(f"unit must be > 0, got {unit}")
        if not 1 <= sub_bucket_bits <= 20:
            raise ValueError(f"sub_bucket_bits must be 1..20, got {sub_bucket_bits}")
        self.unit = unit
        self.bits = sub_bucket_bits
        self._half = 1 << sub_bucket_bits  # H: buckets per power of two
        self._counts: dict[int, int] = {}
        self._total = 0.0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    @property
    def relative_precision(self) -> float:
        """Largest relative error of a reported value above 2·H units."""
        return 1.0 / (2 * self._half)

    # -- buckets ---------------------------------------------------------------

    def _index(self, units: int) -> int:
        if units < 2 * self._half:
            return units
        shift = units.bit_length() - self.bits - 1  # units >> shift lies in [H, 2H)
        return shift * self._half + (units >> shift)

    def _bucket(self, index: int) -> tuple[int, int]:
        """(lowest value, width) of a bucket, in units."""
        if index < 2 * self._half:
            return index, 1
        shift = index // self._half - 1
        return (index - shift * self._half) << shift, 1 << shift

    def _representative(self, index: int) -> float:
        low, width = self._bucket(index)
        value = (low + (width - 1) / 2) * self.unit
        return min(max(value, self.min), self.max)  # never outside what was recorded

    # -- recording ---------------------------------------------------------------

    def record(self, value: float, count: int = 1) -> None:
        """Add `count` observations of `value` (seconds, >= 0)."""
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"values must be >= 0, got {value}")
        index = self._index(round(value / self.unit))
        self._counts[index] = self._counts.get(index, 0) + count
        self.count += count
        self._total += value * count
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def record_many(self, values: Iterable[float]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts (same unit and sub_bucket_bits)."""
        if (other.unit, other.bits) != (self.unit, self.bits):
            raise ValueError("cannot merge histograms with different unit or sub_bucket_bits")
        for index, n in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + n
        self.count += other.count
        self._total += other._total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    # -- reading -------------------------------------------------------------------

    @property
    def mean(self) -> float:
        return self._total / self.count if self.count else math.nan

    def percentile(self, p: float) -> float:
        """The nearest-rank value at percentile p (0..100); NaN when empty."""
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be in 0..100, got {p}")
        if not self.count:
            return math.nan
        if p == 0:
            return self.min
        if p == 100:
            return self.max
        # round() keeps 99.9% of 10000 at rank 9990 despite 0.999 * 10000 = 9990.000000000002
        rank = max(1, math.ceil(round(p * self.count / 100, 9)))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                return self._representative(index)
        return self.max  # unreachable: the counts add up to self.count

    def percentiles(self, ps: Iterable[float]) -> dict[float, float]:
        return {p: self.percentile(p) for p in ps}

    def buckets(self) -> Iterator[tuple[float, int]]:
        """(representative value in seconds, count) per non-empty bucket, ascending."""
        for index in sorted(self._counts):
            yield self._representative(index), self._counts[index]

    # -- transport (between processes, into JSON) --------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "sub_bucket_bits": self.bits, "count": self.count,
                "total": self._total, "min": self.min if self.count else None,
                "max": self.max if self.count else None,
                "counts": {str(k): v for k, v in sorted(self._counts.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls(unit=data["unit"], sub_bucket_bits=data["sub_bucket_bits"])
        h._counts = {int(k): int(v) for k, v in data["counts"].items()}
        h.count = int(data["count"])
        h._total = float(data["total"])
        if h.count:
            h.min, h.max = float(data["min"]), float(data["max"])
        return h
