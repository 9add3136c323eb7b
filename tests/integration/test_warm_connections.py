"""Read units reuse a connection kept from an earlier unit (bastion._warm_connections).

A kept connection stays checked out of the read pool between units (``pool.checkedout()``),
and the next unit gets the same driver connection. The tests say when a connection must *not*
be kept, because something about it differs from what a fresh checkout would give the next
unit. (A pool listener added by a test would itself stop the keeping: see
``test_a_pool_listener_added_later_stops_the_keeping``.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion import Database
from bastion._sqlite import _NO_DEADLINE
from tests.conftest import make_settings
from tests.faults.leaks import asyncpg_dsn
from tests.integration.kept_connections import NAME_OF, USERS, driver_of, small_pools

pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    async with Database(small_pools(database_url)) as db:
        yield db


class PoolCheckouts:
    """How many times the read pool has lent a connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        event.listen(engine.sync_engine.pool, "checkout", self._checked_out)

    def _checked_out(self, *_args: object) -> None:
        self.count += 1


def read_engine(database: Database) -> AsyncEngine:
    return database.engines[-1]


def options_of(connection: AsyncConnection) -> dict[str, object]:
    assert connection.sync_connection is not None
    return dict(connection.sync_connection.get_execution_options())


def driver_closed(driver: object) -> bool:
    is_closed = getattr(driver, "is_closed", None)  # asyncpg's
    if is_closed is not None:
        return bool(is_closed())
    return getattr(driver, "_connection", None) is None  # aiosqlite's, once closed


async def add_user(database: Database, name: str) -> uuid.UUID:
    uid = uuid.uuid4()
    async with database.write_connection() as connection:
        await connection.execute(insert(USERS).values(id=uid, name=name))
    return uid


async def warm_up(database: Database) -> None:
    """Run the tests' statement once: its first run takes SQLAlchemy's own path (bastion._lean),
    which begins a transaction, so that unit's connection goes back to the pool."""
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})


async def test_a_read_unit_reuses_the_last_units_connection(database: Database) -> None:
    uid = await add_user(database, "warm")
    await warm_up(database)
    pool = read_engine(database).sync_engine.pool
    drivers = []
    for _ in range(5):
        async with database.read_connection() as connection:
            assert await connection.scalar(NAME_OF, {"uid": uid}) == "warm"
            drivers.append(await driver_of(connection))
        assert pool.checkedout() == 1  # kept out of the pool, not returned to it
    assert len(set(map(id, drivers))) == 1


async def test_a_kept_connection_sees_what_was_committed_since(database: Database) -> None:
    await warm_up(database)
    async with database.read_connection() as connection:
        assert await connection.scalar(NAME_OF, {"uid": uuid.uuid4()}) is None
        kept = await driver_of(connection)
    uid = await add_user(database, "later")
    async with database.read_connection() as connection:
        assert await connection.scalar(NAME_OF, {"uid": uid}) == "later"
        assert await driver_of(connection) is kept


async def test_a_unit_that_began_a_transaction_goes_back_to_the_pool(database: Database) -> None:
    """A statement on SQLAlchemy's own path begins its transaction: the pool's reset ends it."""
    async with database.read_connection() as connection:
        await connection.execute(text("SELECT 1"))
        assert connection.in_transaction()
        first = await driver_of(connection)
    assert read_engine(database).sync_engine.pool.checkedout() == 0  # back in the pool
    async with database.read_connection() as connection:
        assert not connection.in_transaction()
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        assert await driver_of(connection) is first


async def test_a_unit_that_raised_goes_back_to_the_pool(database: Database) -> None:
    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    pool = read_engine(database).sync_engine.pool
    assert pool.checkedout() == 1
    with pytest.raises(RuntimeError):
        async with database.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
            raise RuntimeError("the route failed")
    assert pool.checkedout() == 0  # back in the pool


async def test_execution_options_set_in_a_unit_do_not_reach_the_next(database: Database) -> None:
    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execution_options(bastion_probe="mine")
        assert options_of(connection).get("bastion_probe") == "mine"
    async with database.read_connection() as connection:
        assert "bastion_probe" not in options_of(connection)


async def test_a_listener_added_to_a_units_connection_does_not_reach_the_next(
    database: Database,
) -> None:
    seen: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        # Added after the unit's last statement: the connection has no transaction to show.
        event.listen(connection.sync_connection, "before_cursor_execute", note)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    assert seen == []


async def test_kept_connections_count_as_idle_and_stay_within_the_pool_size(
    database: Database,
) -> None:
    """Four units at once (pool 2 + overflow 2): all go back to the pool, which closes the two
    beyond its size; then units keep connections again, no more than the pool's size."""
    release = asyncio.Event()
    all_inside = asyncio.Event()
    inside = 0

    async def reader() -> None:
        nonlocal inside
        async with database.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
            inside += 1
            if inside == 4:
                all_inside.set()
            await release.wait()

    tasks = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.wait_for(all_inside.wait(), 10)
    assert database.pool_status().checked_out >= 4
    release.set()
    await asyncio.gather(*tasks)
    pool = read_engine(database).sync_engine.pool
    assert pool.checkedout() == 0
    assert database.pool_status().overflow == 0
    await asyncio.gather(*(database_read(database) for _ in range(2)))
    await asyncio.gather(*(database_read(database) for _ in range(2)))
    status = database.pool_status()
    assert status.checked_out == 0
    assert status.overflow == 0
    assert 1 <= pool.checkedout() <= 2  # kept: out of the pool, idle, within its size


async def database_read(database: Database) -> None:
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        await asyncio.sleep(0)


async def test_the_leak_detector_sees_a_kept_connection_while_lent(database: Database) -> None:
    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    assert database.leaks.held() == []
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        held = database.leaks.held()
        assert len(held) == 1
        assert held[0].task == asyncio.current_task().get_name()  # type: ignore[union-attr]
    assert database.leaks.held() == []


async def test_a_disposed_pools_kept_connection_is_not_lent(database: Database) -> None:
    """A restore disposes the engines: kept connections of the old pool must not serve."""
    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        old = await driver_of(connection)
    await read_engine(database).dispose()
    assert database.pool_status().checked_out == 0  # the old pool's kept one is not counted
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        assert await driver_of(connection) is not old
    assert driver_closed(old)  # closed, not left open in the disposed pool


async def test_an_invalidated_pools_kept_connection_is_not_lent(database: Database) -> None:
    await warm_up(database)
    async with database.read_connection() as connection:
        old = await driver_of(connection)
    await asyncio.sleep(0.02)  # the pool compares its invalidation time with the connection's
    read_engine(database).sync_engine.pool._invalidate_time = time.time()
    async with database.read_connection() as connection:
        assert await driver_of(connection) is not old


async def test_close_closes_kept_connections_without_waiting(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(make_settings(database_url))
    await db.start()
    await warm_up(db)
    async with db.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    pool = read_engine(db).sync_engine.pool
    assert pool.checkedout() == 1
    with caplog.at_level(logging.WARNING, logger="bastion"):
        await db.close(timeout_s=5)
    assert pool.checkedout() == 0
    assert "still in use" not in caplog.text


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_statement_deadline_is_lifted_when_a_connection_is_kept(
    database_url: str,
) -> None:
    """The pool's reset lifted the last statement's deadline (bastion._sqlite); keeping a
    connection must too, or the next unit's BEGIN could be interrupted by a stale one."""
    db = Database(make_settings(database_url, DB_STATEMENT_TIMEOUT=5))
    async with db:
        await warm_up(db)
        async with db.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
            sqlite_connection = (await driver_of(connection))._conn  # type: ignore[attr-defined]
        assert read_engine(db).sync_engine.pool.checkedout() == 1  # kept, not reset by the pool
        deadline = sqlite_connection.bastion_deadline
        assert deadline is not None
        assert deadline[0] == _NO_DEADLINE


async def test_a_kept_connection_never_keeps_an_admitted_unit_waiting(database_url: str) -> None:
    """Session units share the read pool but not the kept connections: each has kept ones
    closed when the pool has none to lend, and takes its connection at once, so two admitted
    together cannot count the same free one (the second would wait past DB_POOL_TIMEOUT while
    the first holds it)."""
    settings = make_settings(database_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)
    async with Database(settings) as db:
        await warm_up(db)
        async with db.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        pool = read_engine(db).sync_engine.pool
        assert pool.checkedout() == 1  # kept: size 2 less the one left for ungated checkouts

        async def session_read(pause_s: float, hold_s: float, consistent: bool) -> None:
            async with db.read(consistent=consistent) as session:
                await asyncio.sleep(pause_s)  # before the first statement
                assert await session.scalar(NAME_OF, {"uid": uuid.uuid4()}) is None
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(session_read(0.05, 1.5, consistent=False))
        await asyncio.sleep(0.01)
        await session_read(0.2, 0, consistent=True)
        await first
        async with db.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        assert db.pool_status().checked_out == 0


async def test_nothing_is_kept_with_pre_ping(database_url: str) -> None:
    """A kept connection would skip the ping the pool gives each checkout."""
    async with Database(make_settings(database_url, DB_POOL_PRE_PING=True)) as db:
        await warm_up(db)
        async with db.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        assert read_engine(db).sync_engine.pool.checkedout() == 0


async def test_a_pool_listener_added_later_stops_the_keeping(database: Database) -> None:
    """Kept connections skip the pool's checkout, check-in and reset: an application's
    listener there must see every unit's connection."""
    await warm_up(database)
    async with database.read_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    pool = read_engine(database).sync_engine.pool
    assert pool.checkedout() == 1
    checkouts = PoolCheckouts(read_engine(database))
    for _ in range(2):
        async with database.read_connection() as connection:
            await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
    assert checkouts.count == 2
    assert pool.checkedout() == 0


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_kept_connection_the_server_dropped_fails_once_then_is_replaced(
    database: Database,
) -> None:
    """As with a pooled connection: the next statement on it fails as a disconnect, which
    invalidates the pool (kept connections with it), and a re-run gets a new connection."""
    backend_pid = select(func.pg_backend_pid())
    for _ in range(2):  # the second run is on the lean path: its connection is kept
        async with database.read_connection() as connection:
            pid = await connection.scalar(backend_pid)
    assert read_engine(database).sync_engine.pool.checkedout() == 1
    admin = await asyncpg.connect(
        asyncpg_dsn(database.settings.url.render_as_string(hide_password=False))
    )
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.1)

    async def read_pid(connection: AsyncConnection) -> int:
        return int(await connection.scalar(backend_pid))

    assert await database.run(database.read_connection, read_pid) != pid
    assert database.pool_status().checked_out == 0
