"""SQLite reads run on the event loop, and move to aiosqlite's thread when they would block it.

See :mod:`bastion._sqlite_inline`. Each test checks where a call ran by the connection's count
of calls sent to the thread, and that the loop kept turning (a ticker task counting its turns)
while a slow read ran. (The lock fallback is not tested: on a WAL database a reader is kept out
only by crash recovery or another connection in exclusive locking mode, which other open
connections prevent; the fallback is there for those.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from bastion import Database, StatementTimeoutError
from bastion._sqlite_inline import FALLBACKS, SLOW_STATEMENTS
from tests.conftest import make_settings
from tests.integration.sqlite_calls import thread_calls

# A read that takes far longer than the 2 ms inline budget (about 0.1-0.5 s here).
SLOW_SUM = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
    "SELECT sum(i) FROM n"
)
# Its first row comes at once, the rest take long: the fetch, not the execute, overruns.
MANY_ROWS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) "
    "SELECT i FROM n"
)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(make_settings(f"sqlite:///{tmp_path / 'inline.db'}"))
    await db.start()
    try:
        yield db
    finally:
        await db.close()


class Ticker:
    """Counts the event loop's turns (it yields with ``sleep(0)``, no timer): a call that held
    the loop from start to end lets it count none while it runs."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *_exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.ticks += 1


async def test_a_point_read_makes_no_thread_hop(database: Database) -> None:
    async with database.read_connection() as connection:
        await connection.execute(text("SELECT 1"))  # the connection is set up by now
        before = await thread_calls(connection)
        for _ in range(5):
            assert await connection.scalar(text("SELECT count(*) FROM sqlite_master")) == 0
        assert await thread_calls(connection) == before


async def test_a_read_over_budget_finishes_on_the_thread(database: Database) -> None:
    sql = SLOW_SUM.format(rows=2_000_000)
    async with database.read_connection() as connection, Ticker() as ticker:
        await connection.execute(text("SELECT 1"))
        before = await thread_calls(connection)
        budget_fallbacks = FALLBACKS["budget"]
        turns = ticker.ticks
        total = await connection.scalar(text(sql))
        # Run inline to the end, the read would have held the loop all along: no turn between.
        assert ticker.ticks > turns
        assert total == 2_000_000 * 2_000_001 // 2
        assert await thread_calls(connection) > before
        assert FALLBACKS["budget"] == budget_fallbacks + 1
        assert sql in SLOW_STATEMENTS

    known_slow = FALLBACKS["known_slow"]
    async with database.read_connection() as connection:
        assert await connection.scalar(text(sql)) == total
    # Known slow: straight to the thread, without another try on the loop.
    assert FALLBACKS["known_slow"] == known_slow + 1
    assert FALLBACKS["budget"] == budget_fallbacks + 1


async def test_a_fetch_over_budget_returns_every_row_once(database: Database) -> None:
    rows = 1_000_000
    async with database.read_connection() as connection:
        result = await connection.execute(text(MANY_ROWS.format(rows=rows)))
        values = result.scalars().all()
    assert len(values) == rows
    assert sum(values) == rows * (rows + 1) // 2


async def test_the_fallbacks_are_exported_as_metrics(database: Database) -> None:
    exported = database.metrics.registry.get_sample_value(
        "bastion_sqlite_inline_fallbacks_total", {"reason": "budget"}
    )
    assert exported == FALLBACKS["budget"]


async def test_the_statement_timeout_still_stops_an_inline_read(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'timeout.db'}", DB_STATEMENT_TIMEOUT=0.05)
    async with Database(settings) as database:
        with pytest.raises(StatementTimeoutError):
            async with database.read_connection() as connection:
                await connection.scalar(text(SLOW_SUM.format(rows=50_000_000)))
        async with database.read_connection() as connection:  # the pool is still usable
            assert await connection.scalar(text("SELECT 1")) == 1


async def test_a_statement_slow_once_returns_to_the_loop_after_a_fast_run(
    database: Database,
) -> None:
    # The same SQL, slow or fast by its parameter.
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows) "
        "SELECT count(*) FROM n"
    )
    compiled = sql.replace(":rows", "?")
    async with database.read_connection() as connection:
        assert await connection.scalar(text(sql), {"rows": 2_000_000}) == 2_000_000
        assert compiled in SLOW_STATEMENTS
        assert await connection.scalar(text(sql), {"rows": 10}) == 10  # on the thread, fast
        assert compiled not in SLOW_STATEMENTS
        before = await thread_calls(connection)
        assert await connection.scalar(text(sql), {"rows": 10}) == 10
        assert await thread_calls(connection) == before  # back on the loop


async def test_closed_cursors_leave_the_live_set_and_an_unfinished_one_is_closed_on_return(
    database: Database,
) -> None:
    # The pool's return closes the connection's live cursors (an unfinished SELECT holds a
    # read snapshot). A closed cursor must not count as live: aiosqlite's thread keeps the
    # last one it closed alive, and every return would then close cursors again.
    async with database.read_connection() as connection:
        for _ in range(3):
            assert await connection.scalar(text("SELECT 1")) == 1
        sqlite_connection = (await connection.get_raw_connection()).driver_connection._conn
        assert list(sqlite_connection._cursors) == []
    async with database.read_connection() as connection:
        assert (await connection.get_raw_connection()).driver_connection._conn is sqlite_connection
        result = await connection.stream(text(MANY_ROWS.format(rows=1000)))
        assert (await result.fetchmany(2)) == [(1,), (2,)]  # stops reading half-way
        assert len(sqlite_connection._cursors) == 1
    assert list(sqlite_connection._cursors) == []  # closed when the connection came back
