"""``GET /metrics``: the Database's metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from bastion.fastapi._dependencies import database_of

__all__ = ["create_metrics_router"]


def create_metrics_router(*, path: str = "/metrics") -> APIRouter:
    """A router serving ``GET {path}`` for Prometheus to scrape.

    It shows statement fingerprints (never values), counts and pool gauges: nothing secret,
    but the shape of your schema, so serve it where only your scraper can reach it. With
    :class:`~bastion.fastapi.TurnBudgetMiddleware` in the app, its counters follow.
    """
    router = APIRouter(tags=["metrics"])

    @router.get(path, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = generate_latest(database_of(request).metrics.registry)
        turn_budget = getattr(request.app.state, "turn_budget", None)
        if turn_budget is not None:
            body += generate_latest(turn_budget.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
