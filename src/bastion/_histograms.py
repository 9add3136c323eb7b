"""Latency histograms kept as plain counts and turned into Prometheus samples when scraped.

``prometheus_client.Histogram`` takes a lock for the sum and another for the bucket on every
observation, and ``labels()`` looks its child up under a third; with two statements per
request that was 4 % of a point read's CPU under py-spy. Here an observation is a bisect and
three additions on plain attributes, and the cumulative buckets are built in
:meth:`LatencyHistogram.collect`, once per scrape.

No lock: Bastion observes on the event loop's thread (SQLAlchemy dispatches its statement
events there, in the greenlet that runs the statement). A statement run at the same instant
from another thread can lose one count; the totals are monitoring figures, not an audit.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Final

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["HistogramSeries", "LatencyHistogram"]

_INFINITY: Final = float("inf")


class HistogramSeries:
    """The observations of one label value: bucket counts, count, sum and the largest."""

    __slots__ = ("_bounds", "buckets", "count", "longest", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
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
    ``""``). ``bounds`` are the buckets' upper bounds, in seconds, ascending.

    Raises:
        ValueError: ``bounds`` are empty or not strictly ascending.
    """

    def __init__(
        self, name: str, documentation: str, *, label: str | None, bounds: Sequence[float]
    ) -> None:
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"{name}: bucket bounds must be strictly ascending")
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(float(bound) for bound in bounds)
        self._series: dict[str, HistogramSeries] = {}

    def series(self, value: str = "") -> HistogramSeries:
        """The series of label ``value``, created empty on first use."""
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
                # repr, as prometheus_client writes bounds of this size: le="0.0005", le="1.0".
                buckets.append(("+Inf" if bound == _INFINITY else repr(bound), cumulative))
            family.add_metric([value] if self.label else [], buckets, series.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(
            self.name, self.documentation, labels=[self.label] if self.label else None
        )
