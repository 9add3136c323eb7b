"""S9 (pool exhaustion) and the statement timeout, on SQLite and PostgreSQL.

S9 pass criteria: with every connection held, a request waits at most ``DB_POOL_TIMEOUT`` and
then gets a clean 503 (``pool_timeout``, with ``Retry-After``) — no hang, no deadlock — and
once the connections come back, requests succeed and nothing leaked.

Statement timeout: a statement running past ``DB_STATEMENT_TIMEOUT`` is cancelled on both
backends, raises :class:`StatementTimeoutError` (503 over HTTP), rolls its transaction back,
and leaves a connection that works.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from bastion import Database, StatementTimeoutError
from conversations.app import create_app
from tests.conftest import Users, make_settings, serve

# Runs until interrupted: SQLite has no sleep function, so the timeout must stop real work.
ENDLESS_SQLITE_QUERY = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
)


def slow_query(backend: str) -> str:
    return "SELECT pg_sleep(30)" if backend == "postgresql" else ENDLESS_SQLITE_QUERY


async def test_an_exhausted_pool_answers_503_after_the_pool_timeout_and_recovers(
    backend: str, database_url: str, users: Users
) -> None:
    settings = make_settings(database_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=0.5)
    app = create_app(settings)
    release = asyncio.Event()
    async with serve(app) as client:
        database: Database = app.state.database

        async def hold_a_connection() -> None:
            async with database.read_connection() as connection:
                await connection.execute(text("SELECT 1"))
                await release.wait()

        holders = [asyncio.create_task(hold_a_connection()) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert database.pool_status().checked_out >= 2  # both read connections are out

        started = time.monotonic()
        # 10x the pool: every one of them must come back as a clean 503, none may hang.
        responses = await asyncio.gather(
            *(client.get("/v1/conversations", headers=users.alice) for _ in range(20))
        )
        elapsed = time.monotonic() - started

        assert {response.status_code for response in responses} == {503}
        codes = {response.json()["code"] for response in responses}
        if backend == "postgresql":
            # The reference service runs 8 requests at once there; the rest wait for a place
            # no longer than DB_POOL_TIMEOUT either, and are answered "overloaded".
            assert "pool_timeout" in codes
            assert codes <= {"pool_timeout", "overloaded"}
        else:
            assert codes == {"pool_timeout"}
        assert all(response.headers["retry-after"] == "1" for response in responses)
        assert elapsed < 0.5 + 2.0, f"waited {elapsed:.2f}s for a 0.5s pool timeout"

        release.set()
        await asyncio.gather(*holders)
        after = await client.get("/v1/conversations", headers=users.alice)
        assert after.status_code == 200
        assert database.pool_status().checked_out == 0


async def test_a_statement_past_the_timeout_is_cancelled_and_the_connection_still_works(
    backend: str, database_url: str
) -> None:
    settings = make_settings(database_url, DB_STATEMENT_TIMEOUT=0.3)
    async with Database(settings) as database:
        for unit in (database.read_connection, database.write_connection):
            started = time.monotonic()
            with pytest.raises(StatementTimeoutError) as raised:
                async with unit() as connection:
                    await connection.execute(text(slow_query(backend)))
            elapsed = time.monotonic() - started

            assert 0.25 < elapsed < 0.3 + 1.5, f"{unit.__name__} took {elapsed:.2f}s"
            assert raised.value.code == "statement_timeout"
            assert not raised.value.retryable
        async with database.read_connection() as connection:
            assert await connection.scalar(text("SELECT 41 + 1")) == 42
        assert database.pool_status().checked_out == 0


async def test_a_timed_out_write_is_rolled_back(backend: str, database_url: str) -> None:
    settings = make_settings(database_url, DB_STATEMENT_TIMEOUT=0.3)
    async with Database(settings) as database:
        async with database.write_connection() as connection:
            await connection.execute(text("CREATE TABLE timeout_probe (n integer)"))
        try:
            with pytest.raises(StatementTimeoutError):
                async with database.write_connection() as connection:
                    await connection.execute(text("INSERT INTO timeout_probe VALUES (1)"))
                    await connection.execute(text(slow_query(backend)))
            async with database.read_connection() as connection:
                assert await connection.scalar(text("SELECT count(*) FROM timeout_probe")) == 0
        finally:
            async with database.write_connection() as connection:
                await connection.execute(text("DROP TABLE timeout_probe"))


async def test_zero_switches_the_statement_timeout_off(backend: str, database_url: str) -> None:
    settings = make_settings(database_url, DB_STATEMENT_TIMEOUT=0)
    async with Database(settings) as database, database.read_connection() as connection:
        if backend == "postgresql":
            assert await connection.scalar(text("SHOW statement_timeout")) == "0"
        # A query longer than any default timeout in the tests still completes.
        query = "SELECT pg_sleep(0.4)" if backend == "postgresql" else "SELECT 1"
        await connection.execute(text(query))


async def test_a_statement_timeout_is_a_503_over_http(
    backend: str, database_url: str, users: Users
) -> None:
    app = create_app(make_settings(database_url, DB_STATEMENT_TIMEOUT=0.3))

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        async with app.state.database.read_connection() as connection:
            await connection.execute(text(slow_query(backend)))
        return {"unreachable": "yes"}

    async with serve(app) as client:
        response = await client.get("/slow")

    assert response.status_code == 503
    assert response.json() == {
        "detail": "the statement took too long and was cancelled",
        "code": "statement_timeout",
    }
    assert response.headers["retry-after"] == "1"
