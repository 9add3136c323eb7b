"""The reference service paces request starts on SQLite (TurnBudgetMiddleware) and limits
requests in flight on PostgreSQL (InFlightLimitMiddleware), and a paced or limited request
loses nothing: every concurrent write is stored, every read answered, in full."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from bastion import DatabaseSettings
from bastion.fastapi import InFlightLimitMiddleware, TurnBudgetMiddleware
from conversations.app import create_app
from tests.conftest import Users, serve


def paced_tightly(app: FastAPI) -> None:
    """Pace ``app``'s request starts with a budget of a nanosecond: in a busy turn, every
    request after the first waits for a later one. (Outermost, where the service puts it.)"""
    app.user_middleware = [e for e in app.user_middleware if e.cls is not TurnBudgetMiddleware]
    app.add_middleware(TurnBudgetMiddleware, budget_s=1e-9)


def turn_budget_of(app: FastAPI) -> TurnBudgetMiddleware:
    """The running app's TurnBudgetMiddleware (Starlette builds the stack on first call)."""
    layer: Any = app.middleware_stack
    while not isinstance(layer, TurnBudgetMiddleware):
        layer = layer.app
    return layer


async def test_the_service_paces_starts_on_sqlite_and_limits_in_flight_on_postgresql(
    settings: DatabaseSettings, backend: str
) -> None:
    classes = [entry.cls for entry in create_app(settings).user_middleware]
    assert (TurnBudgetMiddleware in classes) == (backend == "sqlite")
    assert (InFlightLimitMiddleware in classes) == (backend == "postgresql")


async def test_requests_limited_to_one_in_flight_are_all_served_in_full(
    settings: DatabaseSettings, users: Users
) -> None:
    app = create_app(settings)
    app.user_middleware = [
        e
        for e in app.user_middleware
        if e.cls not in (TurnBudgetMiddleware, InFlightLimitMiddleware)
    ]
    app.add_middleware(InFlightLimitMiddleware, max_in_flight=1)
    async with serve(app) as client:
        created = await client.post("/v1/conversations", json={"title": "one"}, headers=users.alice)
        cid = created.json()["id"]
        writes = [
            client.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": "user", "content": f"message {n}"},
                headers=users.alice,
            )
            for n in range(20)
        ]
        reads = [client.get(f"/v1/conversations/{cid}", headers=users.alice) for _ in range(20)]
        responses = await asyncio.gather(*writes, *reads, client.get("/health/live"))
        assert [r.status_code for r in responses] == [201] * 20 + [200] * 21
        page = await client.get(f"/v1/conversations/{cid}/messages?limit=100", headers=users.alice)
    assert page.json()["total"] == 20
    limit: Any = app.middleware_stack
    while not isinstance(limit, InFlightLimitMiddleware):
        limit = limit.app
    assert limit.waited > 0  # one at a time: the others did wait


async def test_paced_concurrent_requests_are_all_served_in_full(
    settings: DatabaseSettings, users: Users
) -> None:
    app = create_app(settings)
    paced_tightly(app)
    async with serve(app) as client:
        created = await client.post(
            "/v1/conversations", json={"title": "paced"}, headers=users.alice
        )
        cid = created.json()["id"]
        writes = [
            client.post(
                f"/v1/conversations/{cid}/messages",
                json={"role": "user", "content": f"message {n}"},
                headers=users.alice,
            )
            for n in range(30)
        ]
        reads = [client.get(f"/v1/conversations/{cid}", headers=users.alice)]
        reads += [
            client.get(f"/v1/conversations/{cid}/messages?limit=5", headers=users.alice)
            for _ in range(30)
        ]
        probes = [client.get("/health/live") for _ in range(5)]
        responses = await asyncio.gather(*writes, *reads, *probes)

        assert [r.status_code for r in responses] == [201] * 30 + [200] * 36
        budget = turn_budget_of(app)
        assert budget.deferred > 0  # the nanosecond budget did make requests wait
        page = await client.get(f"/v1/conversations/{cid}/messages?limit=100", headers=users.alice)
        assert page.json()["total"] == 30
        stored = sorted(message["content"] for message in page.json()["items"])
        assert stored == sorted(f"message {n}" for n in range(30))


async def test_the_pacing_counters_are_scraped_with_the_database_metrics(
    settings: DatabaseSettings, users: Users
) -> None:
    app = create_app(settings)
    paced_tightly(app)
    async with serve(app) as client:
        cid = await client.post("/v1/conversations", json={"title": "m"}, headers=users.alice)
        reads = [
            client.get(f"/v1/conversations/{cid.json()['id']}", headers=users.alice)
            for _ in range(20)
        ]
        assert {r.status_code for r in await asyncio.gather(*reads)} == {200}
        budget = turn_budget_of(app)
        scraped = (await client.get("/metrics")).text

    assert f"bastion_requests_paced_total {float(budget.paced)}" in scraped
    assert f"bastion_requests_deferred_total {float(budget.deferred)}" in scraped
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
