"""``WS /v1/conversations/{id}/stream`` under real uvicorn workers.

Messages are posted over HTTP to the reference service, whose message routes announce each
one after its transaction committed and before answering.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket as sockets_api
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bastion import Database, DatabaseSettings
from conversations.live_events import message_channel
from conversations.routes.stream import (
    CLOSE_NOT_FOUND,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
)
from conversations.schemas import MAX_BATCH_MESSAGES
from conversations.users import create_user
from tests.live.workers import Worker, running

QUEUE_SIZE = 32


class Service:
    """Two workers on one database and one Redis prefix, and two users."""

    def __init__(self, workers: list[Worker], alice: str, bob: str, redis_prefix: str) -> None:
        self.workers = workers
        self.alice = alice
        self.bob = bob
        self.redis_prefix = redis_prefix

    def headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def conversation(self, key: str) -> str:
        async with httpx.AsyncClient(base_url=self.workers[0].http) as client:
            created = await client.post(
                "/v1/conversations", json={"title": "live"}, headers=self.headers(key)
            )
        assert created.status_code == 201
        return str(created.json()["id"])

    async def post(self, worker: Worker, key: str, conversation: str, content: str) -> int:
        async with httpx.AsyncClient(base_url=worker.http, timeout=30) as client:
            response = await client.post(
                f"/v1/conversations/{conversation}/messages",
                json={"role": "user", "content": content},
                headers=self.headers(key),
            )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])


ENV = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5", "LIVE_QUEUE_SIZE": str(QUEUE_SIZE)}


@asynccontextmanager
async def _service(url: str, env: dict[str, str]) -> AsyncIterator[Service]:
    env = {**ENV, **env, "DATABASE_URL": url}
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        suffix = uuid.uuid4().hex[:8]
        alice = await create_user(database, f"alice-{suffix}")
        bob = await create_user(database, f"bob-{suffix}")
    async with running(2, env) as workers:
        yield Service(workers, alice, bob, env["CACHE_PREFIX"])


@pytest.fixture(scope="module")
async def sqlite_redis_service(
    sqlite_template: Path, shared_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    """Two workers on one SQLite file, live updates over Redis pub/sub."""
    path = tmp_path_factory.mktemp("live") / "live.db"
    shutil.copyfile(sqlite_template, path)
    env = {"REDIS_URL": shared_redis_url, "CACHE_PREFIX": f"live-test:{uuid.uuid4().hex[:10]}:"}
    async with _service(f"sqlite:///{path}", env) as service:
        yield service


@pytest.fixture(scope="module")
async def postgres_notify_service(postgres_test_url: str) -> AsyncIterator[Service]:
    """Two workers on PostgreSQL without Redis: live updates over LISTEN/NOTIFY."""
    env = {"CACHE_PREFIX": f"live{uuid.uuid4().hex[:10]}"}  # names the NOTIFY channel
    async with _service(postgres_test_url, env) as service:
        yield service


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite_redis_service", id="sqlite-redis"),
        pytest.param("postgres_notify_service", id="postgresql-notify", marks=pytest.mark.postgres),
    ],
)
def service(request: pytest.FixtureRequest) -> Service:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


async def _stream(
    worker: Worker, conversation: str, *, headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None, **options: Any,
) -> ClientConnection:  # fmt: skip
    return await connect(
        f"{worker.ws}/v1/conversations/{conversation}/stream",
        additional_headers=headers,
        subprotocols=subprotocols,  # type: ignore[arg-type]
        max_size=None,
        open_timeout=20,
        **options,
    )


async def _close_code(socket: ClientConnection) -> int | None:
    async with asyncio.timeout(20):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await socket.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_a_stream_without_a_valid_key_or_on_a_foreign_conversation_is_refused(
    service: Service,
) -> None:
    worker = service.workers[0]
    alices = await service.conversation(service.alice)
    cases = [
        (alices, None, None, CLOSE_UNAUTHORIZED),
        (alices, {"Authorization": "Bearer cv_not-a-key"}, None, CLOSE_UNAUTHORIZED),
        (alices, {"Authorization": "Basic abc"}, None, CLOSE_UNAUTHORIZED),
        (alices, service.headers(service.bob), None, CLOSE_NOT_FOUND),  # bob's view: no such
        (str(uuid.uuid4()), service.headers(service.alice), None, CLOSE_NOT_FOUND),
        ("not-a-uuid", service.headers(service.alice), None, CLOSE_NOT_FOUND),
        (alices, None, ["bearer", "cv_wrong"], CLOSE_UNAUTHORIZED),
    ]
    for conversation, headers, subprotocols, code in cases:
        socket = await _stream(worker, conversation, headers=headers, subprotocols=subprotocols)
        assert await _close_code(socket) == code, (headers, subprotocols)


async def test_an_address_presenting_too_many_unknown_keys_is_told_to_come_back_later(
    sqlite_template: Path, shared_redis_url: str, tmp_path: Path
) -> None:
    # The key guard (conversations.key_guard) counts a stream's key as it counts a request's.
    path = tmp_path / "guarded.db"
    shutil.copyfile(sqlite_template, path)
    env = {
        "REDIS_URL": shared_redis_url,
        "CACHE_PREFIX": f"live-test:{uuid.uuid4().hex[:10]}:",
        "API_FAILED_KEY_RATE": "2/minute",
    }
    async with _service(f"sqlite:///{path}", env) as service:
        worker = service.workers[0]
        conversation = await service.conversation(service.alice)  # alice's key: 1 of 2
        unknown = service.headers("cv_" + "u" * 43)
        codes = []
        for _ in range(2):
            socket = await _stream(worker, conversation, headers=unknown)
            codes.append(await _close_code(socket))
        assert codes == [CLOSE_UNAUTHORIZED, CLOSE_TRY_LATER]
        # Alice's key authenticated on this worker: it still opens a stream.
        async with await _stream(
            worker, conversation, headers=service.headers(service.alice)
        ) as socket:
            posted = await service.post(worker, service.alice, conversation, "still here")
            async with asyncio.timeout(20):
                assert json.loads(await socket.recv())["id"] == posted


async def test_a_key_in_the_subprotocol_is_accepted_and_never_echoed(service: Service) -> None:
    worker = service.workers[0]
    conversation = await service.conversation(service.alice)
    async with await _stream(
        worker, conversation, subprotocols=["bearer", service.alice]
    ) as socket:
        assert socket.subprotocol == "bearer"
        posted = await service.post(worker, service.alice, conversation, "hello")
        async with asyncio.timeout(20):
            received = json.loads(await socket.recv())
    assert received["id"] == posted
    assert received["content"] == "hello"


async def test_a_client_on_one_worker_gets_messages_posted_on_the_other_in_order_once(
    service: Service,
) -> None:
    here, there = service.workers
    conversation = await service.conversation(service.alice)
    async with await _stream(here, conversation, headers=service.headers(service.alice)) as socket:
        posted = []
        for n in range(30):
            # Mostly through the other worker; a large one takes the reference path on
            # PostgreSQL (notifications carry at most ~8 KB).
            content = "x" * 20_000 if n == 7 else f"message {n}"
            posted.append(await service.post(there if n % 3 else here, service.alice,
                                             conversation, content))  # fmt: skip
        async with httpx.AsyncClient(base_url=there.http, timeout=30) as client:
            batch = await client.post(
                f"/v1/conversations/{conversation}/messages:batch",
                json={"messages": [{"role": "user", "content": f"batch {n}"} for n in range(3)]},
                headers=service.headers(service.alice),
            )
        assert batch.status_code == 201, batch.text
        posted += [result["message"]["id"] for result in batch.json()["results"]]
        received = []
        async with asyncio.timeout(30):
            while len(received) < len(posted):
                received.append(json.loads(await socket.recv()))
            last = await service.post(there, service.alice, conversation, "last")
            after = json.loads(await socket.recv())
    assert [message["id"] for message in received] == posted
    assert received[7]["content"] == "x" * 20_000
    assert received[3]["content"] == "message 3"
    assert [message["content"] for message in received[-3:]] == ["batch 0", "batch 1", "batch 2"]
    assert after["id"] == last  # nothing arrived twice in between


async def test_200_idle_streams_hold_no_database_connection_and_all_get_the_message(
    sqlite_redis_service: Service,
) -> None:
    service = sqlite_redis_service
    worker, other = service.workers
    conversation = await service.conversation(service.alice)
    headers = service.headers(service.alice)
    sockets = await asyncio.gather(
        *(_stream(worker, conversation, headers=headers) for _ in range(200))
    )
    try:
        await asyncio.sleep(0.2)  # let every handler settle into waiting
        assert await worker.checked_out() == 0
        posted = await service.post(other, service.alice, conversation, "to everyone")

        async def first(socket: ClientConnection) -> int:
            async with asyncio.timeout(30):
                return int(json.loads(await socket.recv())["id"])

        assert await asyncio.gather(*(first(socket) for socket in sockets)) == [posted] * 200
        assert await worker.checked_out() == 0
    finally:
        await asyncio.gather(*(socket.close() for socket in sockets))


async def test_a_client_that_stops_reading_is_disconnected_with_the_slow_consumer_code(
    sqlite_redis_service: Service, shared_redis_url: str
) -> None:
    service = sqlite_redis_service
    worker = service.workers[0]
    conversation = await service.conversation(service.alice)
    # A reader that stops: a small receive buffer (no autotuning to 32 MB on loopback), no
    # compression (which would shrink the events to nothing), one queued message at most.
    raw = sockets_api.socket()
    raw.setsockopt(sockets_api.SOL_SOCKET, sockets_api.SO_RCVBUF, 65536)
    raw.connect(("127.0.0.1", worker.port))
    raw.setblocking(False)
    stream = await _stream(
        worker, conversation, headers=service.headers(service.alice),
        sock=raw, compression=None, max_queue=1,
    )  # fmt: skip
    client = aioredis.Redis.from_url(shared_redis_url)
    events = 300
    try:
        # 300 events of 50 KB: far more than the socket buffers and the 32-event queue hold.
        channel = f"{service.redis_prefix}live:{message_channel(uuid.UUID(conversation))}"
        for n in range(events):
            event = {"id": 10_000_000 + n, "conversation_id": conversation, "role": "user",
                     "content": "y" * 50_000, "metadata": {}, "sources": [],
                     "created_at": "2026-01-01T00:00:00Z"}  # fmt: skip
            await client.publish(channel, json.dumps(event))
        await asyncio.sleep(0.5)  # the client has read nothing meanwhile
        received = 0
        async with asyncio.timeout(30):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await stream.recv()
                    received += 1
    finally:
        await client.aclose()
        await stream.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_SLOW_CONSUMER
    assert received < events


async def test_a_batch_of_1000_reaches_a_live_stream_whole_in_order_without_4429(
    sqlite_redis_service: Service,
) -> None:
    # LIVE_QUEUE_SIZE is 32 here: the batch must not be 1,000 events for the stream's queue.
    service = sqlite_redis_service
    here, there = service.workers
    conversation = await service.conversation(service.alice)
    contents = [{"role": "user", "content": f"batch {n}"} for n in range(MAX_BATCH_MESSAGES)]
    async with await _stream(here, conversation, headers=service.headers(service.alice)) as socket:
        async with httpx.AsyncClient(base_url=there.http, timeout=60) as client:
            batch = await client.post(
                f"/v1/conversations/{conversation}/messages:batch",
                json={"messages": contents},
                headers=service.headers(service.alice),
            )
        assert batch.status_code == 201, batch.text
        posted = [result["message"]["id"] for result in batch.json()["results"]]
        async with asyncio.timeout(60):
            received = [json.loads(await socket.recv()) for _ in range(MAX_BATCH_MESSAGES)]
    assert [message["id"] for message in received] == posted
    assert [message["content"] for message in received] == [
        f"batch {n}" for n in range(MAX_BATCH_MESSAGES)
    ]
