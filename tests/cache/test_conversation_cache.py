"""The conversation store's cached reads: fresh after every write, scoped by owner, and the
app's health and metrics with Redis up, down and back."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from sqlalchemy import update

from bastion import Database, DatabaseSettings, NotFoundError
from bastion.cache import CacheSettings, RedisCache, cache_key, use_cache
from conversations.app import create_app
from conversations.cache_keys import (
    CONVERSATION_KEY,
    CONVERSATION_TAG,
    OWNER_TAG,
    conversation_changed,
    load_conversation,
)
from conversations.models import Conversation
from conversations.schemas import ConversationOut
from tests.cache.redis_server import RedisServer
from tests.conftest import serve


async def _new_conversation(database: Database, owner: str) -> tuple[uuid.UUID, uuid.UUID]:
    from conversations.auth import user_for_key
    from conversations.users import create_user

    key = await create_user(database, f"{owner}-{uuid.uuid4().hex[:8]}")
    async with database.read_connection() as connection:
        owner_id = await user_for_key(connection, key)
    assert owner_id is not None
    async with database.write() as session:
        conversation = Conversation(owner_id=owner_id, title="v0")
        session.add(conversation)
        await session.flush()
        return owner_id, conversation.id


async def _read(database: Database, cache: RedisCache, owner_id: uuid.UUID, cid: uuid.UUID) -> str:
    async with database.read_connection() as connection:
        return (await load_conversation(connection, owner_id, cid)).title


# One backend: the race is between loads and invalidations in Redis; the database only
# supplies the rows (the other tests here run on both).
@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_read_after_a_write_is_fresh_in_1000_random_interleavings(
    database: Database, cache_settings: CacheSettings
) -> None:
    # Two workers' caches on one Redis: writes and reads land on either.
    caches = [RedisCache(cache_settings), RedisCache(cache_settings)]
    owner_id, cid = await _new_conversation(database, "writer")
    rng = random.Random(8)
    stale: list[tuple[int, str]] = []
    written = 0

    async def read_with(cache: RedisCache) -> str:
        use_cache(cache)  # each task reads through its "process"'s cache
        return await _read(database, cache, owner_id, cid)

    async def racing_read(yields: int, slow: int) -> None:
        # Starts before, during or after the write, and dawdles between reading the row and
        # storing it: a load that read before the write and stores after its invalidation is
        # the race that could put an old value back.
        for _ in range(yields):
            await asyncio.sleep(0)
        cache = rng.choice(caches)

        async def load() -> ConversationOut:
            async with database.read_connection() as connection:
                value = await load_conversation.__wrapped__(connection, owner_id, cid)  # type: ignore[attr-defined]
            for _ in range(slow):
                await asyncio.sleep(0)
            return value  # type: ignore[no-any-return]

        await cache.get_or_load(
            cache_key(CONVERSATION_KEY, owner_id=owner_id, conversation_id=cid),
            load,
            tags=[
                cache_key(CONVERSATION_TAG, owner_id=owner_id, conversation_id=cid),
                cache_key(OWNER_TAG, owner_id=owner_id),
            ],
            dump=lambda value: value.model_dump(mode="json"),
            parse=ConversationOut.model_validate,
        )

    async def write_then_read(n: int) -> None:
        nonlocal written
        async with database.write_connection() as connection:
            await connection.execute(
                update(Conversation).where(Conversation.id == cid).values(title=f"v{n}")
            )
        await conversation_changed(rng.choice(caches), owner_id, cid)  # before "responding"
        written = n
        title = await read_with(rng.choice(caches))
        if title != f"v{n}":
            stale.append((n, title))

    try:
        for n in range(1, 1001):
            if rng.random() < 0.5:  # as if the value expired: the racing reads will load
                await rng.choice(caches).invalidate_tags(
                    cache_key(CONVERSATION_TAG, owner_id=owner_id, conversation_id=cid)
                )
            racing = [
                asyncio.create_task(racing_read(rng.randrange(8), rng.randrange(40)))
                for _ in range(2)
            ]
            await write_then_read(n)
            await asyncio.gather(*racing)
    finally:
        use_cache(None)
        for cache in caches:
            await cache.close()
    assert written == 1000
    assert stale == [], [cache.metrics.to_dict() for cache in caches]
    assert sum(cache.metrics.hits for cache in caches) > 300  # the cache did serve reads


async def test_two_users_never_share_a_cached_value(
    database: Database, cache_settings: CacheSettings
) -> None:
    cache = RedisCache(cache_settings)
    use_cache(cache)
    try:
        alice, alices = await _new_conversation(database, "alice")
        bob, bobs = await _new_conversation(database, "bob")
        assert await _read(database, cache, alice, alices) == "v0"  # now cached for alice
        assert await _read(database, cache, alice, alices) == "v0"
        with pytest.raises(NotFoundError):
            await _read(database, cache, bob, alices)  # alice's id, bob's key: not found
        with pytest.raises(NotFoundError):
            await _read(database, cache, alice, bobs)
        keys = [key.decode() async for key in cache.client.scan_iter(cache_settings.prefix + "v:*")]
    finally:
        use_cache(None)
        await cache.close()
    assert keys == [f"{cache_settings.prefix}v:conversation:{alice}:{alices}"]


async def test_the_app_reports_the_cache_in_health_and_metrics_through_an_outage(
    settings: DatabaseSettings, redis_server: RedisServer
) -> None:
    cache_settings = CacheSettings(
        REDIS_URL=redis_server.url, CACHE_PREFIX="app:", CACHE_SOCKET_TIMEOUT_S=0.2,
        CACHE_BREAKER_THRESHOLD=2, CACHE_BREAKER_RESET_S=0.3,
    )  # fmt: skip
    # No reuse of health results: each probe below must look again.
    app = create_app(
        settings.model_copy(update={"health_cache_s": 0}), cache_settings=cache_settings
    )
    async with serve(app) as client:
        database: Database = app.state.database
        owner_id, cid = await _new_conversation(database, "carol")
        cache: RedisCache = app.state.cache

        async def components() -> dict[str, dict[str, object]]:
            response = await client.get("/health/ready")
            assert response.status_code == 200  # a cache outage never takes the app out
            return response.json()["components"]  # type: ignore[no-any-return]

        assert (await components())["cache"]["status"] == "healthy"
        assert await _read(database, cache, owner_id, cid) == "v0"

        await asyncio.to_thread(redis_server.stop)
        answers = [await _read(database, cache, owner_id, cid) for _ in range(5)]
        down = await components()
        metrics = (await client.get("/metrics")).text

        await asyncio.to_thread(redis_server.start)
        await asyncio.sleep(cache_settings.breaker_reset_s + 0.05)
        back = await components()
        assert await _read(database, cache, owner_id, cid) == "v0"
        hits = cache.metrics.hits
        assert await _read(database, cache, owner_id, cid) == "v0"
    assert answers == ["v0"] * 5  # served from the database while Redis was down
    assert down["cache"]["status"] == "degraded"
    assert down["cache"]["error"] == "cache_unavailable"
    assert 'bastion_cache_errors_total{operation="get"}' in metrics
    assert "bastion_cache_bypassed_total 5.0" in metrics
    assert back["cache"]["status"] == "healthy"
    assert cache.metrics.hits == hits + 1  # cached again after recovery
