"""``GET /metrics``: the Database's metrics in the Prometheus text format."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from bastion.fastapi._dependencies import database_of

__all__ = ["create_metrics_router", "serve_metrics_of"]


def serve_metrics_of(app: Any, registry: CollectorRegistry) -> None:
    """Have ``app``'s metrics route serve ``registry`` too, after the Database's (once)."""
    registries: list[CollectorRegistry] | None = getattr(app.state, "metrics_registries", None)
    if registries is None:
        registries = app.state.metrics_registries = []
    if registry not in registries:
        registries.append(registry)


def create_metrics_router(*, path: str = "/metrics") -> APIRouter:
    """A router serving ``GET {path}`` for Prometheus to scrape.

    It shows statement fingerprints (never values), counts and pool gauges: nothing secret,
    but the shape of your schema, so serve it where only your scraper can reach it. The
    registries given to :func:`serve_metrics_of` follow (the pacing and limiting
    middlewares' counters).
    """
    router = APIRouter(tags=["metrics"])

    @router.get(path, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = generate_latest(database_of(request).metrics.registry)
        for registry in getattr(request.app.state, "metrics_registries", ()):
            body += generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
