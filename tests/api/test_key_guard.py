"""A client address may present only so many API keys that are not known good.

See :mod:`conversations.key_guard`: a key that has not authenticated lately counts against its
address when it is presented; past the limit the address gets 429 with ``Retry-After`` (no
lookup run, and for a write no unit opened). Keys that authenticated lately pass, and are still
looked up every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, HTTPException

from bastion import Database, DatabaseSettings
from conversations.app import create_app
from conversations.key_guard import REMEMBERED_GOOD_KEYS, KeyGuard
from tests.conftest import Users, checkouts, revoke_key

UNKNOWN = {"Authorization": "Bearer cv_" + "u" * 43}
Clients = Callable[[str], httpx.AsyncClient]
Serve = Callable[[str], AbstractAsyncContextManager[tuple[FastAPI, Clients]]]


@pytest.fixture
def serve(settings: DatabaseSettings) -> Serve:
    """The reference service with a given limit, and a client for any address."""

    @asynccontextmanager
    async def serving(rate: str) -> AsyncIterator[tuple[FastAPI, Clients]]:
        app = create_app(settings, failed_key_rate=rate)
        async with LifespanManager(app) as manager:

            def client(address: str) -> httpx.AsyncClient:
                transport = httpx.ASGITransport(app=manager.app, client=(address, 4321))
                return httpx.AsyncClient(transport=transport, base_url="http://test")

            yield app, client

    return serving


async def test_an_address_past_the_limit_is_turned_away_but_known_keys_pass(
    serve: Serve, users: Users
) -> None:
    async with serve("3/minute") as (app, client), client("10.0.0.1") as one:
        # Alice's first request counts (her key is not known yet); then it is remembered.
        assert (await one.get("/v1/conversations", headers=users.alice)).status_code == 200
        for _ in range(2):
            refused = await one.post("/v1/conversations", json={"title": "x"}, headers=UNKNOWN)
            assert refused.status_code == 401
        database: Database = app.state.database
        units, queries = checkouts(app), database.metrics.queries
        for method, url in (("POST", "/v1/conversations"), ("GET", "/v1/conversations")):
            response = await one.request(method, url, json={"title": "x"}, headers=UNKNOWN)
            assert response.status_code == 429, response.text
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.json()["code"] == "too_many_requests"
            assert "unknown API keys" in response.json()["detail"]
        # No lookup ran, and neither request opened a unit: the key is admitted first.
        assert database.metrics.queries == queries
        assert checkouts(app) == units
        kept = await one.post("/v1/conversations", json={"title": "kept"}, headers=users.alice)
        assert kept.status_code == 201  # a remembered key passes (users behind one address)
        assert (await one.get("/v1/conversations", headers=users.bob)).status_code == 429
        async with client("10.0.0.2") as other:  # another address is not affected
            assert (await other.get("/v1/conversations", headers=UNKNOWN)).status_code == 401
            assert (await other.get("/v1/conversations", headers=users.bob)).status_code == 200


async def test_a_burst_sent_in_parallel_is_held_to_the_limit(serve: Serve) -> None:
    # Keys count when presented, not when refused: requests in flight together cannot all
    # slip through before the first of them fails.
    async with serve("3/minute") as (_app, client), client("10.0.0.3") as one:
        responses = await asyncio.gather(
            *(
                one.post("/v1/conversations", json={"title": "x"}, headers=UNKNOWN)
                for _ in range(10)
            )
        )
    assert sorted(r.status_code for r in responses) == [401] * 3 + [429] * 7


async def test_the_address_may_present_keys_again_once_the_window_frees_a_slot(
    serve: Serve,
) -> None:
    async with serve("2/second") as (_app, client), client("10.0.0.4") as one:
        statuses = [
            (await one.get("/v1/conversations", headers=UNKNOWN)).status_code for _ in "abc"
        ]
        assert statuses == [401, 401, 429]
        await asyncio.sleep(1.1)
        assert (await one.get("/v1/conversations", headers=UNKNOWN)).status_code == 401


async def test_a_remembered_key_is_still_looked_up_and_counts_again_once_revoked(
    serve: Serve, users: Users, settings: DatabaseSettings
) -> None:
    async with serve("3/minute") as (_app, client), client("10.0.0.5") as one:
        assert (await one.get("/v1/conversations", headers=users.alice)).status_code == 200  # 1
        await revoke_key(settings, users.alice)
        post = {"json": {"title": "x"}, "headers": users.alice}
        assert (await one.post("/v1/conversations", **post)).status_code == 401  # remembered
        assert (await one.post("/v1/conversations", **post)).status_code == 401  # 2: forgotten
        assert (await one.get("/v1/conversations", headers=UNKNOWN)).status_code == 401  # 3
        assert (await one.post("/v1/conversations", **post)).status_code == 429


async def test_the_guard_remembers_a_bounded_number_of_good_keys() -> None:
    guard = KeyGuard("1/minute")
    for number in range(REMEMBERED_GOOD_KEYS + 1):
        guard.accepted(f"hash-{number}")
    await guard.admit("10.0.0.6", "unknown")  # the address's one key
    await guard.admit("10.0.0.6", f"hash-{REMEMBERED_GOOD_KEYS}")  # remembered: not counted
    with pytest.raises(HTTPException) as raised:
        await guard.admit("10.0.0.6", "hash-0")  # the oldest, forgotten: counted, over
    assert raised.value.status_code == 429
    assert "10.0.0.6" not in repr(guard)  # no address (or key) in its repr


async def test_ipv6_addresses_count_by_their_64_network() -> None:
    guard = KeyGuard("1/minute")
    await guard.admit("2001:db8:0:1::1", "a")
    with pytest.raises(HTTPException):
        await guard.admit("2001:db8:0:1:ffff::2", "b")  # the same /64
    await guard.admit("2001:db8:0:2::1", "c")  # the next /64
    await guard.admit("192.0.2.1", "d")
    with pytest.raises(HTTPException):
        await guard.admit("192.0.2.1", "e")


def test_a_rate_the_limits_library_cannot_read_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="parse rate limit string"):
        KeyGuard("many per minute")
