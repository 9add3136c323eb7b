"""Redis goes away mid-test: reads are served from the source, health reads degraded, the
errors are counted, a dead Redis costs no timeout per read, and the cache comes back."""

from __future__ import annotations

import asyncio
from typing import Any

from bastion.breaker import BreakerState
from bastion.cache import CacheSettings, RedisCache
from bastion.health import HealthStatus
from tests.cache.redis_server import RedisServer


def _settings(server: RedisServer) -> CacheSettings:
    return CacheSettings(
        REDIS_URL=server.url,
        CACHE_PREFIX="outage:",
        CACHE_SOCKET_TIMEOUT_S=0.2,
        CACHE_BREAKER_THRESHOLD=2,
        CACHE_BREAKER_RESET_S=0.3,
    )


async def _wait_for_probe(settings: CacheSettings) -> None:
    await asyncio.sleep(settings.breaker_reset_s + 0.05)


async def test_reads_fall_back_to_the_source_while_redis_is_down_and_recover(
    redis_server: RedisServer,
) -> None:
    settings = _settings(redis_server)
    cache = RedisCache(settings)
    source: dict[str, Any] = {"k": "v1"}
    loads = 0

    async def load() -> Any:
        nonlocal loads
        loads += 1
        return source["k"]

    try:
        assert await cache.get_or_load("k", load) == "v1"
        assert await cache.get_or_load("k", load) == "v1"
        assert loads == 1

        await asyncio.to_thread(redis_server.stop)
        source["k"] = "v2"
        await cache.invalidate("k")  # a write while Redis is down: remembered
        answers = [await cache.get_or_load("k", load) for _ in range(20)]
        health = await cache.health()
        errors_while_open = cache.metrics.errors
        more = [await cache.get_or_load("k", load) for _ in range(20)]

        assert answers == more == ["v2"] * 20  # served from the source, fresh
        assert health.status is HealthStatus.DEGRADED
        assert health.error == "cache_unavailable"
        assert cache.breaker_state is BreakerState.OPEN
        assert cache.metrics.errors >= 2
        assert cache.metrics.bypassed >= 40
        # While the circuit is open, reads do not even try Redis: no new errors.
        assert cache.metrics.errors == errors_while_open
        assert cache.pending_invalidations == 1

        await asyncio.to_thread(redis_server.start)
        await _wait_for_probe(settings)
        assert (await cache.health()).status is HealthStatus.HEALTHY
        loads_before = loads
        assert await cache.get_or_load("k", load) == "v2"
        assert await cache.get_or_load("k", load) == "v2"
        assert loads == loads_before + 1  # cached again
        assert cache.breaker_state is BreakerState.CLOSED
        assert cache.pending_invalidations == 0
    finally:
        await cache.close()


async def test_invalidations_missed_while_redis_hung_are_applied_before_the_next_read(
    redis_server: RedisServer,
) -> None:
    settings = _settings(redis_server)
    cache = RedisCache(settings)
    source: dict[str, Any] = {"k": "old"}

    async def load() -> Any:
        return source["k"]

    try:
        assert await cache.get_or_load("k", load) == "old"  # stored in Redis
        redis_server.pause()  # hung, not dead: the old value is still in it
        source["k"] = "new"
        await cache.invalidate("k")  # times out: remembered
        assert await cache.get_or_load("k", load) == "new"
        redis_server.resume()
        await _wait_for_probe(settings)
        # Redis still holds "old"; the pending invalidation must land before any read.
        assert await cache.get_or_load("k", load) == "new"
        assert await cache.get_or_load("k", load) == "new"
        assert cache.metrics.hits >= 1
    finally:
        redis_server.resume()
        await cache.close()


async def test_a_cache_created_while_redis_is_down_serves_from_the_source(
    redis_server: RedisServer,
) -> None:
    await asyncio.to_thread(redis_server.stop)
    cache = RedisCache(_settings(redis_server))

    async def load() -> str:
        return "from the source"

    try:
        assert await cache.get_or_load("k", load) == "from the source"
        assert (await cache.health()).status is HealthStatus.DEGRADED
    finally:
        await cache.close()
