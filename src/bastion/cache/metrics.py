"""Prometheus counters of the cache: hits, misses, Redis errors, reads served around Redis.

Registered on the registry given (pass ``database.metrics.registry`` and ``GET /metrics``
shows them next to the query metrics), or on a registry of their own. The plain counts are
also kept as integers, for health details and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bastion.breaker import BreakerState

__all__ = ["CacheMetrics"]


class CacheMetrics:
    """Counts of one cache's outcomes."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        breaker_state: Callable[[], BreakerState] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._hits = Counter(
            "bastion_cache_hits", "Reads served from Redis.", registry=self.registry
        )
        self._misses = Counter(
            "bastion_cache_misses", "Reads not in Redis, loaded from the source.",
            registry=self.registry,
        )  # fmt: skip
        self._errors = Counter(
            "bastion_cache_errors", "Redis commands that failed, by operation.", ["operation"],
            registry=self.registry,
        )  # fmt: skip
        self._bypassed = Counter(
            "bastion_cache_bypassed",
            "Reads served from the source because Redis failed or the cache circuit was open.",
            registry=self.registry,
        )
        self._stale = Counter(
            "bastion_cache_stale_loads",
            "Loads not stored because the key was invalidated while they ran.",
            registry=self.registry,
        )
        if breaker_state is not None:
            self.registry.register(_BreakerCollector(breaker_state))
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.bypassed = 0
        self.stale_loads = 0

    def hit(self) -> None:
        self.hits += 1
        self._hits.inc()

    def miss(self) -> None:
        self.misses += 1
        self._misses.inc()

    def error(self, operation: str) -> None:
        self.errors += 1
        self._errors.labels(operation).inc()

    def bypass(self) -> None:
        self.bypassed += 1
        self._bypassed.inc()

    def stale_load(self) -> None:
        self.stale_loads += 1
        self._stale.inc()

    def to_dict(self) -> dict[str, int]:
        """The counts since start, JSON-ready."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "errors": self.errors,
            "bypassed": self.bypassed,
            "stale_loads": self.stale_loads,
        }


class _BreakerCollector(Collector):
    def __init__(self, state: Callable[[], BreakerState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(
            "bastion_cache_breaker_state", "Cache circuit state (1 for the current one).",
            labels=["state"],
        )  # fmt: skip
        current = self._state()
        for state in BreakerState:
            gauge.add_metric([state.value], 1.0 if state is current else 0.0)
        yield gauge
