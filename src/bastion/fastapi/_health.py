"""``/health/live`` and ``/health/ready``: the process answers; the service can serve.

Readiness is the :class:`~bastion.health.HealthReport` of the app's one
:class:`~bastion.health.HealthChecker` (created at the first probe and kept on
``app.state.health``), plus the event loop's lag. Degraded still takes traffic (200); only
unhealthy takes the instance out of rotation (503). The checker's cache and single flight
mean a probe storm costs the database one check per ``HEALTH_CACHE_TTL``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from bastion.fastapi._dependencies import database_of
from bastion.health import HealthChecker, HealthStatus
from bastion.loop_lag import LoopLagMonitor

__all__ = ["create_health_router"]


def create_health_router(*, prefix: str = "/health", migrations: str | None = None) -> APIRouter:
    """A router with ``GET {prefix}/live`` and ``GET {prefix}/ready``.

    With ``migrations`` (an Alembic script location), readiness also requires the schema to be
    at the scripts' head.

    >>> router = create_health_router(migrations="myservice:migrations")  # doctest: +SKIP
    >>> app.include_router(router)

    Raises:
        ConfigurationError: ``migrations`` names no Alembic scripts (checked here, so a typo
            stops the app at start rather than failing every probe).
    """
    if migrations is not None:
        from bastion.migrations import make_alembic_config  # Alembic only when asked for

        make_alembic_config(migrations)
    router = APIRouter(prefix=prefix, tags=["health"])

    @router.get("/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready", response_model=None)
    async def ready(request: Request) -> JSONResponse:
        report = await _checker(request, migrations).check()
        body: dict[str, Any] = report.to_dict()
        monitor = getattr(request.app.state, "loop_lag", None)
        if isinstance(monitor, LoopLagMonitor):
            lag = monitor.snapshot()
            body["loop_lag_ms"] = {"p50": lag.p50_ms, "p99": lag.p99_ms, "max": lag.max_ms}
        unhealthy = report.status is HealthStatus.UNHEALTHY
        return JSONResponse(body, status_code=503 if unhealthy else 200)

    return router


def _checker(request: Request, migrations: str | None) -> HealthChecker:
    """The app's HealthChecker, created for the Database the lifespan started."""
    database = database_of(request)
    checker = getattr(request.app.state, "health", None)
    # A new checker when the lifespan ran again (tests restart apps): a new Database.
    if not isinstance(checker, HealthChecker) or checker.database is not database:
        checks = getattr(request.app.state, "health_checks", ())  # the cache's, for one
        checker = HealthChecker(database, migrations=migrations, checks=checks)
        request.app.state.health = checker
    return checker
