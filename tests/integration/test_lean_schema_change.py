"""After a schema change made elsewhere, the lean path re-prepares as SQLAlchemy's path does.

asyncpg keeps each connection's prepared statements. When another connection changes a table
they read (a migration, another process), the next run of a stale one fails with
``InvalidCachedStatementError``; SQLAlchemy's asyncpg dialect then marks its schema cache
stale, and every connection drops its prepared statements before its next statement. The lean
path (:mod:`bastion._lean`) must do the same, or a pooled connection keeps failing until it is
recycled. Write units show it: a read unit on PostgreSQL discards its connection after any
driver error anyway. PostgreSQL only: SQLite has no prepared statement cache of this kind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import Column, Integer, MetaData, Table, text, update
from sqlalchemy.engine.result import IteratorResult

from bastion import Database
from bastion.repository._base import returning_rows
from tests.conftest import make_settings

PROBES = Table("lean_schema_probe", MetaData(), Column("x", Integer))
TOUCH_X = update(PROBES).values(x=PROBES.c.x).returning(PROBES.c.x)


@pytest.fixture
async def one_connection_database(postgres_test_url: str) -> AsyncIterator[Database]:
    """A Database whose pools are one connection each, with a table of one row."""
    settings = make_settings(postgres_test_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    async with Database(settings) as database:
        async with database.write_connection() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS lean_schema_probe"))
            await connection.execute(text("CREATE TABLE lean_schema_probe (x integer)"))
            await connection.execute(text("INSERT INTO lean_schema_probe VALUES (7)"))
        try:
            yield database
        finally:
            async with database.write_connection() as connection:
                await connection.execute(text("DROP TABLE lean_schema_probe"))


async def _change_the_column_elsewhere(url: str) -> None:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    other = await asyncpg.connect(dsn)
    try:
        await other.execute("ALTER TABLE lean_schema_probe ALTER COLUMN x TYPE bigint")
    finally:
        await other.close()


async def test_a_schema_change_made_elsewhere_costs_a_write_unit_one_error_at_most(
    one_connection_database: Database, postgres_test_url: str
) -> None:
    database = one_connection_database
    for _ in range(2):  # SQLAlchemy's path caches the result metadata, then the lean path
        async with database.write_connection() as connection:
            result = await returning_rows(connection, TOUCH_X, {})
    assert isinstance(result, IteratorResult)  # prepared on the write pool's one connection
    assert result.scalar() == 7

    await _change_the_column_elsewhere(postgres_test_url)

    failures = 0
    answers = []
    for _ in range(4):
        try:
            async with database.write_connection() as connection:
                answers.append((await returning_rows(connection, TOUCH_X, {})).scalar())
        except Exception:  # the stale statement's error, whatever its class
            failures += 1
    assert failures <= 1
    assert answers[-3:] == [7, 7, 7]
