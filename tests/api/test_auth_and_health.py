"""Authentication by API key, and the health endpoints."""

from __future__ import annotations

import httpx
import pytest

from bastion import Database, DatabaseSettings
from bastion.migrations import head_revisions
from conversations import MIGRATIONS
from conversations.auth import hash_api_key
from conversations.users import create_user
from tests.conftest import Users

Client = httpx.AsyncClient


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6cHc=",
        "Bearer cv_not-a-real-key",
        "Bearer " + "x" * 5000,
    ],
)
async def test_requests_without_a_valid_key_get_401(
    app_client: Client, users: Users, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await app_client.get("/v1/conversations", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"


async def test_keys_are_stored_only_as_hashes(settings: DatabaseSettings) -> None:
    from sqlalchemy import text

    async with Database(settings) as database:
        key = await create_user(database, "carol")
        async with database.read() as session:
            stored = list(await session.scalars(text("SELECT key_hash FROM api_keys")))
    assert stored == [hash_api_key(key)]
    assert key not in stored


async def test_liveness_and_readiness_answer(app_client: Client) -> None:
    live = await app_client.get("/health/live")
    ready = await app_client.get("/health/ready")

    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 200
    body = ready.json()
    assert (body["status"], body["score"]) == ("healthy", 1.0)
    components = body["components"]
    assert list(components) == ["database", "pool", "breaker", "migrations"]
    assert components["database"]["status"] == "healthy"
    assert components["pool"]["details"]["checked_out"] == 0
    assert components["migrations"]["details"]["current"] == list(head_revisions(MIGRATIONS))
    assert set(body["loop_lag_ms"]) == {"p50", "p99", "max"}
