"""A stream when Redis goes away: open streams are told to reconnect (1013), new ones are
refused with the same code until Redis is back, and then streams work again."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bastion import Database, DatabaseSettings
from conversations.routes.stream import CLOSE_TRY_LATER
from conversations.users import create_user
from tests.cache.redis_server import RedisServer
from tests.live.workers import running


async def _closed_with(url: str, headers: dict[str, str]) -> int | None:
    async with connect(url, additional_headers=headers, open_timeout=20) as socket:
        async with asyncio.timeout(20):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await socket.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_streams_are_told_to_reconnect_while_redis_is_down_and_work_after(
    sqlite_template: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "outage.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        key = await create_user(database, "dana")
    headers = {"Authorization": f"Bearer {key}"}
    env = {"DATABASE_URL": url, "REDIS_URL": redis_server.url, "CACHE_PREFIX": "outage:"}
    async with running(1, env) as (worker,):
        async with httpx.AsyncClient(base_url=worker.http) as client:
            created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
        stream_url = f"{worker.ws}/v1/conversations/{created.json()['id']}/stream"

        async with connect(stream_url, additional_headers=headers, open_timeout=20) as socket:
            await asyncio.to_thread(redis_server.stop)
            async with asyncio.timeout(20):
                with pytest.raises(ConnectionClosed) as closed:
                    await socket.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == CLOSE_TRY_LATER

        assert await _closed_with(stream_url, headers) == CLOSE_TRY_LATER

        await asyncio.to_thread(redis_server.start)
        async with asyncio.timeout(30):
            while True:  # the worker reconnects in the background, with backoff
                socket = await connect(stream_url, additional_headers=headers, open_timeout=20)
                try:
                    async with httpx.AsyncClient(base_url=worker.http) as client:
                        posted = await client.post(
                            f"/v1/conversations/{created.json()['id']}/messages",
                            json={"role": "user", "content": f"back {uuid.uuid4()}"},
                            headers=headers,
                        )
                    assert posted.status_code == 201
                    received = json.loads(await socket.recv())
                    break
                except ConnectionClosed:
                    await asyncio.sleep(0.5)
                finally:
                    await socket.close()
    assert received["id"] == posted.json()["id"]


async def test_a_message_that_cannot_be_published_closes_the_stream_with_1013(
    sqlite_template: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "publish.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        key = await create_user(database, "erin")
    headers = {"Authorization": f"Bearer {key}"}
    env = {"DATABASE_URL": url, "REDIS_URL": redis_server.url, "CACHE_PREFIX": "publish:"}
    async with (
        running(1, env) as (worker,),
        httpx.AsyncClient(base_url=worker.http, timeout=30) as client,
    ):
        created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
        cid = created.json()["id"]
        stream_url = f"{worker.ws}/v1/conversations/{cid}/stream"
        async with connect(stream_url, additional_headers=headers, open_timeout=20) as socket:
            # Frozen, Redis keeps the pub/sub connection open: only the publish fails.
            redis_server.pause()
            try:
                posted = await client.post(
                    f"/v1/conversations/{cid}/messages",
                    json={"role": "user", "content": "stored, not announced"},
                    headers=headers,
                )
            finally:
                redis_server.resume()
            async with asyncio.timeout(20):
                with pytest.raises(ConnectionClosed) as closed:
                    await socket.recv()
        missed = await client.get(f"/v1/conversations/{cid}/messages", headers=headers)
    assert posted.status_code == 201  # the message is stored whatever the hub
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_TRY_LATER
    assert [m["id"] for m in missed.json()["items"]] == [posted.json()["id"]]  # caught up
