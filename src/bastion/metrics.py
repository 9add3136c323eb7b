"""Query metrics from SQLAlchemy events, the slow-query log, and a Prometheus registry.

Every statement on a Database's engines is timed (``before_cursor_execute`` →
``after_cursor_execute``) and counted under its :func:`~bastion.fingerprint.fingerprint`:
a latency histogram per fingerprint, errors by class, commits and rollbacks, connections
opened; retries, circuit-breaker state and pool gauges are read from the Database when
scraped. A statement slower than ``SLOW_QUERY_THRESHOLD`` is logged (``bastion.slow_query``)
with its fingerprint, duration, route and request id — never its parameters.

Each :class:`QueryMetrics` has its own ``CollectorRegistry`` (``metrics.registry``), so two
Databases in one process (or in one test session) never collide. With several worker
processes each worker counts its own requests; see the README for scraping them.

:class:`MetricsHistory` keeps a snapshot every 10 s for the last hour, for the admin API's
history and summary.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion._histograms import LatencyHistogram
from bastion._sqlite_inline import FALLBACKS
from bastion._translate import translate_error
from bastion.fingerprint import fingerprint
from bastion.request_context import current_request

if TYPE_CHECKING:
    from bastion.database import Database

__all__ = ["FingerprintStats", "MetricsHistory", "MetricsSnapshot", "QueryMetrics"]

slow_query_logger = logging.getLogger("bastion.slow_query")

MAX_FINGERPRINTS: Final = 500
"""Distinct fingerprints tracked; later ones are counted as ``other`` (bounded cardinality)."""
OTHER: Final = "other"
_STARTED: Final = "bastion_query_started"
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_RESERVOIR: Final = 10_000  # latencies kept per history interval, for its percentiles


@dataclass(frozen=True, slots=True)
class FingerprintStats:
    """Totals of one fingerprint since start."""

    fingerprint: str
    count: int
    total_s: float
    max_s: float


class QueryMetrics:
    """Counts and times every statement of ``database``; exposes them to Prometheus."""

    def __init__(self, database: Database) -> None:
        self._database = database
        settings = database.settings
        self.slow_threshold_s = settings.slow_query_threshold_s
        self.registry = CollectorRegistry(auto_describe=True)
        self._latency = LatencyHistogram(
            "bastion_query_duration_seconds",
            "Statement latency, by fingerprint (values stripped).",
            label="fingerprint",
            bounds=_LATENCY_BUCKETS,
        )
        self.registry.register(self._latency)
        self._errors = Counter(
            "bastion_query_errors",
            "Statements that failed, by error code.",
            ["code"],
            registry=self.registry,
        )
        transactions = Counter(
            "bastion_transactions",
            "Transactions ended, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        # Bound once: every write unit ends in one of them (and every read unit that began a
        # transaction in SQLAlchemy, see bastion._lean), and labels() is a locked lookup.
        self._commits = transactions.labels("commit")
        self._rollbacks = transactions.labels("rollback")
        self._slow = Counter(
            "bastion_slow_queries", "Statements slower than SLOW_QUERY_THRESHOLD.",
            registry=self.registry,
        )  # fmt: skip
        self._connections = Counter(
            "bastion_connections_opened", "New database connections.", registry=self.registry
        )
        checkout = LatencyHistogram(
            "bastion_pool_checkout_seconds",
            "Time a connection unit waited for its connection.",
            label=None,
            bounds=_LATENCY_BUCKETS,
        )
        self.registry.register(checkout)
        self._checkout = checkout.series()
        self.registry.register(_DatabaseCollector(database))
        self.queries = 0
        self.errors = 0
        self.database_s = 0.0
        self._recent: deque[float] = deque(maxlen=_RESERVOIR)

    def install(self, engines: tuple[AsyncEngine, ...]) -> None:
        """Listen to the statements, errors, transactions and connections of ``engines``."""
        for engine in engines:
            target = engine.sync_engine
            event.listen(target, "before_cursor_execute", self._before)
            event.listen(target, "after_cursor_execute", self._after)
            event.listen(target, "handle_error", self._on_error)
            event.listen(target, "commit", self._on_commit)
            event.listen(target, "rollback", self._on_rollback)
            event.listen(target.pool, "connect", self._on_connect)

    def observe_checkout(self, seconds: float) -> None:
        """Record how long a unit waited for its connection."""
        self._checkout.observe(seconds)

    def top(self, limit: int = 10) -> list[FingerprintStats]:
        """The fingerprints that took the most database time in total."""
        ranked = sorted(self._latency.items(), key=lambda item: item[1].total, reverse=True)
        return [
            FingerprintStats(name, series.count, round(series.total, 6), round(series.longest, 6))
            for name, series in ranked[:limit]
        ]

    def drain_recent(self) -> list[float]:
        """The latencies recorded since the last call (at most the last 10,000)."""
        recent = list(self._recent)
        self._recent.clear()
        return recent

    # -- events ----------------------------------------------------------------------------

    def _before(self, connection: Connection, *_args: Any) -> None:
        connection.info[_STARTED] = time.perf_counter()

    def _after(self, connection: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        started = connection.info.pop(_STARTED, None)
        if started is None:
            return
        duration = time.perf_counter() - started
        shape = fingerprint(statement)
        latency = self._latency
        label = shape if shape in latency or len(latency) < MAX_FINGERPRINTS else OTHER
        latency.series(label).observe(duration)
        self.queries += 1
        self.database_s += duration
        self._recent.append(duration)
        request = current_request()
        if request is not None:
            request.record_query(shape, duration)
        if duration >= self.slow_threshold_s:
            self._slow.inc()
            slow_query_logger.warning(
                "slow query: %.3fs %s [route=%s request_id=%s]",
                duration,
                shape,
                request.route if request is not None else "-",
                request.request_id if request is not None else "-",
            )

    def _on_error(self, context: ExceptionContext) -> None:
        if context.is_pre_ping:
            return
        if context.connection is not None:
            context.connection.info.pop(_STARTED, None)
        translated = translate_error(context.original_exception)
        code = (
            translated.code if translated is not None else type(context.original_exception).__name__
        )
        self._errors.labels(code).inc()
        self.errors += 1

    def _on_commit(self, _connection: Connection) -> None:
        self._commits.inc()

    def _on_rollback(self, _connection: Connection) -> None:
        self._rollbacks.inc()

    def _on_connect(self, *_args: Any) -> None:
        self._connections.inc()


class _DatabaseCollector(Collector):
    """Gauges and counters read from the Database when scraped: pool, breaker, retries."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def collect(self) -> Iterator[Any]:
        database = self._database
        breaker = database.breaker
        yield CounterMetricFamily(
            "bastion_retries", "Units of work re-run after a retryable error.",
            value=database.retry_count,
        )  # fmt: skip
        state = GaugeMetricFamily(
            "bastion_breaker_state", "Circuit breaker state (1 for the current one).",
            labels=["state"],
        )  # fmt: skip
        for name in ("closed", "half_open", "open"):
            state.add_metric([name], 1.0 if breaker.state.value == name else 0.0)
        yield state
        yield CounterMetricFamily(
            "bastion_breaker_opened", "Times the circuit breaker opened.",
            value=breaker.opened_count,
        )  # fmt: skip
        if database.settings.backend == "sqlite":
            fallbacks = CounterMetricFamily(
                "bastion_sqlite_inline_fallbacks",
                "SQLite statements moved from the event loop to a thread (this process), "
                "by reason.",
                labels=["reason"],
            )
            for reason, count in FALLBACKS.items():
                fallbacks.add_metric([reason], count)
            yield fallbacks
        try:
            pool = database.pool_status()
        except Exception:
            return  # not running: no pool to describe
        for name, value, text in (
            ("bastion_pool_size", pool.size, "Connections the pools keep open."),
            ("bastion_pool_checked_out", pool.checked_out, "Connections lent to units now."),
            ("bastion_pool_checked_in", pool.checked_in, "Idle connections in the pools."),
            ("bastion_pool_overflow", pool.overflow, "Connections opened beyond the size."),
        ):
            yield GaugeMetricFamily(name, text, value=value)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The database activity of one interval."""

    at: float
    interval_s: float
    queries: int
    errors: int
    database_s: float
    throughput_qps: float
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    pool_checked_out: int
    breaker: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricsHistory:
    """A snapshot every ``interval_s`` seconds, the last ``keep`` of them (an hour by default)."""

    def __init__(self, metrics: QueryMetrics, *, interval_s: float = 10.0, keep: int = 360) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.snapshots: deque[MetricsSnapshot] = deque(maxlen=keep)
        self._last = (time.time(), metrics.queries, metrics.errors, metrics.database_s)

    def take(self, *, pool_checked_out: int, breaker: str) -> MetricsSnapshot:
        """Close the current interval and store its snapshot."""
        now = time.time()
        since, queries, errors, database_s = self._last
        metrics = self.metrics
        interval = max(now - since, 1e-9)
        done = metrics.queries - queries
        failed = metrics.errors - errors
        p50, p95, p99 = _percentiles_ms(metrics.drain_recent())
        snapshot = MetricsSnapshot(
            at=round(now, 3),
            interval_s=round(interval, 3),
            queries=done,
            errors=failed,
            database_s=round(metrics.database_s - database_s, 6),
            throughput_qps=round(done / interval, 3),
            error_rate=round(failed / (done + failed), 6) if done + failed else 0.0,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            pool_checked_out=pool_checked_out,
            breaker=breaker,
        )
        self.snapshots.append(snapshot)
        self._last = (now, metrics.queries, metrics.errors, metrics.database_s)
        return snapshot

    def summary(self, *, top: int = 10) -> dict[str, Any]:
        """Totals and percentiles over the kept snapshots, and the costliest fingerprints."""
        snapshots = list(self.snapshots)
        queries = sum(s.queries for s in snapshots)
        errors = sum(s.errors for s in snapshots)
        span = sum(s.interval_s for s in snapshots)
        worst = [s for s in snapshots if s.p99_ms is not None]
        return {
            "window_s": round(span, 3),
            "snapshots": len(snapshots),
            "queries": queries,
            "errors": errors,
            "error_rate": round(errors / (queries + errors), 6) if queries + errors else 0.0,
            "throughput_qps": round(queries / span, 3) if span else 0.0,
            # Percentiles of the snapshots' percentiles: the typical and the worst interval.
            "p50_ms": _median([s.p50_ms for s in worst]),
            "p95_ms": _median([s.p95_ms for s in worst]),
            "p99_ms": max((s.p99_ms for s in worst if s.p99_ms is not None), default=None),
            "top_fingerprints": [asdict(stats) for stats in self.metrics.top(top)],
        }


def _percentiles_ms(latencies: list[float]) -> tuple[float | None, float | None, float | None]:
    if not latencies:
        return None, None, None
    ordered = sorted(latencies)

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 3)

    return at(0.50), at(0.95), at(0.99)


def _median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    return present[len(present) // 2] if present else None
