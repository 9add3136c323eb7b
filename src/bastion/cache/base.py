"""The :class:`Cache` protocol, and :class:`NullCache` for a service without Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from bastion.health import ComponentHealth, HealthStatus

__all__ = ["Cache", "NullCache"]

T = TypeVar("T")


def _same(value: Any) -> Any:
    return value


class Cache(Protocol):
    """A read-through cache of JSON values with TTLs, tags and invalidation.

    Implementations never raise because the cache is unavailable: reads fall back to ``load``
    and invalidations are remembered until they can be applied.
    """

    async def get_or_load(
        self,
        key: str,
        load: Callable[[], Awaitable[T]],
        *,
        ttl_s: float | None = None,
        tags: Sequence[str] = (),
        dump: Callable[[T], Any] = _same,
        parse: Callable[[Any], T] = _same,
    ) -> T:
        """The value under ``key``, or ``await load()`` (stored for ``ttl_s``) on a miss.

        ``dump`` turns the loaded value into JSON data and ``parse`` turns stored JSON data back
        into a value. Raises whatever ``load`` raises; nothing is stored then.
        """
        ...

    async def invalidate(self, *keys: str) -> None:
        """Drop ``keys``; a load of them that started earlier will not store its value."""
        ...

    async def invalidate_tags(self, *tags: str) -> None:
        """Drop every key stored with one of ``tags`` (and loads of them under way)."""
        ...

    async def clear(self) -> bool:
        """Drop every value of this cache (its whole prefix), e.g. after a database restore.

        Loads under way when it is called will not store their values afterwards. Returns
        ``True`` once cleared; ``False`` (and logs a warning) when the cache cannot be reached:
        it is then cleared as soon as it answers again. Never raises for the cache being down.
        """
        ...

    async def health(self) -> ComponentHealth:
        """The ``cache`` component of a health report (never raises)."""
        ...

    async def close(self) -> None:
        """Release connections; the cache must not be used afterwards."""
        ...


class NullCache:
    """The cache when ``REDIS_URL`` is unset: every read loads from the source.

    >>> cache = NullCache()
    >>> # await cache.get_or_load("k", load) == await load()
    """

    async def get_or_load(
        self,
        key: str,
        load: Callable[[], Awaitable[T]],
        *,
        ttl_s: float | None = None,
        tags: Sequence[str] = (),
        dump: Callable[[T], Any] = _same,
        parse: Callable[[Any], T] = _same,
    ) -> T:
        return await load()

    async def invalidate(self, *keys: str) -> None:
        return None

    async def invalidate_tags(self, *tags: str) -> None:
        return None

    async def clear(self) -> bool:
        return True

    async def health(self) -> ComponentHealth:
        return ComponentHealth("cache", HealthStatus.HEALTHY, None, {"enabled": False})

    async def close(self) -> None:
        return None
