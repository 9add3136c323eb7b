"""Write units reuse a connection kept from an earlier write unit (bastion._warm_connections).

A kept connection stays checked out of the write pool between units, with no transaction
open, and the next ``write_connection()`` unit begins its own on the same driver connection.
The tests say what the next unit must still get: its own transaction (atomic, rolled back on
error), the engine's isolation, no lock left behind, and a pool that ORM write units can
still use. The read side is ``test_warm_connections.py``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bastion import Database
from conversations.models import User
from tests.conftest import make_settings
from tests.faults.leaks import asyncpg_dsn
from tests.integration.kept_connections import NAME_OF, USERS, driver_of, small_pools

HOW_MANY = select(func.count()).select_from(USERS)

pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    async with Database(small_pools(database_url)) as db:
        yield db


def write_engine(database: Database) -> AsyncEngine:
    return database.engines[0]


def kept(database: Database) -> int:
    """Connections out of the write pool with no unit running: the kept ones."""
    return int(write_engine(database).sync_engine.pool.checkedout())


async def add_user(database: Database, name: str) -> object:
    """Insert a user in a write unit; the unit's driver connection."""
    async with database.write_connection() as connection:
        await connection.execute(insert(USERS).values(id=uuid.uuid4(), name=name))
        return await driver_of(connection)


async def count_users(database: Database) -> int:
    async with database.read_connection() as connection:
        return int(await connection.scalar(HOW_MANY) or 0)


async def test_a_write_unit_reuses_the_last_units_connection(database: Database) -> None:
    drivers = [await add_user(database, f"user {n}") for n in range(4)]
    assert len(set(map(id, drivers))) == 1
    assert kept(database) == 1  # kept out of the pool, idle
    assert database.pool_status().checked_out == 0
    assert await count_users(database) == 4  # each unit committed


async def test_a_unit_on_a_kept_connection_is_still_rolled_back_when_it_raises(
    database: Database,
) -> None:
    first = await add_user(database, "kept")
    with pytest.raises(RuntimeError):
        async with database.write_connection() as connection:
            assert await driver_of(connection) is first
            await connection.execute(insert(USERS).values(id=uuid.uuid4(), name="lost"))
            raise RuntimeError("the route failed")
    assert kept(database) == 0  # a unit that raised goes back to the pool
    assert await count_users(database) == 1
    assert await add_user(database, "after") is first  # the pool's reset made it fit again
    assert await count_users(database) == 2


async def test_a_kept_connection_holds_no_lock(database: Database) -> None:
    """Between units the kept connection is idle: another client can take the table's
    strongest lock (PostgreSQL) or SQLite's write lock at once."""
    await add_user(database, "kept")
    assert kept(database) == 1
    url = database.settings.url
    if database.backend == "sqlite":
        other = sqlite3.connect(url.database or "", timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
        return
    admin = await asyncpg.connect(asyncpg_dsn(url.render_as_string(hide_password=False)))
    try:
        async with admin.transaction():
            await admin.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE NOWAIT")
    finally:
        await admin.close()


async def test_execution_options_set_in_a_unit_do_not_reach_the_next(database: Database) -> None:
    await add_user(database, "warm")
    async with database.write_connection() as connection:
        await connection.execution_options(bastion_probe="mine")
    assert kept(database) == 0
    async with database.write_connection() as connection:
        assert connection.sync_connection is not None
        assert "bastion_probe" not in connection.sync_connection.get_execution_options()


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_an_isolation_level_set_in_a_unit_does_not_reach_the_next(
    database: Database,
) -> None:
    await add_user(database, "warm")
    async with database.write_connection() as connection:
        await connection.commit()  # SQLAlchemy sets an isolation level only between transactions
        await connection.execution_options(isolation_level="SERIALIZABLE")
        assert await connection.scalar(text("SHOW transaction_isolation")) == "serializable"
    async with database.write_connection() as connection:
        assert await connection.scalar(text("SHOW transaction_isolation")) == "read committed"


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_connection_switched_to_autocommit_is_not_kept(database: Database) -> None:
    """A write unit relies on its BEGIN; the pool would not see this switch either."""
    await add_user(database, "warm")
    async with database.write_connection() as connection:
        adapter = (await connection.get_raw_connection()).dbapi_connection
        await connection.execute(insert(USERS).values(id=uuid.uuid4(), name="in it"))
        adapter.autocommit = True  # type: ignore[union-attr]
    assert kept(database) == 0
    adapter.autocommit = False  # type: ignore[union-attr]  # for the pool's next unit


@pytest.mark.parametrize("backend", ["postgresql"])  # SQLite runs one write unit at a time
async def test_orm_write_units_admitted_beside_kept_connections_do_not_wait(
    database_url: str,
) -> None:
    """ORM write units take their connection from the pool, where kept ones count: kept ones
    are closed while the pool could not lend one to each such unit, counting every one
    admitted, so two admitted together do not count the same free connection."""
    settings = make_settings(database_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=1, DB_POOL_TIMEOUT=1)
    async with Database(settings) as db:
        both_in = asyncio.Event()

        async def core_write(name: str) -> None:
            async with db.write_connection() as connection:
                await connection.execute(insert(USERS).values(id=uuid.uuid4(), name=name))
                if both_in.is_set():
                    return
                both_in.set()
                await asyncio.sleep(0.1)

        await asyncio.gather(core_write("a"), core_write("b"))
        assert kept(db) == 2  # the pool has one connection left to open (its overflow)

        async def orm_write(name: str, pause_s: float, hold_s: float) -> None:
            async with db.write() as session:
                await asyncio.sleep(pause_s)  # before the first statement
                session.add(User(name=name))
                await session.flush()
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(orm_write("first", 0.05, 1.5))
        await asyncio.sleep(0.01)
        await orm_write("second", 0.2, 0)
        await first
        assert await count_users(db) == 4
        assert db.pool_status().checked_out == 0


async def test_an_orm_write_unit_begins_at_its_first_statement(database: Database) -> None:
    """As SQLAlchemy's session does: ``session.begin()`` works in the block, and SQLite's
    write lock is not taken before the first statement."""
    await add_user(database, "kept")
    assert kept(database) == 1
    async with database.write() as session:
        if database.backend == "sqlite":
            other = sqlite3.connect(database.settings.url.database or "", timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # raises "database is locked" if it is held
                other.execute("ROLLBACK")
            finally:
                other.close()
        async with session.begin():
            session.add(User(name="in its own begin"))
    assert await count_users(database) == 2


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_an_orm_write_units_isolation_level_is_honoured(database: Database) -> None:
    await add_user(database, "kept")
    async with database.write() as session:
        connection = await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
        assert await connection.scalar(text("SHOW transaction_isolation")) == "serializable"


async def test_with_no_overflow_write_units_keep_nothing(database_url: str) -> None:
    """The write engine is db.engine: its own checkouts pass no gate, and must not wait for
    idle kept connections."""
    settings = make_settings(database_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1)
    async with Database(settings) as db:
        await add_user(db, "not kept")
        assert kept(db) == 0

        async def hold_a_connection() -> None:
            async with db.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
                await asyncio.sleep(0.3)

        await asyncio.gather(hold_a_connection(), hold_a_connection())


async def test_an_engine_connect_listener_added_later_stops_the_keeping(
    database: Database,
) -> None:
    """Each unit's new Connection fires engine_connect, which a kept one would skip."""
    await add_user(database, "kept")
    assert kept(database) == 1
    connects: list[object] = []
    event.listen(write_engine(database).sync_engine, "engine_connect", connects.append)
    await add_user(database, "a")
    await add_user(database, "b")
    assert len(connects) == 2
    assert kept(database) == 0


async def test_a_connection_whose_pool_was_disposed_during_its_unit_is_not_kept(
    database: Database,
) -> None:
    await add_user(database, "kept")
    async with database.write_connection() as connection:
        await connection.execute(insert(USERS).values(id=uuid.uuid4(), name="across"))
        old = await driver_of(connection)
        await write_engine(database).dispose()  # as a restore does
    warm = database._warm_writes
    assert warm is not None
    assert all([await driver_of(idle) is not old for idle in warm._idle])
    assert await add_user(database, "after") is not old


async def test_the_leak_detector_sees_a_kept_write_connection_while_lent(
    database: Database,
) -> None:
    await add_user(database, "kept")
    assert database.leaks.held() == []
    async with database.write_connection() as connection:
        await connection.execute(NAME_OF, {"uid": uuid.uuid4()})
        assert len(database.leaks.held()) == 1
    assert database.leaks.held() == []


async def test_close_closes_kept_write_connections_without_waiting(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(make_settings(database_url))
    await db.start()
    await add_user(db, "kept")
    pool = write_engine(db).sync_engine.pool
    assert pool.checkedout() == 1
    with caplog.at_level(logging.WARNING, logger="bastion"):
        await db.close(timeout_s=5)
    assert pool.checkedout() == 0
    assert "still in use" not in caplog.text


async def test_nothing_is_kept_with_pre_ping(database_url: str) -> None:
    async with Database(make_settings(database_url, DB_POOL_PRE_PING=True)) as db:
        await add_user(db, "pinged")
        assert kept(db) == 0


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_write_on_a_kept_connection_the_server_dropped_is_run_again_once(
    database: Database,
) -> None:
    """The dropped connection fails at the unit's first statement, before anything was
    written; ``Database.run`` runs the unit again on a new connection, and the row is there
    once."""
    backend_pid = select(func.pg_backend_pid())
    async with database.write_connection() as connection:
        pid = await connection.scalar(backend_pid)
    assert kept(database) == 1
    admin = await asyncpg.connect(
        asyncpg_dsn(make_url(database.settings.url).render_as_string(hide_password=False))
    )
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.1)
    attempts: list[int] = []

    async def add(connection: AsyncConnection) -> None:
        attempts.append(1)
        await connection.execute(insert(USERS).values(id=uuid.uuid4(), name="once"))

    await database.run(database.write_connection, add)
    assert len(attempts) == 2
    assert await count_users(database) == 1
    assert database.pool_status().checked_out == 0
