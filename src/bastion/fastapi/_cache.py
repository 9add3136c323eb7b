"""The cache and the live-update hub of an app: started by the lifespan, handed to routes.

``database_lifespan(settings, cache=load_cache_settings())`` creates them after the Database
(the cache's metrics go on the Database's registry, so ``GET /metrics`` shows them; its health
becomes a component of ``/health/ready``) and closes them before it. Routes reach them with
the ``Cache`` / ``LiveHub`` dependencies, or :func:`cache_of` / :func:`live_hub_of` on a
``Request`` or ``WebSocket``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from bastion.cache import Cache, CacheSettings, create_cache, use_cache
from bastion.database import Database
from bastion.errors import ConfigurationError
from bastion.live import Hub, create_hub

__all__ = [
    "CacheDep",
    "CacheInvalidations",
    "InvalidateAfterCommit",
    "LiveHubDep",
    "cache_of",
    "live_hub_of",
    "run_cache_and_hub",
]


@asynccontextmanager
async def run_cache_and_hub(
    state: Any, database: Database, settings: CacheSettings
) -> AsyncIterator[None]:
    """Create the cache and hub on ``state`` (``app.state``) for the block; close them after."""
    cache = create_cache(settings, registry=database.metrics.registry)
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    hub = create_hub(
        database, redis_url=redis_url, prefix=settings.prefix, queue_size=settings.live_queue_size
    )
    state.cache, state.live = cache, hub
    if settings.enabled:  # without Redis there is no cache to report on
        state.health_checks = (*getattr(state, "health_checks", ()), cache.health)
    use_cache(cache)
    try:
        yield
    finally:
        use_cache(None)
        await hub.close()
        await cache.close()


def cache_of(connection: HTTPConnection) -> Cache:
    """The app's cache.

    Raises:
        ConfigurationError: the app's lifespan was not given cache settings.
    """
    cache = getattr(connection.app.state, "cache", None)
    if cache is None:
        raise ConfigurationError("no cache on app.state; use database_lifespan(..., cache=...)")
    return cache  # type: ignore[no-any-return]


def live_hub_of(connection: HTTPConnection) -> Hub:
    """The app's live-update hub.

    Raises:
        ConfigurationError: the app's lifespan was not given cache settings.
    """
    hub = getattr(connection.app.state, "live", None)
    if hub is None:
        raise ConfigurationError("no live hub on app.state; use database_lifespan(..., cache=...)")
    return hub  # type: ignore[no-any-return]


async def _cache(connection: HTTPConnection) -> Cache:
    return cache_of(connection)


async def _live_hub(connection: HTTPConnection) -> Hub:
    return live_hub_of(connection)


CacheDep = Annotated[Cache, Depends(_cache)]
"""The app's :class:`~bastion.cache.Cache` (a NullCache without ``REDIS_URL``)."""

LiveHubDep = Annotated[Hub, Depends(_live_hub)]
"""The app's live-update :class:`~bastion.live.Hub`."""


class CacheInvalidations:
    """Keys and tags a route's write makes stale, invalidated once its unit has committed."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.keys: list[str] = []
        self.tags: list[str] = []

    def add(self, *, keys: Sequence[str] = (), tags: Sequence[str] = ()) -> None:
        """Invalidate ``keys`` and ``tags`` after the commit."""
        self.keys.extend(keys)
        self.tags.extend(tags)

    async def apply(self) -> None:
        """Invalidate what was added (never raises for Redis being down)."""
        if self.keys:
            await self.cache.invalidate(*self.keys)
        if self.tags:
            await self.cache.invalidate_tags(*self.tags)


async def _after_commit(connection: HTTPConnection) -> AsyncIterator[CacheInvalidations]:
    pending = CacheInvalidations(cache_of(connection))
    yield pending
    # Reached only when the route succeeded. Dependencies are torn down in reverse order, so
    # when this one is declared before the route's WriteSession/WriteConnection it runs after
    # their COMMIT — and still before the response is sent (scope="function").
    await pending.apply()


InvalidateAfterCommit = Annotated[CacheInvalidations, Depends(_after_commit, scope="function")]
"""Cache invalidation that runs after the route's write unit committed, before the response.

Declare it *before* the ``WriteSession`` / ``WriteConnection`` parameter:

>>> @router.patch("/{cid}")
... async def update(cid: UUID, stale: InvalidateAfterCommit, connection: WriteConnection):
...     ...
...     stale.add(tags=[cache_key(CONVERSATION_TAG, owner_id=user_id, conversation_id=cid)])

Invalidating inside the route instead would run before the COMMIT, and a read in between
could put the old row back into the cache.
"""
