"""Review findings (issue 8 follow-up): secrets on health, ``None`` in keys, ``Cache.clear``."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest
import redis.asyncio as aioredis

from bastion import DatabaseSettings
from bastion.cache import CacheSettings, RedisCache, cache_key
from bastion.cache.base import NullCache
from conversations.app import create_app
from tests.cache.redis_server import RedisServer
from tests.conftest import serve

SECRET = "s3cret-Zq9"


async def test_a_password_in_the_query_string_never_reaches_health_or_logs(
    settings: DatabaseSettings, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", SECRET)
    await admin.aclose()
    url = f"redis://127.0.0.1:{redis_server.port}/0?password={SECRET}"
    cache_settings = CacheSettings(REDIS_URL=url, CACHE_PREFIX="sec:")
    caplog.set_level(logging.DEBUG)
    app = create_app(settings.model_copy(update={"health_cache_s": 0}),
                     cache_settings=cache_settings)  # fmt: skip
    async with serve(app) as client:
        response = await client.get("/health/ready")
        cache: RedisCache = app.state.cache
        shown = repr(cache)
    assert response.status_code == 200
    details = response.json()["components"]["cache"]
    assert details["status"] == "healthy"  # the password in the query was used
    assert details["details"]["url"] == f"redis://127.0.0.1:{redis_server.port}/0"
    assert SECRET not in response.text
    assert SECRET not in shown
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://user:{SECRET}@h:6379/2", "redis://h:6379/2"),
        (f"rediss://:{SECRET}@[::1]:6380/1?ssl_cert_reqs=none", "rediss://[::1]:6380/1"),
        (f"unix:///run/redis.sock?db=1&password={SECRET}", "unix:///run/redis.sock"),
        ("redis://h", "redis://h"),
    ],
)
def test_display_url_shows_only_scheme_host_port_and_database(url: str, shown: str) -> None:
    assert CacheSettings(REDIS_URL=url).display_url == shown


def test_none_and_the_string_none_build_different_keys() -> None:
    template = "messages:{owner}:{cursor}"
    assert cache_key(template, owner="u", cursor=None) != cache_key(template, owner="u",
                                                                     cursor="None")  # fmt: skip
    assert cache_key(template, owner="u", cursor="!none") != cache_key(template, owner="u",
                                                                        cursor=None)  # fmt: skip


async def test_clear_drops_every_key_of_the_prefix_and_only_those(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    neighbour = cache_settings.prefix.rstrip(":") + "-other:v:k"  # starts like our prefix
    try:
        await cache.client.set(neighbour, "keep")
        for n in range(1100):  # more than one SCAN/UNLINK batch
            await cache.get_or_load(f"k{n}", functools.partial(_value, n), tags=["t"])
        assert await cache.get_or_load("k1", lambda: _value(-1)) == 1
        assert await cache.clear() is True
        left = [name async for name in cache.client.scan_iter(match=cache_settings.prefix + "*")]
        assert await cache.get_or_load("k1", lambda: _value(-1)) == -1
        kept = await cache.client.get(neighbour)
    finally:
        await cache.client.delete(neighbour)
        await cache.close()
    assert left == [f"{cache_settings.prefix}epoch".encode()]
    assert kept == b"keep"


async def test_a_load_under_way_when_the_cache_is_cleared_does_not_store_its_value(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_old_value() -> str:
        started.set()
        await release.wait()
        return "before restore"

    try:
        loading = asyncio.create_task(cache.get_or_load("k", slow_old_value))
        await started.wait()
        assert await cache.clear() is True
        release.set()
        assert await loading == "before restore"  # its caller asked before the clear
        after = await cache.get_or_load("k", lambda: _value("after restore"))
    finally:
        await cache.close()
    assert after == "after restore"
    assert cache.metrics.to_dict()["stale_loads"] == 1


async def test_clear_with_redis_down_returns_false_logs_once_and_clears_when_it_is_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(CacheSettings(REDIS_URL=redis_server.url, CACHE_PREFIX="clr:",
                                     CACHE_SOCKET_TIMEOUT_S=0.2))  # fmt: skip
    try:
        await cache.get_or_load("k", lambda: _value("old"))
        redis_server.pause()
        with caplog.at_level(logging.WARNING, logger="bastion.cache"):
            cleared = await cache.clear()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        redis_server.resume()
        assert await cache.get_or_load("k", lambda: _value("new")) == "new"
    finally:
        await cache.close()
    assert cleared is False
    assert len(warnings) == 1


async def test_the_null_cache_clears_trivially() -> None:
    assert await NullCache().clear() is True


async def _value(value: object) -> object:
    return value
