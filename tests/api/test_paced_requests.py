"""The reference service paces request starts on SQLite (TurnBudgetMiddleware) and limits
requests in flight on PostgreSQL (InFlightLimitMiddleware), and a paced or limited request
loses nothing: every concurrent write is stored, every read answered, in full."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from bastion import DatabaseSettings
from bastion.fastapi import InFlightLimitMiddleware, TurnBudgetMiddleware
from conversations.app import create_app
from tests.conftest import Users, new_conversation, serve

MiddlewareT = TypeVar("MiddlewareT")


def with_only(app: FastAPI, middleware: type[Any], **options: Any) -> FastAPI:
    """``app`` with ``middleware`` (built with ``options``) in place of the service's pacing
    or limiting middleware, outermost, where the service puts it."""
    app.user_middleware = [
        entry
        for entry in app.user_middleware
        if entry.cls not in (TurnBudgetMiddleware, InFlightLimitMiddleware)
    ]
    app.add_middleware(middleware, **options)
    return app


def paced_tightly(app: FastAPI) -> FastAPI:
    """``app`` pacing request starts with a budget of a nanosecond: in a busy turn, every
    request after the first waits for a later one."""
    return with_only(app, TurnBudgetMiddleware, budget_s=1e-9)


def running(app: FastAPI, middleware: type[MiddlewareT]) -> MiddlewareT:
    """The running app's instance of ``middleware`` (Starlette builds the stack on first
    call)."""
    layer: Any = app.middleware_stack
    while not isinstance(layer, middleware):
        layer = layer.app
    return layer


def add_messages(client: httpx.AsyncClient, users: Users, cid: str, count: int) -> list[Any]:
    """``count`` requests adding a message each to conversation ``cid`` (not yet awaited)."""
    return [
        client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": f"message {n}"},
            headers=users.alice,
        )
        for n in range(count)
    ]


async def stored_contents(client: httpx.AsyncClient, users: Users, cid: str) -> list[str]:
    """The contents of conversation ``cid``'s messages, sorted."""
    page = await client.get(f"/v1/conversations/{cid}/messages?limit=100", headers=users.alice)
    return sorted(message["content"] for message in page.json()["items"])


async def test_the_service_paces_starts_on_sqlite_and_limits_in_flight_on_postgresql(
    settings: DatabaseSettings, backend: str
) -> None:
    entries = create_app(settings).user_middleware
    classes = [entry.cls for entry in entries]
    assert (TurnBudgetMiddleware in classes) == (backend == "sqlite")
    assert (InFlightLimitMiddleware in classes) == (backend == "postgresql")
    for entry in entries:
        if entry.cls is InFlightLimitMiddleware:
            # A request waits for its place no longer than for a pool connection.
            assert entry.kwargs["max_wait_s"] == settings.pool_timeout_s
            # A fixed limit: a range climbs during an outage and slows recovery (finding 40).
            assert "min_in_flight" not in entry.kwargs


async def test_requests_limited_to_one_in_flight_are_all_served_in_full(
    settings: DatabaseSettings, users: Users
) -> None:
    app = with_only(create_app(settings), InFlightLimitMiddleware, max_in_flight=1)
    async with serve(app) as client:
        cid = await new_conversation(client, users)
        writes = add_messages(client, users, cid, 20)
        reads = [client.get(f"/v1/conversations/{cid}", headers=users.alice) for _ in range(20)]
        responses = await asyncio.gather(*writes, *reads, client.get("/health/live"))
        assert [r.status_code for r in responses] == [201] * 20 + [200] * 21
        assert await stored_contents(client, users, cid) == sorted(
            f"message {n}" for n in range(20)
        )
    assert running(app, InFlightLimitMiddleware).waited > 0  # one at a time: others waited


async def test_paced_concurrent_requests_are_all_served_in_full(
    settings: DatabaseSettings, users: Users
) -> None:
    app = paced_tightly(create_app(settings))
    async with serve(app) as client:
        cid = await new_conversation(client, users)
        writes = add_messages(client, users, cid, 30)
        reads = [client.get(f"/v1/conversations/{cid}", headers=users.alice)]
        reads += [
            client.get(f"/v1/conversations/{cid}/messages?limit=5", headers=users.alice)
            for _ in range(30)
        ]
        probes = [client.get("/health/live") for _ in range(5)]
        responses = await asyncio.gather(*writes, *reads, *probes)

        assert [r.status_code for r in responses] == [201] * 30 + [200] * 36
        # the nanosecond budget did make requests wait
        assert running(app, TurnBudgetMiddleware).deferred > 0
        assert await stored_contents(client, users, cid) == sorted(
            f"message {n}" for n in range(30)
        )


async def test_the_pacing_counters_are_scraped_with_the_database_metrics(
    settings: DatabaseSettings, users: Users
) -> None:
    app = paced_tightly(create_app(settings))
    async with serve(app) as client:
        cid = await new_conversation(client, users)
        reads = [client.get(f"/v1/conversations/{cid}", headers=users.alice) for _ in range(20)]
        assert {r.status_code for r in await asyncio.gather(*reads)} == {200}
        budget = running(app, TurnBudgetMiddleware)
        scraped = (await client.get("/metrics")).text

    assert f"bastion_requests_paced_total {float(budget.paced)}" in scraped
    assert f"bastion_requests_deferred_total {float(budget.deferred)}" in scraped
    assert "bastion_requests_paced_abandoned_total 0.0" in scraped
    assert budget.paced == 21  # the POST and the 20 reads; /metrics is not paced
    assert budget.deferred > 0
    assert "bastion_pool_checkout_seconds_count" in scraped  # the Database's, still there


async def test_without_the_middleware_the_metrics_have_no_pacing_counters(
    settings: DatabaseSettings, users: Users
) -> None:
    app = create_app(settings)
    app.user_middleware = [e for e in app.user_middleware if e.cls is not TurnBudgetMiddleware]
    async with serve(app) as client:
        assert (await client.get("/v1/conversations", headers=users.alice)).status_code == 200
        scraped = (await client.get("/metrics")).text
    assert "bastion_requests_paced" not in scraped
    assert "bastion_pool_checkout_seconds_count" in scraped


async def test_the_limit_counters_are_scraped_with_the_database_metrics(
    settings: DatabaseSettings, users: Users
) -> None:
    app = with_only(create_app(settings), InFlightLimitMiddleware, max_in_flight=1)
    async with serve(app) as client:
        cid = await new_conversation(client, users)
        # Writes: on SQLite a read runs through without yielding, so no one would wait.
        writes = add_messages(client, users, cid, 10)
        assert {r.status_code for r in await asyncio.gather(*writes)} == {201}
        limit = running(app, InFlightLimitMiddleware)
        scraped = (await client.get("/metrics")).text

    assert limit.limited == 11  # the conversation and 10 messages; /metrics is not limited
    assert limit.waited > 0
    assert f"bastion_requests_limited_total {float(limit.limited)}" in scraped
    assert f"bastion_requests_in_flight_limit {float(sum(limit.limits()))}" in scraped
    assert f"bastion_requests_waited_total {float(limit.waited)}" in scraped
    assert "bastion_requests_shed_total 0.0" in scraped
    assert "bastion_requests_abandoned_total 0.0" in scraped
    assert "bastion_requests_paced" not in scraped  # the other middleware is not there
    assert "bastion_pool_checkout_seconds_count" in scraped
