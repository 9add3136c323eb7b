"""A write whose COMMIT fails never answers 2xx (PostgreSQL, deferred constraint).

A DEFERRABLE INITIALLY DEFERRED foreign key is checked at COMMIT, not at INSERT, so the route
body runs to completion and returns its 201 body; only COMMIT fails. The dependency's exit
runs before the response is sent, so the client must get the error instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from bastion import Database, DatabaseSettings, ForeignKeyViolationError
from bastion.fastapi import (
    DatabaseDep,
    WriteConnection,
    WriteSession,
    database_lifespan,
    install_error_handlers,
)
from tests.conftest import serve

pytestmark = pytest.mark.postgres

DDL = [
    "CREATE TABLE deferred_parents (id integer PRIMARY KEY)",
    "CREATE TABLE deferred_children (id integer PRIMARY KEY, parent_id integer NOT NULL "
    "REFERENCES deferred_parents (id) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO deferred_parents VALUES (1)",
]


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def deferred_tables(database: Database) -> AsyncIterator[Database]:
    async with database.write() as session:
        for statement in DDL:
            await session.execute(text(statement))
    yield database
    async with database.write() as session:
        await session.execute(text("DROP TABLE deferred_children, deferred_parents"))


def create_probe_app(settings: DatabaseSettings) -> FastAPI:
    app = FastAPI(lifespan=database_lifespan(settings))
    install_error_handlers(app)

    @app.post("/children/{child_id}/{parent_id}", status_code=201)
    async def add_child(child_id: int, parent_id: int, session: WriteSession) -> dict[str, int]:
        await session.execute(
            text("INSERT INTO deferred_children VALUES (:c, :p)"), {"c": child_id, "p": parent_id}
        )
        return {"id": child_id}

    @app.post("/connection/{child_id}/{parent_id}", status_code=201)
    async def add_child_on_a_connection(
        child_id: int, parent_id: int, connection: WriteConnection
    ) -> dict[str, int]:
        await connection.execute(
            text("INSERT INTO deferred_children VALUES (:c, :p)"), {"c": child_id, "p": parent_id}
        )
        return {"id": child_id}

    @app.post("/explicit/{child_id}/{parent_id}", status_code=201)
    async def add_child_explicitly(
        child_id: int, parent_id: int, database: DatabaseDep
    ) -> dict[str, int]:
        async with database.write() as session:
            await session.execute(
                text("INSERT INTO deferred_children VALUES (:c, :p)"),
                {"c": child_id, "p": parent_id},
            )
        return {"id": child_id}

    return app


async def children(database: Database) -> list[int]:
    async with database.read() as session:
        return list(await session.scalars(text("SELECT id FROM deferred_children ORDER BY id")))


async def test_the_unit_raises_when_commit_fails(deferred_tables: Database) -> None:
    with pytest.raises(ForeignKeyViolationError) as caught:
        async with deferred_tables.write() as session:
            await session.execute(text("INSERT INTO deferred_children VALUES (1, 999)"))
    assert caught.value.sqlstate == "23503"
    assert await children(deferred_tables) == []


@pytest.mark.parametrize("route", ["children", "connection", "explicit"])
async def test_a_failed_commit_never_answers_2xx(
    deferred_tables: Database, settings: DatabaseSettings, route: str
) -> None:
    async with serve(create_probe_app(settings)) as client:
        failed = await client.post(f"/{route}/1/999")
        succeeded = await client.post(f"/{route}/2/1")

    assert failed.status_code == 422
    assert failed.json()["code"] == "foreign_key_violation"
    assert succeeded.status_code == 201
    assert await children(deferred_tables) == [2]
