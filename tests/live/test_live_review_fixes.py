"""Review findings (issue 8 follow-up): bad messages on Redis, failed publishes, big batches."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect

from bastion import Database, DatabaseSettings
from bastion.cache import CacheSettings
from bastion.live import DEFAULT_QUEUE_SIZE, LiveUnavailableError, LocalHub, PostgresHub, RedisHub
from conversations.live_events import message_channel, publish_messages
from conversations.schemas import MAX_BATCH_MESSAGES
from conversations.users import create_user
from tests.cache.redis_server import RedisServer
from tests.live.workers import running


async def _get(subscription: object) -> str:
    async with asyncio.timeout(10):
        return await subscription.get()  # type: ignore[attr-defined,no-any-return]


async def test_a_message_that_is_not_utf8_is_skipped_and_the_listener_goes_on(
    cache_settings: CacheSettings,
) -> None:
    url = cache_settings.redis_url.get_secret_value()  # type: ignore[union-attr]
    hub = RedisHub(url, prefix=cache_settings.prefix)
    raw = aioredis.Redis.from_url(url)
    try:
        subscription = await hub.subscribe("c")
        await raw.publish(f"{cache_settings.prefix}live:c", b"\xff\xfe not utf-8")
        await raw.publish(f"{cache_settings.prefix}live:\xff", b"x")  # a bad channel name too
        await hub.publish("c", "after")
        assert await _get(subscription) == "after"
        assert not subscription.ended.is_set()
    finally:
        await raw.aclose()
        await hub.close()


async def test_a_listener_that_ended_is_started_again_by_the_next_subscribe(
    cache_settings: CacheSettings,
) -> None:
    hub = RedisHub(cache_settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
                   prefix=cache_settings.prefix)  # fmt: skip
    try:
        first = await hub.subscribe("c")
        listener = hub._listener
        assert listener is not None
        listener.cancel()  # however it ended
        with pytest.raises(LiveUnavailableError):
            await _get(first)
        second = await hub.subscribe("c")
        await hub.publish("c", "again")
        assert await _get(second) == "again"
    finally:
        await hub.close()


async def test_a_failed_publish_tells_this_channels_streams_to_reconnect(
    redis_server: RedisServer,
) -> None:
    hub = RedisHub(redis_server.url, prefix="pf:", timeout_s=0.3)
    cid, other = uuid.uuid4(), uuid.uuid4()
    messages = [json.dumps({"id": n, "content": f"m{n}"}) for n in range(5)]
    try:
        subscription = await hub.subscribe(message_channel(cid))
        bystander = await hub.subscribe(message_channel(other))
        assert await publish_messages(hub, cid, messages[:2]) is True
        assert [json.loads(await _get(subscription))] == [[json.loads(m) for m in messages[:2]]]
        redis_server.pause()  # the pub/sub connection stays up: only the publish fails
        try:
            published = await publish_messages(hub, cid, messages[2:])
        finally:
            redis_server.resume()
        with pytest.raises(LiveUnavailableError):
            await _get(subscription)  # the stream closes with 1013 and catches up by cursor
        assert not bystander.ended.is_set()  # other conversations are not affected
    finally:
        await hub.close()
    assert published is False


@pytest.mark.parametrize("limit", [PostgresHub.max_payload_bytes, RedisHub.max_payload_bytes])
async def test_a_full_batch_fits_the_default_queue_of_a_reader_that_has_not_read_yet(
    limit: int,
) -> None:
    hub = LocalHub()  # DEFAULT_QUEUE_SIZE, every event delivered before the reader reads one
    hub.max_payload_bytes = limit
    cid = uuid.uuid4()
    subscription = await hub.subscribe(message_channel(cid))
    # The worst case: every message just under the inline size, or just over (a reference).
    inline = limit // 16
    messages = []
    for n in range(MAX_BATCH_MESSAGES):
        padding = "x" * (inline - 40 if n % 2 else inline + 10)
        messages.append(json.dumps({"id": n, "content": padding}))
    assert await publish_messages(hub, cid, messages) is True
    assert not subscription.ended.is_set()
    assert subscription.pending <= DEFAULT_QUEUE_SIZE // 2  # room for other writers too
    received: list[dict[str, object]] = []
    while len(received) < MAX_BATCH_MESSAGES:
        received += json.loads(await _get(subscription))
    assert [message["id"] for message in received] == list(range(MAX_BATCH_MESSAGES))
    assert all(message.get("ref") for message in received[::2])  # over the size: references
    assert all("content" in message for message in received[1::2])
    assert max(len(json.dumps(m)) for m in received) <= limit


async def test_a_batch_of_1000_reaches_a_stream_of_a_single_process_service_without_4429(
    sqlite_template: Path, tmp_path: Path
) -> None:
    # One worker without Redis: the local hub hands every event of the batch to the stream's
    # queue before the stream can send one, so this is the worst case of LIVE_QUEUE_SIZE
    # (left at its default here).
    path = tmp_path / "batch.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        key = await create_user(database, "fay")
    headers = {"Authorization": f"Bearer {key}"}
    contents = [{"role": "user", "content": f"b{n}"} for n in range(MAX_BATCH_MESSAGES)]
    async with (
        running(1, {"DATABASE_URL": url}) as (worker,),
        httpx.AsyncClient(base_url=worker.http, timeout=60, headers=headers) as client,
    ):
        created = await client.post("/v1/conversations", json={"title": "t"})
        cid = created.json()["id"]
        stream_url = f"{worker.ws}/v1/conversations/{cid}/stream"
        async with connect(stream_url, additional_headers=headers, max_size=None) as socket:
            batch = await client.post(
                f"/v1/conversations/{cid}/messages:batch", json={"messages": contents}
            )
            assert batch.status_code == 201, batch.text
            async with asyncio.timeout(60):
                received = [json.loads(await socket.recv()) for _ in contents]
    assert [m["id"] for m in received] == [r["message"]["id"] for r in batch.json()["results"]]
    assert [m["content"] for m in received] == [c["content"] for c in contents]


@pytest.mark.postgres
async def test_a_full_size_batch_event_of_json_fits_a_postgres_notification(
    postgres_test_url: str,
) -> None:
    # A packed batch event is close to max_payload_bytes and full of quotes (and escapes):
    # the hub's envelope must not grow it past PostgreSQL's 8,000 bytes.
    hub = PostgresHub(make_url(postgres_test_url), pg_channel=f"t{uuid.uuid4().hex[:12]}")
    cid = uuid.uuid4()
    messages = [json.dumps({"id": n, "content": '"é\\' * 40}) for n in range(40)]
    try:
        subscription = await hub.subscribe(message_channel(cid))
        assert await publish_messages(hub, cid, messages) is True
        received: list[dict[str, object]] = []
        while len(received) < len(messages):
            received += json.loads(await _get(subscription))
    finally:
        await hub.close()
    assert received == [json.loads(m) for m in messages]


@pytest.mark.postgres
async def test_publishers_cancelled_mid_notify_leave_the_connection_usable(
    postgres_test_url: str,
) -> None:
    # A request cancelled during its NOTIFY (its client gone) must not leave the hub's one
    # connection mid-statement for the next publisher. (S1 in CI met the neighbouring case,
    # asyncpg's "another operation is in progress" after a server restart, as a 500 for a
    # committed write; that one is now a LiveUnavailableError and a reconnect, and S1 covers it.)
    hub = PostgresHub(make_url(postgres_test_url), pg_channel=f"t{uuid.uuid4().hex[:12]}")
    try:
        subscription = await hub.subscribe("ch")
        for turns in range(6):  # cancel after 0..5 loop turns: before, during, after the send
            publishing = asyncio.create_task(hub.publish("ch", f"cancelled-{turns}"))
            for _ in range(turns):
                await asyncio.sleep(0)
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await hub.publish("ch", f"after-{turns}")  # must not raise
        received = []
        while len(received) < 6 or not received[-1].startswith("after-5"):
            received.append(await _get(subscription))
    finally:
        await hub.close()
    assert [event for event in received if event.startswith("after-")] == [
        f"after-{turns}" for turns in range(6)
    ]
