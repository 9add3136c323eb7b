"""The live-update hubs: order, exactly once, across processes, bounded queues, outages."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.engine import make_url

from bastion import Database, DatabaseSettings
from bastion.cache import CacheSettings
from bastion.live import (
    HubClosedError,
    LiveUnavailableError,
    LocalHub,
    PostgresHub,
    RedisHub,
    SlowConsumerError,
    Subscription,
    create_hub,
)
from tests.cache.redis_server import RedisServer


async def _take(subscription: object, count: int) -> list[str]:
    async with asyncio.timeout(10):
        return [await subscription.get() for _ in range(count)]  # type: ignore[attr-defined]


async def test_a_local_subscriber_gets_every_event_in_order_then_the_close() -> None:
    hub = LocalHub(queue_size=10)
    subscription = await hub.subscribe("c")
    other = await hub.subscribe("other")
    for n in range(5):
        await hub.publish("c", str(n))
    assert await _take(subscription, 5) == ["0", "1", "2", "3", "4"]
    assert other.pending == 0  # nothing crossed channels
    await hub.close()
    with pytest.raises(HubClosedError):
        await subscription.get()
    with pytest.raises(HubClosedError):
        await hub.subscribe("c")


async def test_a_subscriber_that_falls_behind_is_dropped_not_buffered() -> None:
    hub = LocalHub(queue_size=10)
    slow = await hub.subscribe("c")
    fast = await hub.subscribe("c")
    for n in range(10):
        await hub.publish("c", str(n))
        await fast.get()
    assert not slow.ended.is_set()  # exactly full is still fine
    await hub.publish("c", "one too many")
    assert slow.ended.is_set()
    with pytest.raises(SlowConsumerError):
        await slow.get()
    assert await fast.get() == "one too many"  # the others are not affected
    assert hub.subscribers == 1


async def test_closing_a_subscription_leaves_the_channel() -> None:
    hub = LocalHub()
    async with await hub.subscribe("c") as subscription:
        await hub.publish("c", "x")
        assert await subscription.get() == "x"
    assert hub.subscribers == 0
    await hub.publish("c", "nobody listens")


async def test_an_event_over_the_size_limit_is_refused() -> None:
    hub = LocalHub()
    with pytest.raises(ValueError, match="limit"):
        await hub.publish("c", "x" * (hub.max_payload_bytes + 1))


async def test_redis_events_reach_another_process_in_order_exactly_once(
    cache_settings: CacheSettings,
) -> None:
    url = cache_settings.redis_url.get_secret_value()  # type: ignore[union-attr]
    one = RedisHub(url, prefix=cache_settings.prefix)
    two = RedisHub(url, prefix=cache_settings.prefix)
    elsewhere = RedisHub(url, prefix=cache_settings.prefix + "other:")
    try:
        here = await one.subscribe("conversation:1")
        there = await two.subscribe("conversation:1")
        foreign = await elsewhere.subscribe("conversation:1")
        for n in range(200):
            await (one if n % 2 else two).publish("conversation:1", json.dumps({"n": n}))
        expected = [json.dumps({"n": n}) for n in range(200)]
        assert await _take(here, 200) == expected
        assert await _take(there, 200) == expected
        await one.publish("conversation:1", "last")
        assert await here.get() == "last"  # nothing was delivered twice before it
        assert foreign.pending == 0  # another prefix: another service
    finally:
        for hub in (one, two, elsewhere):
            await hub.close()


async def test_losing_redis_ends_subscriptions_and_they_resume_after(
    redis_server: RedisServer,
) -> None:
    hub = RedisHub(redis_server.url, prefix="live:")
    try:
        subscription = await hub.subscribe("c")
        await asyncio.to_thread(redis_server.stop)
        async with asyncio.timeout(10):
            with pytest.raises(LiveUnavailableError):
                await subscription.get()
        with pytest.raises(LiveUnavailableError):
            await hub.publish("c", "x")
        with pytest.raises(LiveUnavailableError):
            await hub.subscribe("c")
        await asyncio.to_thread(redis_server.start)
        async with asyncio.timeout(10):
            while True:
                try:
                    again = await hub.subscribe("c")
                    break
                except LiveUnavailableError:
                    await asyncio.sleep(0.1)
        await hub.publish("c", "back")
        assert await again.get() == "back"
    finally:
        await hub.close()


@pytest.mark.postgres
async def test_postgres_notifications_reach_another_process_in_order(
    postgres_test_url: str,
) -> None:
    async with _two_hubs(postgres_test_url) as (one, two):
        here = await one.subscribe("conversation:1")
        there = await two.subscribe("conversation:1")
        for n in range(100):
            await (one if n % 2 else two).publish("conversation:1", str(n))
        expected = [str(n) for n in range(100)]
        assert await _take(here, 100) == expected
        assert await _take(there, 100) == expected
        with pytest.raises(ValueError, match="limit"):
            await one.publish("conversation:1", "x" * 7_001)


@asynccontextmanager
async def _two_hubs(postgres_test_url: str) -> AsyncIterator[tuple[PostgresHub, PostgresHub]]:
    """Two hubs (as two processes would have) on a fresh channel, closed at the end."""
    url = make_url(postgres_test_url)
    channel = f"t{uuid.uuid4().hex[:12]}"
    one = PostgresHub(url, pg_channel=channel)
    two = PostgresHub(url, pg_channel=channel)
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


@asynccontextmanager
async def _publisher_and_listener(
    postgres_test_url: str,
) -> AsyncIterator[tuple[PostgresHub, Subscription]]:
    """Two hubs on a fresh channel: one to publish on (connected: its first event has gone
    out and arrived), and a subscription of the other to ``conversation:1``."""
    async with _two_hubs(postgres_test_url) as (publisher, listener):
        received = await listener.subscribe("conversation:1")
        await publisher.publish("conversation:1", "first")
        assert await _take(received, 1) == ["first"]
        yield publisher, received


@pytest.mark.postgres
async def test_concurrent_postgres_publishes_go_out_batched_in_order_each_once(
    postgres_test_url: str,
) -> None:
    async with _publisher_and_listener(postgres_test_url) as (publisher, received):
        connection = publisher._connection
        assert connection is not None
        statements: list[str] = []
        connection.add_query_logger(lambda record: statements.append(record.query))
        # Every tenth payload is the same: PostgreSQL folds repeats within one transaction,
        # so a batch must not carry one twice.
        payloads = ["again" if n % 10 == 0 else str(n) for n in range(200)]
        await asyncio.gather(*(publisher.publish("conversation:1", p) for p in payloads))

        assert await _take(received, 200) == payloads
        assert 20 <= len(statements) < 100  # a batch per repeat at least, not one per publish


@pytest.mark.postgres
async def test_a_notification_postgres_refuses_fails_alone_not_its_batch(
    postgres_test_url: str,
) -> None:
    async with _publisher_and_listener(postgres_test_url) as (publisher, received):
        # A payload within the limit on a channel so long that the envelope passes
        # PostgreSQL's 8,000 bytes: the server refuses that one notification.
        publishes = [publisher.publish("conversation:1", str(n)) for n in range(3)]
        publishes.append(publisher.publish("c" * 2_000, "x" * 6_500))
        publishes += [publisher.publish("conversation:1", str(n)) for n in range(3, 6)]
        outcomes = await asyncio.gather(*publishes, return_exceptions=True)

        assert [type(outcome) for outcome in outcomes] == [
            *[type(None)] * 3,
            LiveUnavailableError,
            *[type(None)] * 3,
        ]
        assert await _take(received, 6) == [str(n) for n in range(6)]
        with pytest.raises(ValueError, match="NUL"):
            await publisher.publish("conversation:1", "a\x00b")
        await publisher.publish("channel\x00with-a-nul", "fine")  # the channel goes escaped


@pytest.mark.postgres
async def test_closing_the_hub_sends_what_was_published_before(postgres_test_url: str) -> None:
    async with _publisher_and_listener(postgres_test_url) as (publisher, received):
        publishing = [
            asyncio.create_task(publisher.publish("conversation:1", str(n))) for n in range(50)
        ]
        await asyncio.sleep(0)  # every publish is queued, the first batch on its way
        await publisher.close()  # a shutdown right after the writes that announced them

        assert [task.result() for task in publishing] == [None] * 50
        assert await _take(received, 50) == [str(n) for n in range(50)]
        with pytest.raises(HubClosedError):
            await publisher.publish("conversation:1", "late")


async def test_every_publisher_of_a_failed_batch_hears_postgres_is_unreachable() -> None:
    # Nothing listens on port 1: each publisher of the burst gets its own clear error.
    hub = PostgresHub(make_url("postgresql://nobody@127.0.0.1:1/none"), timeout_s=2)
    try:
        outcomes = await asyncio.gather(
            *(hub.publish("conversation:1", str(n)) for n in range(5)), return_exceptions=True
        )
        assert [type(outcome) for outcome in outcomes] == [LiveUnavailableError] * 5
        assert len({id(outcome) for outcome in outcomes}) == 5
    finally:
        await hub.close()


@pytest.mark.postgres
async def test_publishes_do_not_wait_for_a_wal_flush(postgres_test_url: str) -> None:
    # A notification is not durable (only listeners connected now see it), so its autocommit
    # transaction need not wait for the WAL to reach the disk before the next publish.
    hub = PostgresHub(make_url(postgres_test_url), pg_channel=f"t{uuid.uuid4().hex[:12]}")
    try:
        received = await hub.subscribe("conversation:1")
        await hub.publish("conversation:1", "hello")
        assert await _take(received, 1) == ["hello"]
        connection = hub._connection
        assert connection is not None
        assert await connection.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await hub.close()


@pytest.mark.postgres
async def test_without_redis_a_postgres_service_gets_the_postgres_hub(
    postgres_test_url: str, tmp_path: object
) -> None:
    async with Database(DatabaseSettings(DATABASE_URL=postgres_test_url)) as database:
        assert isinstance(create_hub(database), PostgresHub)
        assert isinstance(create_hub(database, redis_url="redis://127.0.0.1:1/0"), RedisHub)


async def test_without_redis_an_sqlite_service_gets_the_local_hub(tmp_path: object) -> None:
    async with Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{tmp_path}/x.db")) as database:
        assert isinstance(create_hub(database), LocalHub)
