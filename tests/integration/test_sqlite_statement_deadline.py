"""SQLite's statement timeout stops statements, never BEGIN, COMMIT or ROLLBACK.

Bastion stops a statement past ``DB_STATEMENT_TIMEOUT`` from SQLite's progress handler, which
compares the clock with a deadline set as each statement starts. SQLite calls that handler
every ``_PROGRESS_STEPS`` virtual-machine steps, counted over all runs of a cached statement,
so in production a BEGIN or COMMIT meets it only now and then; when one did, it found the
deadline of the connection's last statement, maybe long past, and was interrupted
(``python -m bench.floors`` met it as a 503 on a write after the write pool sat idle).

These tests have the handler run at every step, so each transaction-control statement meets
it, and let the last statement's deadline pass before the BEGIN, COMMIT or ROLLBACK.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

import bastion._sqlite
from bastion import Database, StatementTimeoutError
from tests.conftest import make_settings

TIMEOUT_S = 0.2
PAST_THE_DEADLINE_S = 0.3
ENDLESS_QUERY = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
)


@pytest.fixture
async def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Database]:
    # Read when each connection is set up: the handler runs at every step from then on.
    monkeypatch.setattr(bastion._sqlite, "_PROGRESS_STEPS", 1)
    settings = make_settings(
        f"sqlite:///{tmp_path / 'deadline.db'}",
        DB_STATEMENT_TIMEOUT=TIMEOUT_S,
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=0,
    )
    async with Database(settings) as db:
        async with db.write_connection() as connection:
            await connection.execute(text("CREATE TABLE notes (n integer)"))
        yield db


async def stored(database: Database) -> list[int]:
    async with database.read_connection() as connection:
        return list((await connection.execute(text("SELECT n FROM notes ORDER BY n"))).scalars())


async def test_a_write_unit_begins_on_a_connection_idle_past_the_timeout(
    database: Database,
) -> None:
    await asyncio.sleep(PAST_THE_DEADLINE_S)  # the CREATE's deadline has passed
    async with database.write_connection() as connection:
        await connection.execute(text("INSERT INTO notes VALUES (1)"))

    assert await stored(database) == [1]


async def test_a_unit_commits_after_a_pause_longer_than_the_timeout(database: Database) -> None:
    async with database.write_connection() as connection:
        await connection.execute(text("INSERT INTO notes VALUES (1)"))
        await asyncio.sleep(PAST_THE_DEADLINE_S)

    assert await stored(database) == [1]


async def test_a_unit_rolls_back_after_a_pause_and_its_connection_serves_the_next(
    database: Database,
) -> None:
    with pytest.raises(RuntimeError, match="the unit fails"):
        async with database.write_connection() as connection:
            await connection.execute(text("INSERT INTO notes VALUES (1)"))
            await asyncio.sleep(PAST_THE_DEADLINE_S)
            raise RuntimeError("the unit fails")

    assert await stored(database) == []
    async with database.write_connection() as connection:
        await connection.execute(text("INSERT INTO notes VALUES (2)"))
    assert await stored(database) == [2]


async def test_a_consistent_read_begins_on_a_connection_idle_past_the_timeout(
    database: Database,
) -> None:
    assert await stored(database) == []  # the read connection's last deadline
    await asyncio.sleep(PAST_THE_DEADLINE_S)
    async with database.read(consistent=True) as session:
        assert await session.scalar(text("SELECT count(*) FROM notes")) == 0


@pytest.mark.parametrize("unit", ["read", "write"])
async def test_a_statement_past_the_timeout_is_still_stopped_after_a_pause(
    database: Database, unit: str
) -> None:
    await asyncio.sleep(PAST_THE_DEADLINE_S)
    units = {"read": database.read_connection, "write": database.write_connection}
    with pytest.raises(StatementTimeoutError):
        async with units[unit]() as connection:
            await connection.execute(text(ENDLESS_QUERY))
