"""SQLite write units: queued in the process (bastion._sqlite_writer), statements inline once
known fast (bastion._sqlite_inline_writes)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import column, insert, select, table, text
from sqlalchemy.engine.result import IteratorResult

from bastion import (
    Database,
    DatabaseUnavailableError,
    IntegrityViolationError,
    TransactionConflictError,
    UniqueViolationError,
    returning_rows,
)
from bastion._sqlite_inline import FALLBACKS, SLOW_STATEMENTS
from bastion._sqlite_inline_writes import FAST_WRITES
from bastion._sqlite_writer import WriterQueue
from tests.conftest import make_settings
from tests.integration.sqlite_calls import thread_calls


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    settings = make_settings(f"sqlite:///{tmp_path / 'writes.db'}", DB_SQLITE_BUSY_TIMEOUT=300)
    async with Database(settings) as db:
        async with db.write_connection() as connection:
            await connection.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INT)"))
            await connection.execute(text("INSERT INTO counter VALUES (1, 0)"))
        yield db


async def test_queued_write_units_all_commit_and_wait_without_a_connection(
    database: Database,
) -> None:
    inside = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with database.write_connection() as connection:
            await connection.execute(text("UPDATE counter SET n = n + 1"))
            inside.set()
            await release.wait()

    async def increment() -> None:
        async with database.write_connection() as connection:
            await connection.execute(text("UPDATE counter SET n = n + 1"))

    first = asyncio.create_task(holder())
    await inside.wait()
    others = [asyncio.create_task(increment()) for _ in range(20)]
    await asyncio.sleep(0.05)
    # The 20 waiting units queue in the process; only the holder has a connection.
    assert database.pool_status().checked_out == 1
    release.set()
    await asyncio.gather(first, *others)
    async with database.read_connection() as connection:
        assert await connection.scalar(text("SELECT n FROM counter")) == 21


async def test_a_write_unit_inside_another_fails_after_the_busy_timeout_instead_of_hanging(
    database: Database,
) -> None:
    async with database.write_connection():
        with pytest.raises(TransactionConflictError, match="DB_SQLITE_BUSY_TIMEOUT"):
            async with database.write_connection():
                pass


async def test_a_turn_arriving_as_the_lock_passes_on_queues_and_keeps_its_timeout() -> None:
    """Between a release and the woken unit's first step the lock looks free: a unit arriving
    then must queue behind the woken one, and still give up after the busy timeout rather
    than wait as long as that unit holds the lock."""
    queue = WriterQueue(timeout_s=0.2)
    order: list[str] = []

    async def second() -> None:
        async with queue.turn():
            order.append("second")
            await asyncio.sleep(0.5)

    async with queue.turn():
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.05)  # queued behind this turn
    # Released: "second" is woken but has not run yet.
    started = time.monotonic()
    with pytest.raises(TransactionConflictError):
        async with queue.turn():
            order.append("third")
    assert time.monotonic() - started < 0.45  # gave up after the timeout, not after "second"
    await waiting
    assert order == ["second"]
    async with queue.turn():  # free again: taken at once
        order.append("fourth")
    assert order == ["second", "fourth"]


async def test_a_known_fast_write_statement_runs_without_a_thread_hop(database: Database) -> None:
    update = "UPDATE counter SET n = n + :step WHERE id = 1"
    async with database.write_connection() as connection:
        await connection.execute(text(update), {"step": 1})  # first run: on the thread, timed
    async with database.write_connection() as connection:
        before = await thread_calls(connection)
        for _ in range(5):
            await connection.execute(text(update), {"step": 1})
        assert await thread_calls(connection) == before  # BEGIN was before; COMMIT is after
    async with database.read_connection() as connection:
        assert await connection.scalar(text("SELECT n FROM counter")) == 6


async def test_a_write_that_overruns_the_budget_goes_back_to_the_thread(
    database: Database,
) -> None:
    # Cheap with a small bound, slow (a large recursive count) with a big one: the same SQL.
    sql = (
        "UPDATE counter SET n = (WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
        "FROM c WHERE i < :rows) SELECT count(*) FROM c) WHERE id = 1"
    )
    for rows in (10, 10):  # admitted after a fast run on the thread
        async with database.write_connection() as connection:
            await connection.execute(text(sql), {"rows": rows})
    compiled = sql.replace(":rows", "?")
    assert compiled in FAST_WRITES
    async with database.write_connection() as connection:
        await connection.execute(text(sql), {"rows": 2_000_000})  # inline, over the budget
    assert compiled not in FAST_WRITES
    assert compiled in SLOW_STATEMENTS
    async with database.write_connection() as connection:
        before = await thread_calls(connection)
        await connection.execute(text(sql), {"rows": 10})
        assert await thread_calls(connection) > before  # on the thread again
    async with database.read_connection() as connection:
        assert await connection.scalar(text("SELECT n FROM counter")) == 10


COUNTER = table("counter", column("id"), column("n"))


async def test_lean_statements_in_a_write_unit_go_to_the_thread_until_known_fast(
    database: Database,
) -> None:
    # Statements SQLAlchemy has run once (their result metadata is cached) take the lean path
    # in a write unit too: on the thread, timed there, until known fast, then on the loop.
    insert_row = insert(COUNTER).returning(COUNTER.c.id, COUNTER.c.n)
    read_row = select(COUNTER.c.n).where(COUNTER.c.id == 2)
    async with database.write_connection() as connection:
        await connection.execute(insert_row, {"id": 9, "n": 0})
        await connection.execute(read_row)
    FAST_WRITES.discard("INSERT INTO counter (id, n) VALUES (?, ?) RETURNING id, n")
    async with database.write_connection() as connection:
        before = await thread_calls(connection)
        first = await returning_rows(connection, insert_row, {"id": 2, "n": 5})
        after_first = await thread_calls(connection)
        found = await connection.execute(read_row)
        again = await returning_rows(connection, insert_row, {"id": 3, "n": 6})
        assert await thread_calls(connection) == after_first  # known fast now: on the loop
    assert isinstance(first, IteratorResult)
    assert isinstance(found, IteratorResult)
    assert after_first == before + 1  # the unknown INSERT: one trip to the thread
    assert ([tuple(r) for r in first], found.scalar_one(), again.one().n) == ([(2, 5)], 5, 6)
    async with database.read_connection() as connection:
        rows = (await connection.execute(text("SELECT id, n FROM counter ORDER BY id"))).all()
    assert [tuple(row) for row in rows] == [(1, 0), (2, 5), (3, 6), (9, 0)]


async def test_a_lean_write_that_fails_rolls_its_unit_back(database: Database) -> None:
    insert_row = insert(COUNTER).returning(COUNTER.c.id)
    async with database.write_connection() as connection:
        await connection.execute(insert_row, {"id": 5, "n": 0})  # known fast from here on
    with pytest.raises(UniqueViolationError):
        async with database.write_connection() as connection:
            kept = await returning_rows(connection, insert_row, {"id": 6, "n": 0})
            assert isinstance(kept, IteratorResult)
            await returning_rows(connection, insert_row, {"id": 1, "n": 0})  # taken
    async with database.read_connection() as connection:
        ids = (await connection.scalars(text("SELECT id FROM counter ORDER BY id"))).all()
    assert ids == [1, 5]


async def test_a_write_unit_hops_to_the_thread_for_its_commit_only(database: Database) -> None:
    # BEGIN IMMEDIATE, the cursors and the pool's rollback after COMMIT run on the loop.
    update = text("UPDATE counter SET n = n + 1 WHERE id = 1")
    async with database.write_connection() as connection:
        await connection.execute(update)  # known fast from here on
        driver = (await connection.get_raw_connection()).driver_connection
    after_first = driver._bastion_queued
    async with database.write_connection() as connection:
        assert (await connection.get_raw_connection()).driver_connection is driver
        at_start = await thread_calls(connection)
        await connection.execute(update)
        before_commit = await thread_calls(connection)
    assert (at_start - after_first, before_commit - at_start) == (0, 0)
    assert driver._bastion_queued - before_commit == 1  # the COMMIT


async def test_a_commit_that_fails_rolls_its_unit_back_and_frees_the_write_lock(
    tmp_path: Path,
) -> None:
    # A deferred foreign key is checked at COMMIT, which fails and leaves SQLite's transaction
    # open: it must be rolled back there, not left holding the write lock.
    path = tmp_path / "deferred.db"
    async with Database(make_settings(f"sqlite:///{path}")) as db:
        async with db.write_connection() as connection:
            await connection.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
            await connection.execute(
                text(
                    "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INT REFERENCES "
                    "parent (id) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
        async with db.write_connection() as connection:
            await connection.execute(text("INSERT INTO parent VALUES (1)"))
            driver = (await connection.get_raw_connection()).driver_connection
        with pytest.raises(IntegrityViolationError):
            async with db.write_connection() as connection:
                await connection.execute(text("INSERT INTO child VALUES (1, 1)"))
                await connection.execute(text("INSERT INTO child VALUES (2, 99)"))
        assert not driver._connection.in_transaction
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")  # the write lock is free: no "database is locked"
            other.execute("ROLLBACK")
        finally:
            other.close()
        async with db.write_connection() as connection:
            await connection.execute(text("INSERT INTO child VALUES (3, 1)"))
        async with db.read_connection() as connection:
            ids = (await connection.scalars(text("SELECT id FROM child"))).all()
        assert ids == [3]


class LockedByAnotherProcess:
    """A started Database on a file with a table ``t``, whose write lock another connection
    holds (as another process would) until :meth:`release`."""

    def __init__(self, db: Database, other: sqlite3.Connection, driver: Any) -> None:
        self.db = db
        self.driver = driver  # the write pool's driver connection, before the lock was taken
        self._other: sqlite3.Connection | None = other

    def insert(self, n: int) -> asyncio.Task[None]:
        """A write unit inserting ``n`` into ``t``, started as a task (it waits for the lock)."""

        async def write() -> None:
            async with self.db.write_connection() as connection:
                await connection.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})

        return asyncio.create_task(write())

    def release(self) -> None:
        if self._other is not None:
            self._other.execute("COMMIT")
            self._other.close()
            self._other = None


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[LockedByAnotherProcess]:
    path = tmp_path / "locked.db"
    settings = make_settings(f"sqlite:///{path}", DB_SQLITE_BUSY_TIMEOUT=5000)
    async with Database(settings) as db:
        async with db.write_connection() as connection:
            await connection.execute(text("CREATE TABLE t (n INT)"))
            driver = (await connection.get_raw_connection()).driver_connection
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, held by "another process"
        state = LockedByAnotherProcess(db, other, driver)
        try:
            yield state
        finally:
            state.release()


async def test_begin_waits_on_the_thread_while_another_process_holds_the_lock(
    locked: LockedByAnotherProcess,
) -> None:
    busy_before = FALLBACKS["busy"]
    writer = locked.insert(1)
    gaps: list[float] = []
    last = time.monotonic()
    for _ in range(30):  # 0.3 s with the lock held: the loop must keep turning
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    assert not writer.done()
    locked.release()
    await writer
    assert FALLBACKS["busy"] == busy_before + 1
    # An inline BEGIN waiting out the 5 s timeout would have stalled the loop that long.
    assert max(gaps) < 1.0
    async with locked.db.read_connection() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM t")) == 1


async def test_a_begin_on_a_dead_connection_is_a_disconnect_and_the_next_unit_reconnects(
    database: Database,
) -> None:
    # BEGIN IMMEDIATE goes straight to the driver (bastion._sqlite's _send_begin), but its
    # failure still goes through SQLAlchemy's handler: translated, counted by the handle_error
    # listeners, and a dead connection invalidated rather than handed out again.
    async with database.write_connection() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
    await driver.close()  # the pooled write connection's driver dies while it sits in the pool
    errors_before = database.metrics.errors
    with pytest.raises(DatabaseUnavailableError):
        async with database.write_connection():
            pass
    assert database.metrics.errors == errors_before + 1
    async with database.write_connection() as connection:
        assert (await connection.get_raw_connection()).driver_connection is not driver
        await connection.execute(text("UPDATE counter SET n = 7 WHERE id = 1"))
    async with database.read_connection() as connection:
        assert await connection.scalar(text("SELECT n FROM counter")) == 7


async def test_a_write_unit_counts_its_statements_as_queries_and_not_its_begin(
    database: Database,
) -> None:
    # As on PostgreSQL, where asyncpg sends BEGIN itself: transaction control is not a query
    # in the metrics, the slow-query log or a request's query count.
    queries_before = database.metrics.queries
    async with database.write_connection() as connection:
        await connection.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
    assert database.metrics.queries == queries_before + 1


async def test_a_unit_cancelled_while_its_begin_waits_discards_its_connection(
    locked: LockedByAnotherProcess,
) -> None:
    # BEGIN IMMEDIATE waits on aiosqlite's thread while another process holds the lock; a
    # cancellation there leaves the driver connection mid-call: SQLAlchemy's handler must see
    # it (counted, connection invalidated) rather than the pool taking the connection back.
    db = locked.db
    errors_before = db.metrics.errors
    writer = locked.insert(1)
    await asyncio.sleep(0.3)  # waiting in BEGIN IMMEDIATE, on the thread
    writer.cancel()
    await asyncio.sleep(0.05)  # the cancellation reaches the unit
    locked.release()  # lets the thread's BEGIN end, and the discarded connection close
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert db.metrics.errors == errors_before + 1
    async with db.write_connection() as connection:
        assert (await connection.get_raw_connection()).driver_connection is not locked.driver
        await connection.execute(text("INSERT INTO t VALUES (2)"))
    async with db.read_connection() as connection:
        assert (await connection.scalars(text("SELECT n FROM t"))).all() == [2]
