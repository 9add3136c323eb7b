"""After a command replaced the data under a running service, drop that service's cache."""

from __future__ import annotations

import asyncio

import typer

__all__ = ["clear_service_cache"]


def clear_service_cache() -> None:
    """With ``REDIS_URL`` set, clear the service's Redis cache (its ``CACHE_PREFIX``).

    Called after a restore, an import or a reset: otherwise the service would keep serving
    values cached from the data that was replaced, until they expire. Says on stderr what
    happened; never fails the command (the data change itself succeeded).

    Raises:
        ConfigurationError: a cache setting in the environment is invalid.
    """
    from bastion.cache import create_cache, load_cache_settings

    settings = load_cache_settings()
    if not settings.enabled:
        return

    async def clear() -> bool:
        cache = create_cache(settings)
        try:
            return await cache.clear()
        finally:
            await cache.close()

    if asyncio.run(clear()):
        typer.echo(f"cache cleared ({settings.prefix}*)", err=True)
    else:
        typer.echo(
            "warning: Redis did not answer, the cache was not cleared: cached reads may show the "
            f"old data for up to CACHE_DEFAULT_TTL_S ({settings.default_ttl_s:g} s)",
            err=True,
        )
