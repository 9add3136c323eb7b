"""Latency histograms kept as plain counts and turned into Prometheus samples when scraped.

``prometheus_client.Histogram`` takes a lock for the sum and another for the bucket on every
observation, and ``labels()`` looks its child up under a third; with two statements per
request that was 4 % of a point read's CPU under py-spy. Here an observation is a bisect and
three additions on plain attributes, and the cumulative buckets are built in
:meth:`LatencyHistogram.collect`, once per scrape.

No lock: Bastion observes on the event loop's thread (SQLAlchemy dispatches its statement
events there, in the greenlet that runs the statement). A statement run at the same instant
from another thread can lose one count; the totals are monitoring figures, not an audit.

The exposition is ``prometheus_client``'s for the same observations except for the
``_created`` gauge (a series' start time), which is left out.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["HistogramSeries", "LatencyHistogram"]

_INFINITY: Final = float("inf")
# How prometheus_client writes a bound in ``le`` ("0.0005", "1.0", "1e+06", "+Inf"); its
# module is untyped.
_bound_label: Final[Callable[[float], str]] = floatToGoString


class HistogramSeries:
    """The observations of one label value: bucket counts, count, sum and the largest."""

    __slots__ = ("_bounds", "buckets", "count", "longest", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        # One more than the bounds: Prometheus's +Inf bucket, for values above the last bound.
        self.buckets = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0
        self.longest = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le="bound").
        self.buckets[bisect_left(self._bounds, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.longest:
            self.longest = seconds


class LatencyHistogram(Collector):
    """A histogram family with one optional label; register it on a ``CollectorRegistry``.

    ``label`` names the label (``None``: a single unlabelled series, :meth:`series` of
    ``""``). ``bounds`` are the buckets' finite upper bounds, in seconds, ascending; the
    ``+Inf`` bucket is always there.

    Raises:
        ValueError: ``bounds`` are empty, not finite or not strictly ascending.
    """

    def __init__(
        self, name: str, documentation: str, *, label: str | None, bounds: Sequence[float]
    ) -> None:
        if not bounds or not all(math.isfinite(bound) for bound in bounds):
            raise ValueError(f"{name}: bucket bounds must be finite numbers (+Inf is implied)")
        if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"{name}: bucket bounds must be strictly ascending")
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(float(bound) for bound in bounds)
        self._series: dict[str, HistogramSeries] = {}

    def series(self, value: str = "") -> HistogramSeries:
        """The series of label ``value``, created empty on first use (never raises)."""
        found = self._series.get(value)
        if found is None:
            found = self._series[value] = HistogramSeries(self.bounds)
        return found

    def items(self) -> list[tuple[str, HistogramSeries]]:
        """Every series, with its label value."""
        return list(self._series.items())

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, value: object) -> bool:
        return value in self._series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            self.name, self.documentation, labels=[self.label] if self.label else None
        )
        for value, series in self.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.bounds, _INFINITY), series.buckets, strict=True):
                cumulative += count
                buckets.append((_bound_label(bound), cumulative))
            family.add_metric([value] if self.label else [], buckets, series.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(
            self.name, self.documentation, labels=[self.label] if self.label else None
        )
