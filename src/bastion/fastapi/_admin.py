"""The admin API under ``/admin/database/``: deny by default, one bearer token.

Every route requires ``Authorization: Bearer <ADMIN_TOKEN>``, compared in constant time.
Without ``ADMIN_TOKEN`` configured the routes answer 404, as if they did not exist: an admin
API nobody configured is off, not open. A missing token is 401, a wrong one 403. Every call
and every refusal is logged (``bastion.admin``) with its outcome — never the token.

This router brings ``GET info``, ``GET metrics``, ``GET metrics/history`` and
``GET metrics/summary``, and the operations of :mod:`bastion.fastapi._admin_operations`:
backups, restore, integrity, optimize, jobs and the audit trail. Refusals are audited too.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

import bastion
from bastion.backup import BackupSettings
from bastion.database import Database
from bastion.fastapi._admin_limits import DEFAULT_ADMIN_RATE
from bastion.fastapi._admin_operations import AdminOperations, add_operation_routes, client_actor
from bastion.fastapi._dependencies import database_of, get_database
from bastion.inspection import inspect_database
from bastion.migrations import current_revisions

__all__ = ["create_admin_router", "require_admin"]

logger = logging.getLogger("bastion.admin")


async def require_admin(
    request: Request, database: Annotated[Database, Depends(get_database)]
) -> None:
    """Let the request through only with the admin bearer token (a dependency).

    Raises:
        HTTPException: 404 when no ``ADMIN_TOKEN`` is configured (the API is off), 401 when
            no bearer token was sent, 403 when it is not the admin token.
    """
    expected = database.settings.admin_token
    where = f"{request.method} {request.url.path}"
    if expected is None:
        raise HTTPException(404, "Not Found")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        logger.warning("admin %s refused: no bearer token", where)
        raise HTTPException(
            401, "admin token required: 'Authorization: Bearer <ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    if not hmac.compare_digest(
        presented.strip().encode("utf-8", "surrogateescape"),
        expected.get_secret_value().encode(),
    ):
        logger.warning("admin %s refused: wrong token", where)
        raise HTTPException(403, "wrong admin token")
    logger.info("admin %s allowed", where)


def create_admin_router(
    *,
    prefix: str = "/admin/database",
    migrations: str | None = None,
    backups: BackupSettings | None = None,
    rate: str = DEFAULT_ADMIN_RATE,
) -> APIRouter:
    """The admin routes, each behind :func:`require_admin`.

    ``migrations`` (an Alembic location such as ``"myservice:migrations"``) lets ``info``
    report the schema's current revision. ``backups`` says where backups go (default
    :class:`~bastion.backup.BackupSettings`); ``rate`` limits expensive operations per
    client (a ``limits`` rate such as ``"6/minute"``).

    Raises:
        ValueError: ``rate`` is not a rate.
    """
    operations = AdminOperations(backups, rate=rate)

    async def admin_only(request: Request) -> None:
        try:
            await require_admin(request, database_of(request))
        except HTTPException as exc:
            if exc.status_code in (401, 403):
                operations.audit.record_refusal(
                    actor=client_actor(request, authenticated=False),
                    action=f"{request.method} {request.url.path}",
                    detail=str(exc.status_code),
                )
            raise

    class AdminFirstRoute(APIRoute):
        """Checks the admin token before anything else of the request is looked at.

        A route dependency would run only after FastAPI parsed the body, so a malformed body
        would get a 422 — telling an unauthenticated caller that the route exists even when
        the admin API is off.
        """

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def admin_first(request: Request) -> Response:
                await admin_only(request)
                return await handler(request)

            return admin_first

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        # Nested inside the app's lifespan, so this runs before the Database closes: a job
        # still running is cancelled while its connection can still be given back.
        yield
        await operations.jobs.aclose()

    router = APIRouter(
        prefix=prefix, tags=["admin"], route_class=AdminFirstRoute, lifespan=lifespan
    )

    @router.get("/info")
    async def info(database: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
        settings = database.settings
        return {
            "bastion_version": bastion.__version__,
            "database": (await inspect_database(database)).to_dict(),
            "migrations": {
                "location": migrations,
                "current": await current_revisions(database) if migrations else None,
            },
            "pool": {
                "url": settings.display_url,  # password masked
                "pool_size": settings.pool_size,
                "max_overflow": settings.max_overflow,
                "pool_timeout_s": settings.pool_timeout_s,
                "pool_recycle_s": settings.pool_recycle_s,
                "pre_ping": settings.pool_pre_ping,
                "statement_timeout_s": settings.statement_timeout_s,
                "pgbouncer": settings.pgbouncer,
                "status": _pool(database),
            },
        }

    @router.get("/metrics")
    async def metrics(database: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
        breaker = database.breaker
        return {
            "queries": database.metrics.queries,
            "errors": database.metrics.errors,
            "database_s": round(database.metrics.database_s, 6),
            "retries": database.retry_count,
            "leaked_connections_reported": database.leaks.reported,
            "breaker": {
                "state": breaker.state.value,
                "consecutive_failures": breaker.consecutive_failures,
                "opened": breaker.opened_count,
            },
            "pool": _pool(database),
            "top_fingerprints": [asdict(stats) for stats in database.metrics.top(10)],
        }

    @router.get("/metrics/history")
    async def history(database: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
        return {
            "interval_s": database.history.interval_s,
            "snapshots": [snapshot.to_dict() for snapshot in database.history.snapshots],
        }

    @router.get("/metrics/summary")
    async def summary(database: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
        return database.history.summary()

    add_operation_routes(router, operations)
    return router


def _pool(database: Database) -> dict[str, int]:
    return asdict(database.pool_status())
