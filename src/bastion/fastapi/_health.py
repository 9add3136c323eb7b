"""``/health/live`` and ``/health/ready``: the process answers; the database answers.

Readiness runs ``SELECT 1`` through the pool with a deadline, so an exhausted pool or a
database that does not answer reads as *unready* (503) instead of hanging the probe.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from fastapi import APIRouter
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse

from bastion._translate import translate_error
from bastion.database import DatabaseState
from bastion.fastapi._dependencies import database_of
from bastion.loop_lag import LoopLagMonitor

__all__ = ["create_health_router"]

READY_TIMEOUT_S: Final = 2.0


def create_health_router(*, prefix: str = "/health") -> APIRouter:
    """A router with ``GET {prefix}/live`` and ``GET {prefix}/ready``."""
    router = APIRouter(prefix=prefix, tags=["health"])

    @router.get("/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready", response_model=None)
    async def ready(request: Request) -> JSONResponse:
        database = database_of(request)
        started = time.perf_counter()
        component: dict[str, Any] = {"backend": database.backend}
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                async with database.read() as session:
                    await session.execute(text("SELECT 1"))
        except TimeoutError:
            component.update(status="unhealthy", error=f"no answer within {READY_TIMEOUT_S}s")
        except Exception as exc:
            translated = translate_error(exc)
            code = translated.code if translated is not None else type(exc).__name__
            component.update(status="unhealthy", error=code)
        else:
            component.update(status="healthy")
        component["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        component["breaker"] = database.breaker.state.value
        pool = database.pool_status() if database.state is DatabaseState.RUNNING else None
        if pool is not None:
            component["pool"] = {
                "size": pool.size,
                "checked_out": pool.checked_out,
                "overflow": pool.overflow,
            }
        healthy = component["status"] == "healthy"
        body: dict[str, Any] = {"status": "ready" if healthy else "unready", "database": component}
        monitor = getattr(request.app.state, "loop_lag", None)
        if isinstance(monitor, LoopLagMonitor):
            lag = monitor.snapshot()
            body["loop_lag_ms"] = {"p50": lag.p50_ms, "p99": lag.p99_ms, "max": lag.max_ms}
        return JSONResponse(body, status_code=200 if healthy else 503)

    return router
