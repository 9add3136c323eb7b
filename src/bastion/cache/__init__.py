"""A Redis cache for reads (or none), with invalidation that never lets a write be stale.

``REDIS_URL`` set: a :class:`RedisCache`; unset: a :class:`NullCache`. Either way, code uses
the :class:`Cache` protocol — ``get_or_load``, ``invalidate``, ``invalidate_tags``,
``health`` — or the ``@cached`` decorator, and a Redis outage only makes reads slower.

This package is the Redis integration: ``import bastion`` does not import it, and redis itself
is imported only when a :class:`RedisCache` is made (``pip install bastion[redis]``).

>>> cache = create_cache(load_cache_settings(), registry=database.metrics.registry)
>>> use_cache(cache)                                    # what @cached functions use
>>> @cached("conversation:{owner_id}:{conversation_id}", ttl=60)
... async def load_conversation(connection, owner_id: UUID, conversation_id: UUID) -> Out: ...
>>> await cache.invalidate(cache_key("conversation:{owner_id}:{conversation_id}", ...))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from bastion.cache.base import Cache, NullCache
from bastion.cache.codec import CacheCodecError
from bastion.cache.decorator import cache_key, cached, current_cache, use_cache
from bastion.cache.metrics import CacheMetrics
from bastion.cache.settings import CacheSettings, load_cache_settings

__all__ = [
    "Cache",
    "CacheCodecError",
    "CacheMetrics",
    "CacheSettings",
    "NullCache",
    "RedisCache",
    "cache_key",
    "cached",
    "create_cache",
    "current_cache",
    "load_cache_settings",
    "use_cache",
]

if TYPE_CHECKING:
    from bastion.cache.redis_cache import RedisCache


def __getattr__(name: str) -> Any:
    if name == "RedisCache":  # imported on first use: it needs redis, an optional extra
        from bastion.cache.redis_cache import RedisCache

        return RedisCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_cache(
    settings: CacheSettings, *, registry: CollectorRegistry | None = None
) -> RedisCache | NullCache:
    """A :class:`RedisCache` when ``REDIS_URL`` is set, else a :class:`NullCache`.

    No connection is made here: Redis being down at start-up is an outage like any other
    (reads are served from the source), not a reason to refuse to start.
    """
    if settings.redis_url is None:
        return NullCache()
    from bastion.cache.redis_cache import RedisCache

    return RedisCache(settings, registry=registry)
