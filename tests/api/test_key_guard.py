"""A client address that keeps presenting unknown API keys is turned away before its lookups.

See :mod:`conversations.key_guard`: past the limit of failed lookups, the address gets 429 with
``Retry-After`` (no lookup run, and for a write no unit opened), except for keys that
authenticated recently, which are still looked up every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, HTTPException
from sqlalchemy import update

from bastion import Database, DatabaseSettings
from conversations.app import create_app
from conversations.auth import hash_api_key
from conversations.key_guard import REMEMBERED_GOOD_KEYS, KeyGuard
from conversations.models import ApiKey
from tests.conftest import Users

UNKNOWN = {"Authorization": "Bearer cv_" + "u" * 43}
Clients = Callable[[str], httpx.AsyncClient]


@pytest.fixture
async def served(settings: DatabaseSettings) -> AsyncIterator[tuple[FastAPI, Clients]]:
    """The reference service with a limit of 3 failed lookups per second, and a client for
    any address."""
    app = create_app(settings, failed_key_rate="3/second")
    async with AsyncExitStack() as stack:
        manager = await stack.enter_async_context(LifespanManager(app))

        def client(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=manager.app, client=(address, 4321))
            return httpx.AsyncClient(transport=transport, base_url="http://test")

        yield app, client


def checkouts(app: FastAPI) -> float:
    database: Database = app.state.database
    value = database.metrics.registry.get_sample_value("bastion_pool_checkout_seconds_count")
    return float(value or 0.0)


async def test_an_address_past_the_limit_is_turned_away_before_any_unit(
    served: tuple[FastAPI, Clients], users: Users
) -> None:
    app, client = served
    async with client("10.0.0.1") as one, client("10.0.0.2") as other:
        assert (await one.get("/v1/conversations", headers=users.alice)).status_code == 200
        for _ in range(3):
            refused = await one.post("/v1/conversations", json={"title": "x"}, headers=UNKNOWN)
            assert refused.status_code == 401
        database: Database = app.state.database
        units, queries = checkouts(app), database.metrics.queries
        for method, url in (("POST", "/v1/conversations"), ("GET", "/v1/conversations")):
            response = await one.request(method, url, json={"title": "x"}, headers=UNKNOWN)
            assert response.status_code == 429, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["code"] == "too_many_requests"
            assert "unknown API keys" in response.json()["detail"]
        # No lookup ran; the write opened no unit (a read opens its unit before its key).
        assert database.metrics.queries == queries
        assert checkouts(app) == units + 1
        # A key that authenticated lately still passes (users behind the same address)...
        kept = await one.post("/v1/conversations", json={"title": "kept"}, headers=users.alice)
        assert kept.status_code == 201
        # ...one that did not waits for the window, as the address's unknown keys do...
        assert (await one.get("/v1/conversations", headers=users.bob)).status_code == 429
        # ...and other addresses are not affected.
        assert (await other.get("/v1/conversations", headers=UNKNOWN)).status_code == 401
        assert (await other.get("/v1/conversations", headers=users.bob)).status_code == 200
        await asyncio.sleep(1.1)  # the window passes
        assert (await one.get("/v1/conversations", headers=users.bob)).status_code == 200
        assert (await one.get("/v1/conversations", headers=UNKNOWN)).status_code == 401


async def test_a_remembered_key_is_still_looked_up_and_refused_once_revoked(
    served: tuple[FastAPI, Clients], users: Users, settings: DatabaseSettings
) -> None:
    _app, client = served
    async with client("10.0.0.3") as one:
        assert (await one.get("/v1/conversations", headers=users.alice)).status_code == 200
        for _ in range(3):
            assert (await one.get("/v1/conversations", headers=UNKNOWN)).status_code == 401
        alice_key = users.alice["Authorization"].removeprefix("Bearer ")
        async with Database(settings) as database, database.write_connection() as connection:
            await connection.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_api_key(alice_key))
                .values(revoked_at=datetime.now(UTC))
            )
        response = await one.post("/v1/conversations", json={"title": "x"}, headers=users.alice)
        assert response.status_code == 401
        listed = await one.get("/v1/conversations", headers=users.bob)
        assert listed.status_code == 429  # bob never authenticated here: the address waits


async def test_the_guard_remembers_a_bounded_number_of_good_keys() -> None:
    guard = KeyGuard("1/minute")
    for number in range(REMEMBERED_GOOD_KEYS + 1):
        guard.accepted(f"hash-{number}")
    await guard.refused("10.0.0.4")
    await guard.refused("10.0.0.4")  # past the limit: turned away for the window
    guard.admit("10.0.0.4", f"hash-{REMEMBERED_GOOD_KEYS}")  # remembered: passes
    with pytest.raises(HTTPException) as raised:
        guard.admit("10.0.0.4", "hash-0")  # the oldest, forgotten
    assert raised.value.status_code == 429
    guard.admit("10.0.0.5", "hash-0")  # another address: nothing to wait for
    assert "10.0.0.4" not in repr(guard)  # no address or key in its repr


def test_a_rate_the_limits_library_cannot_read_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="parse rate limit string"):
        KeyGuard("many per minute")
