"""The Redis cache against a real Redis: hits, TTLs, compression, tags, stampedes, scoping."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from bastion.cache import CacheSettings, RedisCache, cache_key, cached, create_cache
from bastion.cache.base import NullCache
from bastion.health import HealthStatus


class Source:
    """A stand-in for the database: counts loads, can be slowed and rewritten."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.loads = 0
        self.delay_s = 0.0

    async def load(self, key: str) -> Any:
        self.loads += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.values[key]


async def test_a_second_read_is_a_hit_and_the_source_is_read_once(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    source = Source()
    source.values["k"] = {"title": "hello", "n": [1, 2]}
    try:
        first = await cache.get_or_load("k", lambda: source.load("k"))
        second = await cache.get_or_load("k", lambda: source.load("k"))
    finally:
        await cache.close()
    assert first == second == {"title": "hello", "n": [1, 2]}
    assert source.loads == 1
    assert (cache.metrics.hits, cache.metrics.misses) == (1, 1)


async def test_large_values_are_stored_compressed_and_read_back_whole(
    cache_settings: CacheSettings,
) -> None:
    settings = cache_settings.model_copy(update={"compress_min_bytes": 100})
    cache = RedisCache(settings)
    big = {"text": "é" * 50_000}
    try:
        await cache.get_or_load("big", lambda: _value(big))
        stored = await cache.client.get(f"{settings.prefix}v:big")
        again = await cache.get_or_load("big", lambda: _value({"text": "not this"}))
    finally:
        await cache.close()
    assert stored is not None
    assert stored[:1] == b"z"
    assert len(stored) < 2_000  # 100 KB of one character compresses to almost nothing
    assert again == big


async def test_values_are_json_never_pickle(cache_settings: CacheSettings) -> None:
    cache = RedisCache(cache_settings)
    try:
        await cache.get_or_load("j", lambda: _value([1, "two", None]))
        stored = await cache.client.get(f"{cache_settings.prefix}v:j")
        # A value someone else wrote (here: a pickle) is a miss, never executed.
        await cache.client.set(f"{cache_settings.prefix}v:p", b"\x80\x04K\x01.")
        foreign = await cache.get_or_load("p", lambda: _value("from the source"))
    finally:
        await cache.close()
    assert stored == b'j[1,"two",null]'
    assert foreign == "from the source"
    assert cache.metrics.errors == 1  # the undecodable value is counted


async def test_the_ttl_is_set_on_the_stored_value(cache_settings: CacheSettings) -> None:
    cache = RedisCache(cache_settings)
    try:
        await cache.get_or_load("t", lambda: _value(1), ttl_s=30)
        ttl_ms = await cache.client.pttl(f"{cache_settings.prefix}v:t")
    finally:
        await cache.close()
    assert 0 < ttl_ms <= 30_000


async def test_invalidate_by_key_and_by_tag(cache_settings: CacheSettings) -> None:
    cache = RedisCache(cache_settings)
    source = Source()
    source.values.update(a=1, b=2, c=3)
    try:
        for key in "abc":
            await cache.get_or_load(key, lambda k=key: source.load(k), tags=["letters"])  # type: ignore[misc]
        source.values.update(a=10, b=20, c=30)
        await cache.invalidate("a")
        after_key = [await cache.get_or_load(k, lambda k=k: source.load(k), tags=["letters"])  # type: ignore[misc]
                     for k in "abc"]  # fmt: skip
        await cache.invalidate_tags("letters")
        after_tag = [await cache.get_or_load(k, lambda k=k: source.load(k), tags=["letters"])  # type: ignore[misc]
                     for k in "abc"]  # fmt: skip
    finally:
        await cache.close()
    assert after_key == [10, 2, 3]
    assert after_tag == [10, 20, 30]


async def test_a_load_racing_an_invalidation_does_not_store_its_old_value(
    cache_settings: CacheSettings,
) -> None:
    reader, writer = RedisCache(cache_settings), RedisCache(cache_settings)  # two processes
    source = Source()
    source.values["k"] = "old"
    loading, release = asyncio.Event(), asyncio.Event()

    async def slow_old_read() -> str:
        value = source.values["k"]  # read before the write commits
        loading.set()
        await release.wait()
        return str(value)

    try:
        racing = asyncio.create_task(reader.get_or_load("k", slow_old_read))
        await loading.wait()
        source.values["k"] = "new"
        await writer.invalidate("k")  # the write's invalidation lands mid-load
        release.set()
        assert await racing == "old"  # the read that started before the write may see it
        after = await reader.get_or_load("k", lambda: source.load("k"))
    finally:
        await reader.close()
        await writer.close()
    assert after == "new"
    assert reader.metrics.stale_loads == 1


async def test_concurrent_misses_in_one_process_load_once(cache_settings: CacheSettings) -> None:
    cache = RedisCache(cache_settings)
    source = Source()
    source.values["hot"] = "v"
    source.delay_s = 0.05
    try:
        results = await asyncio.gather(
            *(cache.get_or_load("hot", lambda: source.load("hot")) for _ in range(100))
        )
    finally:
        await cache.close()
    assert results == ["v"] * 100
    assert source.loads == 1


async def test_concurrent_misses_across_processes_load_once(cache_settings: CacheSettings) -> None:
    caches = [RedisCache(cache_settings) for _ in range(4)]  # four workers' caches
    source = Source()
    source.values["hot"] = "v"
    source.delay_s = 0.1
    try:
        results = await asyncio.gather(
            *(cache.get_or_load("hot", lambda: source.load("hot")) for cache in caches * 10)
        )
    finally:
        for cache in caches:
            await cache.close()
    assert results == ["v"] * 40
    assert source.loads == 1


async def test_a_cancelled_leader_does_not_fail_its_followers(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    source = Source()
    source.values["k"] = "v"
    source.delay_s = 0.05
    try:
        leader = asyncio.create_task(cache.get_or_load("k", lambda: source.load("k")))
        await asyncio.sleep(0.02)
        followers = [
            asyncio.create_task(cache.get_or_load("k", lambda: source.load("k"))) for _ in range(5)
        ]
        await asyncio.sleep(0.01)
        leader.cancel()
        results = await asyncio.gather(*followers)
    finally:
        await cache.close()
    assert results == ["v"] * 5
    assert leader.cancelled()


class Conversation(BaseModel):
    id: uuid.UUID
    owner: str
    title: str


async def test_cached_keys_by_named_arguments_and_never_by_injected_ones(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    loads: list[tuple[str, uuid.UUID]] = []
    conversation_id = uuid.uuid4()

    @cached("conversation:{owner}:{conversation_id}", ttl=60, cache=cache)
    async def load(connection: object, owner: str, conversation_id: uuid.UUID) -> Conversation:
        loads.append((owner, conversation_id))
        return Conversation(id=conversation_id, owner=owner, title=f"{owner}'s")

    try:
        # A different "connection" object on each call must not change the key.
        first = await load(object(), "alice", conversation_id)
        again = await load(object(), owner="alice", conversation_id=conversation_id)
        other = await load(object(), "bob", conversation_id)
    finally:
        await cache.close()
    assert isinstance(again, Conversation)
    assert first == again
    assert other.owner == "bob"  # scoped by owner: never alice's value
    assert loads == [("alice", conversation_id), ("bob", conversation_id)]


async def test_argument_values_cannot_forge_another_key() -> None:
    one = cache_key("c:{owner}:{cid}", owner="x:y", cid="z")
    two = cache_key("c:{owner}:{cid}", owner="x", cid="y:z")
    assert one != two


def test_a_template_naming_no_parameter_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="request"):

        @cached("conversation:{request}")
        async def load(conversation_id: str) -> str:
            return conversation_id

    with pytest.raises(TypeError, match="plain parameter names"):

        @cached("conversation:{user.id}")
        async def load_attr(user: object) -> str:
            return ""


async def test_metrics_are_on_the_given_registry_and_health_is_healthy(
    cache_settings: CacheSettings,
) -> None:
    registry = CollectorRegistry()
    cache = create_cache(cache_settings, registry=registry)
    assert isinstance(cache, RedisCache)
    try:
        await cache.get_or_load("m", lambda: _value(1))
        await cache.get_or_load("m", lambda: _value(1))
        health = await cache.health()
    finally:
        await cache.close()
    text = generate_latest(registry).decode()
    assert "bastion_cache_hits_total 1.0" in text
    assert "bastion_cache_misses_total 1.0" in text
    assert 'bastion_cache_breaker_state{state="closed"} 1.0' in text
    assert health.status is HealthStatus.HEALTHY
    assert health.details["hits"] == 1


async def test_without_redis_url_the_cache_is_a_null_cache() -> None:
    cache = create_cache(CacheSettings(REDIS_URL=None))
    assert isinstance(cache, NullCache)
    assert await cache.get_or_load("k", lambda: _value(5)) == 5
    assert (await cache.health()).status is HealthStatus.HEALTHY


def test_the_redis_password_never_shows() -> None:
    settings = CacheSettings(REDIS_URL="redis://user:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(settings)
    assert settings.display_url == "redis://127.0.0.1:6379/0"  # no user, no password
    assert "hunter2" not in repr(RedisCache(settings))


async def _value(value: Any) -> Any:
    return value


async def test_a_failing_load_stores_nothing_and_its_followers_share_the_error(
    cache_settings: CacheSettings,
) -> None:
    cache = RedisCache(cache_settings)
    calls = 0

    async def missing() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise LookupError("no such row")

    try:
        results = await asyncio.gather(
            *(cache.get_or_load("gone", missing) for _ in range(5)), return_exceptions=True
        )
        assert calls == 1
        assert all(isinstance(result, LookupError) for result in results)
        lock = await cache.client.exists(f"{cache_settings.prefix}l:gone")
        with pytest.raises(LookupError):
            await cache.get_or_load("gone", missing)
    finally:
        await cache.close()
    assert lock == 0  # released at once: other processes need not wait it out
    assert calls == 2  # nothing was cached
