"""When the database cannot serve: 503 with Retry-After, quickly, and nothing leaked."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from bastion import (
    CommitOutcomeUnknownError,
    Database,
    DatabaseUnavailableError,
    QueryError,
    TransactionConflictError,
)
from bastion.fastapi import error_response
from conversations.app import create_app
from tests.conftest import Users, make_settings, serve


async def test_an_exhausted_pool_answers_503_with_retry_after(
    database_url: str, users: Users
) -> None:
    settings = make_settings(
        database_url,
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
        DB_POOL_TIMEOUT=0.2,
        HEALTH_CACHE_TTL=0,  # the readiness after the release must not be the cached one
    )
    app = create_app(settings)
    async with serve(app) as client:
        database: Database = app.state.database
        # Both pools' only connections: reads wait for one, and so does readiness's probe.
        async with database.read() as reader, database.write() as writer:
            await reader.execute(text("SELECT 1"))
            await writer.execute(text("SELECT 1"))
            busy = await client.get("/v1/conversations", headers=users.alice)
            unready = await client.get("/health/ready")
        served = await client.get("/v1/conversations", headers=users.alice)
        ready = await client.get("/health/ready")

    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert busy.json() == {
        "detail": "no database connection became free in time",
        "code": "pool_timeout",
    }
    assert unready.status_code == 503
    components = unready.json()["components"]
    assert (components["database"]["status"], components["database"]["error"]) == (
        "unhealthy",
        "pool_timeout",
    )
    assert (components["pool"]["status"], components["pool"]["details"]["usage"]) == (
        "degraded",
        1.0,
    )
    assert (served.status_code, ready.status_code) == (200, 200)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DatabaseUnavailableError("the database is unavailable"), "database_unavailable"),
        (TransactionConflictError("retry it"), "transaction_conflict"),
    ],
)
def test_transient_errors_map_to_503_with_retry_after(error: Exception, code: str) -> None:
    response = error_response(error)  # type: ignore[arg-type]
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert code.encode() in response.body


async def test_every_route_needs_only_one_connection_at_a_time(
    database_url: str, users: Users
) -> None:
    """With a pool of one, a route that holds two connections at once would time out (503)."""
    settings = make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)
    async with serve(create_app(settings)) as client:
        created = await client.post("/v1/conversations", json={"title": "one"}, headers=users.alice)
        path = f"/v1/conversations/{created.json()['id']}"
        message = {"role": "user", "content": "hi"}
        statuses = [
            created.status_code,
            (await client.get(path, headers=users.alice)).status_code,
            (await client.get("/v1/conversations", headers=users.alice)).status_code,
            (await client.patch(path, json={"title": "t"}, headers=users.alice)).status_code,
            (await client.post(f"{path}/messages", json=message, headers=users.alice)).status_code,
            (await client.get(f"{path}/messages", headers=users.alice)).status_code,
            (await client.delete(path, headers=users.alice)).status_code,
            (await client.post(f"{path}/restore", headers=users.alice)).status_code,
            (await client.get("/health/ready")).status_code,
        ]
    assert statuses == [201, 200, 200, 200, 201, 200, 204, 200, 200]


def test_an_unknown_commit_outcome_is_not_an_invitation_to_retry() -> None:
    response = error_response(CommitOutcomeUnknownError("the write may have been applied"))
    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert b"commit_outcome_unknown" in response.body
    assert b"may have been applied" in response.body


def test_a_query_error_tells_the_client_nothing_about_internals() -> None:
    response = error_response(QueryError('relation "secret_table" does not exist'))
    assert response.status_code == 500
    assert b"secret_table" not in response.body
