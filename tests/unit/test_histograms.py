"""LatencyHistogram: the same exposition as prometheus_client's Histogram for the same values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bastion._histograms import LatencyHistogram

BOUNDS = (0.0005, 0.001, 0.01, 1.0, 30.0, 2e6)  # 2e6: written "2e+06", as Go writes it
# Values on each bound (le is inclusive), between bounds, below the first and above the last.
VALUES = (0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.5, 1.0, 29.9, 30.0, 31.0, 1e6, 3e6)


def _without_created(text: str) -> list[str]:
    """Exposition lines, less prometheus_client's ``_created`` gauge (a start timestamp, which
    LatencyHistogram leaves out)."""
    return [line for line in text.splitlines() if "_created" not in line]


@pytest.mark.parametrize("label", ["fingerprint", None])
def test_exposition_matches_prometheus_client(label: str | None) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LatencyHistogram("q_seconds", "Latency.", label=label, bounds=BOUNDS)
    ours.register(histogram)
    reference = Histogram(
        "q_seconds", "Latency.", [label] if label else [], buckets=BOUNDS, registry=theirs
    )
    for n, value in enumerate(VALUES):
        name = f"s{n % 3}" if label else ""
        histogram.series(name).observe(value)
        (reference.labels(name) if label else reference).observe(value)

    assert _without_created(generate_latest(ours).decode()) == _without_created(
        generate_latest(theirs).decode()
    )


def test_a_series_keeps_count_total_and_longest() -> None:
    histogram = LatencyHistogram("q_seconds", "Latency.", label="fingerprint", bounds=BOUNDS)
    for value in (0.002, 0.5, 0.001):
        histogram.series("SELECT ?").observe(value)

    [(name, series)] = histogram.items()
    assert (name, series.count, series.longest) == ("SELECT ?", 3, 0.5)
    assert series.total == pytest.approx(0.503)
    assert "SELECT ?" in histogram
    assert len(histogram) == 1


@pytest.mark.parametrize("bounds", [(1.0, 1.0), (1.0, 0.5)])
def test_bounds_must_ascend(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly ascending"):
        LatencyHistogram("q_seconds", "Latency.", label=None, bounds=bounds)


@pytest.mark.parametrize("bounds", [(), (1.0, float("inf")), (float("nan"),)])
def test_bounds_must_be_finite_and_given(bounds: tuple[float, ...]) -> None:
    # A trailing inf would make a second +Inf bucket: the +Inf bucket is always there.
    with pytest.raises(ValueError, match="finite"):
        LatencyHistogram("q_seconds", "Latency.", label=None, bounds=bounds)
