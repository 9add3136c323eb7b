"""How many units of work (connection checkouts) each API request takes.

A unit costs more than a statement (``bench/README.md``, finding 17), so a request
authenticates in the unit it works in: one checkout per request, a POST with an
``Idempotency-Key`` included (the key's lookup, the write and the key's row share the write
unit; a replay is answered from it). A write with no usable key is refused before any unit
opens; an unknown or revoked key, in the unit, which then writes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from bastion import DatabaseSettings
from conversations.app import create_app
from tests.conftest import Users, checkouts, revoke_key, serve

Client = httpx.AsyncClient


@pytest.fixture
async def served(settings: DatabaseSettings) -> AsyncIterator[tuple[Client, FastAPI]]:
    app = create_app(settings)
    async with serve(app) as client:
        yield client, app


async def units_of(
    client: Client, app: FastAPI, method: str, url: str, headers: dict[str, str], **kwargs: object
) -> tuple[int, httpx.Response]:
    """The checkouts one request took, and its response."""
    before = checkouts(app)
    response = await client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]
    return int(checkouts(app) - before), response


async def test_every_request_takes_one_unit_a_keyed_post_and_its_replay_too(
    served: tuple[Client, FastAPI], users: Users
) -> None:
    client, app = served
    units, created = await units_of(
        client, app, "POST", "/v1/conversations", users.alice, json={"title": "t"}
    )
    assert (units, created.status_code) == (1, 201), created.text
    one = f"/v1/conversations/{created.json()['id']}"
    message = {"role": "user", "content": "hi", "sources": [{"url": "https://a.example"}]}
    calls: list[tuple[str, str, dict[str, object], int]] = [
        ("GET", one, {}, 200),
        ("PATCH", one, {"json": {"title": "u"}}, 200),
        ("POST", one + "/messages", {"json": message}, 201),
        ("POST", one + "/messages:batch", {"json": {"messages": [message, message]}}, 201),
        ("GET", one + "/messages", {}, 200),
        ("DELETE", one, {}, 204),
        ("POST", one + "/restore", {}, 200),
    ]
    for method, url, kwargs, status in calls:
        units, response = await units_of(client, app, method, url, users.alice, **kwargs)
        assert response.status_code == status, (method, url, response.text)
        assert units == 1, (method, url)

    keyed = {**users.alice, "Idempotency-Key": "units-1"}
    first = await units_of(client, app, "POST", one + "/messages", keyed, json=message)
    again = await units_of(client, app, "POST", one + "/messages", keyed, json=message)
    assert (first[0], first[1].status_code) == (1, 201)
    # A replay is answered from the unit that looks the key up; nothing more runs.
    assert (again[0], again[1].status_code) == (1, 201)
    assert again[1].headers["idempotent-replayed"] == "true"


async def test_a_request_without_a_usable_key_opens_no_unit(
    served: tuple[Client, FastAPI], users: Users
) -> None:
    client, app = served
    created = await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
    one = f"/v1/conversations/{created.json()['id']}"
    for authorization in (
        {},
        {"Authorization": "Basic eA=="},
        {"Authorization": "Bearer " + "x" * 101},
    ):
        for method, url in (("POST", one + "/messages"), ("PATCH", one), ("DELETE", one)):
            units, response = await units_of(client, app, method, url, authorization, json={})
            assert (units, response.status_code) == (0, 401), (method, authorization)


async def test_an_unknown_or_revoked_key_writes_nothing_on_any_write(
    app_client: Client, users: Users, settings: DatabaseSettings
) -> None:
    client = app_client
    created = await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
    one = f"/v1/conversations/{created.json()['id']}"
    await revoke_key(settings, users.bob)
    message = {"role": "user", "content": "hi"}
    writes: list[tuple[str, str, dict[str, object]]] = [
        ("POST", "/v1/conversations", {"json": {"title": "x"}}),
        ("POST", one + "/messages", {"json": message}),
        ("POST", one + "/messages:batch", {"json": {"messages": [message]}}),
        ("PATCH", one, {"json": {"title": "x"}}),
        ("DELETE", one, {}),
        ("POST", one + "/restore", {}),
    ]
    strangers = {
        "unknown": {"Authorization": "Bearer cv_" + "u" * 43},
        "revoked": users.bob,
        "unknown_with_idempotency_key": {
            "Authorization": "Bearer cv_" + "u" * 43,
            "Idempotency-Key": "k",
        },
    }
    for name, headers in strangers.items():
        for method, url, kwargs in writes:
            response = await client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]
            assert response.status_code == 401, (name, method, url, response.text)
            assert response.headers["www-authenticate"] == "Bearer"

    page = await client.get(one + "/messages", headers=users.alice)
    listed = await client.get("/v1/conversations", headers=users.alice)
    assert page.json()["total"] == 0
    assert [(c["title"], c["deleted_at"]) for c in listed.json()["items"]] == [("t", None)]
