"""Health of a service's database: a :class:`HealthReport` of component checks.

:class:`HealthChecker` looks at each part the service needs and grades it
``healthy``, ``degraded`` (works, but an operator should look) or ``unhealthy`` (cannot serve):

* ``database``: ``SELECT 1`` on the primary (write) engine within a deadline; slower than
  ``HEALTH_LATENCY_DEGRADED`` is degraded, no answer is unhealthy. While the circuit breaker is
  open it is reported unhealthy (``circuit_open``) without a query: a probe must not hammer a
  database the service has already stopped sending work to.
* ``pool``: connections checked out against what the pools can lend; at or above
  ``HEALTH_POOL_DEGRADED`` of it, degraded.
* ``breaker``: closed is healthy, half-open degraded, open unhealthy.
* ``migrations`` (given a script location): the schema's revisions against the scripts'
  heads. Behind is unhealthy — the code expects tables the database does not have — while a
  revision the scripts do not know (a newer release already migrated it) is only degraded.
* any extra ``checks`` (replicas, a cache, the age of the last backup…).

The database check runs on one connection of the primary pool (an exhausted pool therefore
reads as unhealthy: requests would wait for it too), reads the schema's revisions on the same
connection, and collects figures (server version, size, sessions) last and best effort. When
the revisions cannot be read, the last reading stands, marked ``stale``: the schema changes at
deploys, and a database that is down is the ``database`` component's news, not the schema's.

The report is unhealthy if any component is, else degraded if any is; its score is the mean
of 1 / 0.5 / 0 over components. A result is reused for ``HEALTH_CACHE_TTL`` seconds and
callers arriving while a check runs share it, so however many probes come in, the database
sees at most one check at a time and one per TTL. A check never raises: a failure becomes an
unhealthy component with a stable error code, never a message, SQL or URL.

>>> checker = HealthChecker(database, migrations="myservice:migrations")  # doctest: +SKIP
>>> report = await checker.check()
>>> report.status, report.score
(<HealthStatus.HEALTHY: 'healthy'>, 1.0)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._sqlite import READ_UNIT, UNIT_OPTION
from bastion._translate import translate_error
from bastion.breaker import BreakerState
from bastion.database import Database
from bastion.inspection import server_version, sqlite_file_sizes
from bastion.types import utcnow

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

__all__ = [
    "DATABASE_TIMEOUT_S",
    "ComponentHealth",
    "HealthCheck",
    "HealthChecker",
    "HealthReport",
    "HealthStatus",
]

logger = logging.getLogger("bastion.health")

DATABASE_TIMEOUT_S: Final = 2.0
"""Seconds the ``database`` check (and each extra check) may take before it is unhealthy."""


class HealthStatus(enum.Enum):
    """How well a component (or the whole service) is doing, best first."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def score(self) -> float:
        """1 for healthy, 0.5 for degraded, 0 for unhealthy."""
        return _SCORES[self]


_SCORES: Final = {
    HealthStatus.HEALTHY: 1.0,
    HealthStatus.DEGRADED: 0.5,
    HealthStatus.UNHEALTHY: 0.0,
}


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """The state of one component.

    ``error`` is a stable code (``"database_unavailable"``, ``"timeout"``, ``"circuit_open"``,
    ``"migrations_behind"``…) when the component is not healthy for a known reason; ``details``
    are JSON-ready figures, never secrets.
    """

    name: str
    status: HealthStatus
    latency_ms: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The component as JSON-ready data (its name is the key it is filed under)."""
        return {
            "status": self.status.value,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "details": dict(self.details),
        }


HealthCheck = Callable[[], Awaitable[ComponentHealth]]
"""An extra check for :class:`HealthChecker`: an async callable returning one component."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The components, the worst of their states, and a score from 0 (all down) to 1."""

    status: HealthStatus
    score: float
    components: tuple[ComponentHealth, ...]
    checked_at: datetime

    @classmethod
    def of(
        cls, components: Sequence[ComponentHealth], *, checked_at: datetime | None = None
    ) -> HealthReport:
        """A report whose status and score follow from ``components``.

        The status is the worst component's (healthy when there are none); the score is the
        mean of 1 / 0.5 / 0 over them. Component names are made unique (``name_2``…) so that
        none hides another in :meth:`to_dict`.
        """
        unique = tuple(_unique_names(components))
        if not unique:
            return cls(HealthStatus.HEALTHY, 1.0, (), checked_at or utcnow())
        status = min((component.status for component in unique), key=lambda s: s.score)
        score = round(sum(component.status.score for component in unique) / len(unique), 3)
        return cls(status, score, unique, checked_at or utcnow())

    def component(self, name: str) -> ComponentHealth | None:
        """The component called ``name``, if the report has one."""
        return next((c for c in self.components if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: ``{"status", "score", "checked_at", "components"}``."""
        return {
            "status": self.status.value,
            "score": self.score,
            "checked_at": self.checked_at.isoformat().replace("+00:00", "Z"),
            "components": {component.name: component.to_dict() for component in self.components},
        }


class HealthChecker:
    """Checks a :class:`~bastion.Database` (and whatever ``checks`` add) on demand.

    Create one per service and share it: its cache and single flight are what keep many
    probes from becoming many queries. ``migrations`` is an Alembic script location
    (``"myservice:migrations"``); ``timeout_s`` bounds the database check and each extra check.

    >>> checker = HealthChecker(db, checks=[check_redis])  # doctest: +SKIP
    >>> report = await checker.check()
    >>> report.to_dict()["components"]["database"]["status"]
    'healthy'

    Raises:
        ConfigurationError: ``migrations`` names no Alembic scripts.
        ValueError: ``timeout_s`` is not positive.
    """

    def __init__(
        self,
        database: Database,
        *,
        migrations: str | None = None,
        checks: Sequence[HealthCheck] = (),
        timeout_s: float = DATABASE_TIMEOUT_S,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.database = database
        self.timeout_s = timeout_s
        self._schema = _ExpectedSchema(migrations) if migrations is not None else None
        self._checks = tuple(checks)
        self._cached: HealthReport | None = None
        self._cached_at = 0.0
        self._running: asyncio.Task[HealthReport] | None = None
        self._last_revisions: tuple[str, ...] | None = None

    async def check(self) -> HealthReport:
        """The current report: reused within ``HEALTH_CACHE_TTL``, shared while one runs.

        Never raises (cancelling the caller cancels only its wait, not the shared check).
        """
        cached = self._cached
        if cached is not None and time.monotonic() - self._cached_at < self._ttl_s:
            return cached
        if self._running is None:
            self._running = asyncio.create_task(self._check_and_cache(), name="bastion-health")
        return await asyncio.shield(self._running)

    @property
    def _ttl_s(self) -> float:
        return self.database.settings.health_cache_s

    async def _check_and_cache(self) -> HealthReport:
        try:
            report = await self._check()
        except Exception:
            # Every component guards itself; this is the promise kept should one not.
            logger.exception("health check failed")
            report = HealthReport.of(
                [ComponentHealth("health", HealthStatus.UNHEALTHY, error="check_failed")]
            )
        finally:
            self._running = None
        previous, self._cached, self._cached_at = self._cached, report, time.monotonic()
        if previous is not None and previous.status is not report.status:
            unwell = [c.name for c in report.components if c.status is not HealthStatus.HEALTHY]
            logger.warning(
                "health %s -> %s (%s)",
                previous.status.value,
                report.status.value,
                ", ".join(unwell) or "all components healthy",
            )
        return report

    async def _check(self) -> HealthReport:
        # Pool and breaker first: the database check's own connection must not count as load.
        pool = _guarded("pool", self._pool)
        breaker = _guarded("breaker", self._breaker)
        probe, extras = await asyncio.gather(self._probe(), self._run_extras())
        components = [self._database(probe), pool, breaker]
        if self._schema is not None:
            components.append(self._migrations(probe, self._schema))
        components.extend(extras)
        return HealthReport.of(components)

    # -- database -------------------------------------------------------------------------

    async def _probe(self) -> _Probe:
        """SELECT 1 on the primary, then (best effort) figures and the schema's revisions."""
        probe = _Probe()
        if self.database.breaker.state is BreakerState.OPEN:
            probe.error = "circuit_open"
            return probe
        started = time.perf_counter()
        # Not asyncio.timeout(): cancelling a statement in flight makes SQLAlchemy close the
        # connection gracefully, which waits 2 s more on a server that cannot answer. At the
        # deadline the socket is cut first, so the statement fails at once, then the work ends.
        work = asyncio.create_task(self._probe_work(probe, started), name="bastion-health-probe")
        try:
            await asyncio.wait({work}, timeout=self.timeout_s)
        finally:
            if not work.done():
                probe.timed_out = True
                _abort_socket(probe.driver_connection)
                work.cancel()
                await asyncio.wait({work})
        if probe.timed_out:
            probe.error = "timeout"
        probe.elapsed_s = time.perf_counter() - started
        return probe

    async def _probe_work(self, probe: _Probe, started: float) -> None:
        try:
            async with self.database.engine.connect() as connection:
                probe.connected = True
                probe.driver_connection = _driver_connection(connection)
                await connection.execution_options(**self._probe_options())
                await connection.exec_driver_sql("SELECT 1")
                probe.latency_s = time.perf_counter() - started
                if self._schema is not None:
                    probe.revisions = await connection.run_sync(_current_revisions)
                # Last: under PgBouncer the probe is a transaction a failure here would end.
                probe.details = await self._database_details(connection)
        except Exception as exc:
            probe.error = _error_code(exc)
            if not probe.timed_out:
                logger.debug("health: the database check failed", exc_info=True)

    def _probe_options(self) -> dict[str, Any]:
        settings = self.database.settings
        if settings.backend == "sqlite":
            # No BEGIN IMMEDIATE: a probe must not queue for SQLite's write lock.
            return {UNIT_OPTION: READ_UNIT}
        if settings.pgbouncer:
            # A statement's prepare and execute must reach one server connection: a transaction.
            return {}
        return {"isolation_level": "AUTOCOMMIT"}  # one round trip: no BEGIN, no ROLLBACK

    async def _database_details(self, connection: AsyncConnection) -> dict[str, Any]:
        settings = self.database.settings
        details: dict[str, Any] = {"backend": settings.backend}
        try:
            details["server_version"] = server_version(connection)
            if settings.backend == "sqlite":
                details.update(sqlite_file_sizes(settings.url.database or ""))
                return details
            row: Any = (await connection.exec_driver_sql(_POSTGRES_FIGURES)).one()
            details["size_bytes"] = int(row[0])
            details["connections"] = int(row[1])
            details["active_connections"] = int(row[2])
        except Exception:
            # Figures only: a server that will not give them is still a server that answers.
            logger.debug("health: database figures unavailable", exc_info=True)
        return details

    def _database(self, probe: _Probe) -> ComponentHealth:
        details = dict(probe.details) or {"backend": self.database.settings.backend}
        if probe.latency_s is None:
            if probe.error == "timeout":
                details["timeout_s"] = self.timeout_s
                details["waiting_for"] = "an answer" if probe.connected else "a connection"
            elapsed_ms = None if probe.elapsed_s is None else _ms(probe.elapsed_s)
            return ComponentHealth(
                "database", HealthStatus.UNHEALTHY, elapsed_ms, details, probe.error
            )
        threshold_s = self.database.settings.health_latency_degraded_s
        details["latency_degraded_ms"] = _ms(threshold_s)
        slow = probe.latency_s > threshold_s
        return ComponentHealth(
            "database",
            HealthStatus.DEGRADED if slow else HealthStatus.HEALTHY,
            _ms(probe.latency_s),
            details,
            "slow" if slow else None,
        )

    def _migrations(self, probe: _Probe, schema: _ExpectedSchema) -> ComponentHealth:
        revisions, stale = probe.revisions, False
        if revisions is None:
            # Not read this time (the database is down, or too slow to answer everything
            # within the deadline): the schema only changes at deploys, so the last reading
            # stands, marked stale, rather than blaming the schema for the database's state.
            revisions, stale = self._last_revisions, True
        if revisions is None:
            details: dict[str, Any] = {"head": list(schema.heads)}
            error = probe.error or "not_checked"
            return ComponentHealth("migrations", HealthStatus.UNHEALTHY, None, details, error)
        self._last_revisions = revisions
        status, problem = schema.compare(revisions)
        details = {"current": list(revisions), "head": list(schema.heads)}
        if stale:
            details["stale"] = True
        return ComponentHealth("migrations", status, None, details, problem)

    # -- pool and breaker -----------------------------------------------------------------

    def _pool(self) -> ComponentHealth:
        settings = self.database.settings
        pool = self.database.pool_status()
        capacity = self.database.pool_capacity
        pools = 1 if settings.is_memory else 2  # in-memory SQLite shares one pool
        usage = pool.checked_out / capacity
        details = {
            "size": pool.size,
            "checked_out": pool.checked_out,
            "checked_in": pool.checked_in,
            "overflow": pool.overflow,
            "pools": pools,
            "capacity": capacity,
            "usage": round(usage, 3),
            "pool_size": settings.pool_size,
            "max_overflow": settings.max_overflow,
            "pool_timeout_s": settings.pool_timeout_s,
            "usage_degraded": settings.health_pool_degraded,
        }
        busy = usage >= settings.health_pool_degraded
        status = HealthStatus.DEGRADED if busy else HealthStatus.HEALTHY
        return ComponentHealth("pool", status, None, details, "pool_busy" if busy else None)

    def _breaker(self) -> ComponentHealth:
        breaker = self.database.breaker
        details = {
            "state": breaker.state.value,
            "consecutive_failures": breaker.consecutive_failures,
            "opened_count": breaker.opened_count,
            "retry_after_s": round(breaker.retry_after_s, 3),
        }
        status, error = _BREAKER_HEALTH[breaker.state]
        return ComponentHealth("breaker", status, None, details, error)

    # -- extra checks ---------------------------------------------------------------------

    async def _run_extras(self) -> list[ComponentHealth]:
        return list(
            await asyncio.gather(
                *(self._run_extra(index, check) for index, check in enumerate(self._checks))
            )
        )

    async def _run_extra(self, index: int, check: HealthCheck) -> ComponentHealth:
        name = getattr(check, "__name__", None) or f"check_{index + 1}"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await check()
        except TimeoutError:
            return ComponentHealth(name, HealthStatus.UNHEALTHY, _ms(self.timeout_s), {}, "timeout")
        except Exception as exc:
            logger.warning("health check %s failed", name, exc_info=True)
            latency_ms = _ms(time.perf_counter() - started)
            return ComponentHealth(name, HealthStatus.UNHEALTHY, latency_ms, {}, _error_code(exc))
        if not isinstance(result, ComponentHealth):
            return ComponentHealth(name, HealthStatus.UNHEALTHY, None, {}, "invalid_result")
        return result


@dataclass(slots=True)
class _Probe:
    """What the database check found, filled in as far as it got."""

    connected: bool = False
    driver_connection: Any = None
    timed_out: bool = False
    latency_s: float | None = None
    elapsed_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    revisions: tuple[str, ...] | None = None
    error: str | None = None


class _ExpectedSchema:
    """The revisions the code's migration scripts end at, loaded once."""

    def __init__(self, location: str) -> None:
        # Imported here: Alembic is only needed by services that check their migrations, and
        # importing it costs `import bastion` noticeable time.
        from alembic.script import ScriptDirectory

        from bastion.migrations import make_alembic_config

        self._scripts: ScriptDirectory = ScriptDirectory.from_config(make_alembic_config(location))
        self.heads = tuple(sorted(self._scripts.get_heads()))

    def compare(self, current: tuple[str, ...]) -> tuple[HealthStatus, str | None]:
        """Healthy at head; unhealthy behind it; degraded at a revision the scripts lack."""
        if set(current) == set(self.heads):
            return HealthStatus.HEALTHY, None
        if any(not self._knows(revision) for revision in current):
            return HealthStatus.DEGRADED, "unknown_revision"
        return HealthStatus.UNHEALTHY, "migrations_behind"

    def _knows(self, revision: str) -> bool:
        try:
            return self._scripts.get_revision(revision) is not None
        except Exception:  # alembic raises its own errors for an unknown or ambiguous id
            return False


_POSTGRES_FIGURES: Final = (
    "SELECT pg_database_size(current_database()), count(*), "
    "count(*) FILTER (WHERE state = 'active') "
    "FROM pg_stat_activity WHERE datname = current_database()"
)

_BREAKER_HEALTH: Final = {
    BreakerState.CLOSED: (HealthStatus.HEALTHY, None),
    BreakerState.HALF_OPEN: (HealthStatus.DEGRADED, "circuit_half_open"),
    BreakerState.OPEN: (HealthStatus.UNHEALTHY, "circuit_open"),
}


def _current_revisions(connection: Connection) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext  # see _ExpectedSchema

    return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))


def _driver_connection(connection: AsyncConnection) -> Any:
    sync_connection = connection.sync_connection
    return None if sync_connection is None else sync_connection.connection.driver_connection


def _abort_socket(driver_connection: Any) -> None:
    """Cut an asyncpg connection's socket now, without the goodbye a silent server never sends.

    SQLAlchemy then finds the connection gone and discards it, instead of pooling a connection
    whose statement may still be running.
    """
    terminate = getattr(driver_connection, "terminate", None)
    if callable(terminate):  # asyncpg; an aiosqlite statement has its own deadline
        terminate()


def _guarded(name: str, check: Callable[[], ComponentHealth]) -> ComponentHealth:
    try:
        return check()
    except Exception as exc:
        logger.debug("health: the %s check failed", name, exc_info=True)
        return ComponentHealth(name, HealthStatus.UNHEALTHY, None, {}, _error_code(exc))


def _error_code(exc: BaseException) -> str:
    """A stable code for ``exc``: the Bastion error's, or ``check_failed`` for anything else."""
    translated = translate_error(exc)
    return translated.code if translated is not None else "check_failed"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _unique_names(components: Sequence[ComponentHealth]) -> list[ComponentHealth]:
    seen: dict[str, int] = {}
    unique = []
    for component in components:
        count = seen.get(component.name, 0) + 1
        seen[component.name] = count
        unique.append(
            component if count == 1 else replace(component, name=f"{component.name}_{count}")
        )
    return unique
