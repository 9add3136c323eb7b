"""PostgreSQL specifics: what goes over the wire for each kind of unit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from bastion import Database, DatabaseSettings

pytestmark = pytest.mark.postgres


@pytest.fixture
def backend() -> str:
    return "postgresql"


async def driver_connection(session: AsyncSession) -> Any:
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection


class StatementLog:
    """Records the statements asyncpg sends with ``Connection.execute``.

    Transaction control (BEGIN, COMMIT, ROLLBACK) always goes that way; prepared statements
    (the SELECTs themselves) do not, so this log shows exactly the round trips a unit adds.
    """

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, record: Any) -> None:
        self.statements.append(record.query.split()[0].upper().rstrip(";"))


@pytest.fixture
async def database(settings: DatabaseSettings) -> AsyncIterator[Database]:
    async with Database(settings) as database:
        yield database


async def test_a_read_unit_sends_no_begin_and_no_rollback(database: Database) -> None:
    log = StatementLog()
    async with database.read() as session:
        connection = await driver_connection(session)
        connection.add_query_logger(log)
        assert await session.scalar(text("SELECT 41 + 1")) == 42
    connection.remove_query_logger(log)

    assert log.statements == []


async def test_a_write_unit_sends_begin_and_commit(database: Database) -> None:
    """The control: the same log does see transaction statements when there are some."""
    log = StatementLog()
    async with database.write() as session:
        connection = await driver_connection(session)
        connection.add_query_logger(log)
        await session.execute(text("SELECT 1"))
    connection.remove_query_logger(log)

    assert log.statements == ["BEGIN", "COMMIT"]


async def test_a_consistent_read_is_a_read_only_snapshot(database: Database) -> None:
    async with database.read(consistent=True) as session:
        isolation = await session.scalar(text("SHOW transaction_isolation"))
        read_only = await session.scalar(text("SHOW transaction_read_only"))
    assert (isolation, read_only) == ("repeatable read", "on")
