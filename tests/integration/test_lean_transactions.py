"""A write unit's BEGIN and COMMIT without a greenlet (bastion._lean_transactions).

``Database.write_connection()`` awaits the driver's BEGIN and COMMIT itself instead of running
SQLAlchemy's ``begin()`` and ``commit()`` in greenlets. Each test that says what a unit must
still get (its own transaction, the write lock at BEGIN, one commit counted, SQLAlchemy's
errors for a failed BEGIN or COMMIT, a usable connection after) runs on that path ("lean")
and on SQLAlchemy's own ("sqlalchemy", the two calls put back), so the two are held to the
same outcome. Where the lean path steps aside (listeners of the application's, a savepoint),
SQLAlchemy's runs, and the tests say so by the greenlets it spawns.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
import sqlalchemy.ext.asyncio.engine
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

import bastion.database
from bastion import Database, ForeignKeyViolationError, TransactionConflictError
from tests.conftest import make_settings
from tests.integration.kept_connections import USERS, small_pools

HOW_MANY = select(func.count()).select_from(USERS)


@pytest.fixture(params=["lean", "sqlalchemy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which path write units begin and commit on: Bastion's, or SQLAlchemy's put back."""
    if request.param == "sqlalchemy":

        async def begin(connection: AsyncConnection) -> None:
            await connection.begin()

        async def commit(connection: AsyncConnection) -> None:
            await connection.commit()

        monkeypatch.setattr(bastion.database, "begin_write", begin)
        monkeypatch.setattr(bastion.database, "commit_write", commit)
    return str(request.param)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The functions SQLAlchemy's asyncio connections ran in greenlets, by name."""
    spawned: Counter[str] = Counter()
    real = sqlalchemy.ext.asyncio.engine.greenlet_spawn

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        spawned[getattr(fn, "__qualname__", repr(fn))] += 1
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy.ext.asyncio.engine, "greenlet_spawn", counting)
    return spawned


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    async with Database(small_pools(database_url)) as db:
        yield db


async def add_user(connection: AsyncConnection, name: str) -> None:
    await connection.execute(insert(USERS).values(id=uuid.uuid4(), name=name))


async def count_users(database: Database) -> int:
    async with database.read_connection() as connection:
        return int(await connection.scalar(HOW_MANY) or 0)


def commits(database: Database) -> float:
    registry = database.metrics.registry
    return registry.get_sample_value("bastion_transactions_total", {"outcome": "commit"}) or 0


@pytest.mark.usefixtures("backend")
async def test_a_write_unit_begins_and_commits_without_a_greenlet(
    database: Database, spawned: Counter[str]
) -> None:
    async with database.write_connection() as connection:
        await connection.returning(
            insert(USERS).values(id=uuid.uuid4(), name="lean").returning(USERS.c.id), {}
        )
    assert await count_users(database) == 1
    assert spawned["Connection.begin"] == spawned["Connection.commit"] == 0


@pytest.mark.usefixtures("backend")
async def test_a_unit_an_application_listens_to_begins_and_commits_as_sqlalchemy_does(
    database: Database, spawned: Counter[str]
) -> None:
    """A ``begin`` or ``commit`` listener of the application's may await the driver: those
    units take SQLAlchemy's path, and the listener hears each of them once."""
    heard: list[str] = []
    engine = database.engines[0].sync_engine
    event.listen(engine, "begin", lambda _connection: heard.append("begin"))
    event.listen(engine, "commit", lambda _connection: heard.append("commit"))
    for name in ("first", "second"):
        async with database.write_connection() as connection:
            await add_user(connection, name)
    assert heard == ["begin", "commit", "begin", "commit"]
    assert spawned["Connection.begin"] == spawned["Connection.commit"] == 2
    assert await count_users(database) == 2


@pytest.mark.usefixtures("backend")
async def test_each_unit_commits_its_rows_and_a_unit_that_raises_commits_none(
    database: Database, path: str
) -> None:
    for name in ("one", "two"):
        async with database.write_connection() as connection:
            await add_user(connection, name)
    with pytest.raises(RuntimeError):
        async with database.write_connection() as connection:
            await add_user(connection, "lost")
            raise RuntimeError("the route failed")
    async with database.write_connection() as connection:
        await add_user(connection, "three")
    assert await count_users(database) == 3
    assert commits(database) == 3  # one per committed unit, the commit listener told once
    assert database.pool_status().checked_out == 0


@pytest.mark.usefixtures("backend")
async def test_a_savepoint_in_the_unit_is_released_and_committed(
    database: Database, path: str
) -> None:
    async with database.write_connection() as connection:
        await add_user(connection, "outer")
        async with connection.begin_nested():
            await add_user(connection, "inner")
        savepoint = await connection.begin_nested()
        await add_user(connection, "undone")
        await savepoint.rollback()
    assert await count_users(database) == 2


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_write_lock_is_taken_at_begin_and_released_at_commit(
    database: Database, path: str
) -> None:
    file = database.settings.url.database or ""

    def lock_is_free() -> bool:
        other = sqlite3.connect(file, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            other.close()

    async with database.write_connection():
        assert not lock_is_free()  # taken before the unit's first statement
    assert lock_is_free()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_unit_of_sqlalchemys_after_a_lean_one_still_sends_its_begin(
    database_url: str, path: str
) -> None:
    """On the same driver connection (one connection, none kept without overflow), an ORM
    write unit still begins with ``BEGIN IMMEDIATE``: nothing is left telling Bastion's
    ``begin`` listener that it was sent already, so the unit's rollback undoes its write."""
    settings = make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    async with Database(settings) as database:
        async with database.write_connection() as connection:
            await add_user(connection, "lean")
            first = (await connection.get_raw_connection()).driver_connection
        with pytest.raises(RuntimeError):
            async with database.write() as session:
                raw = await (await session.connection()).get_raw_connection()
                assert raw.driver_connection is first
                await session.execute(insert(USERS).values(id=uuid.uuid4(), name="undone"))
                raise RuntimeError("the route failed")
        assert await count_users(database) == 1


async def test_a_begin_that_finds_the_file_locked_fails_as_sqlalchemys_and_frees_the_connection(
    tmp_path: Path, path: str
) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'locked.db'}", DB_SQLITE_BUSY_TIMEOUT=200)
    async with Database(settings) as database:
        async with database.write_connection() as connection:
            await connection.execute(text("CREATE TABLE t (n INT)"))
        other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write, in progress
        try:
            with pytest.raises(TransactionConflictError) as raised:
                async with database.write_connection() as connection:
                    await connection.execute(text("INSERT INTO t VALUES (1)"))
            assert raised.value.retryable
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert database.pool_status().checked_out == 0
        async with database.write_connection() as connection:
            await connection.execute(text("INSERT INTO t VALUES (2)"))
        async with database.read_connection() as connection:
            assert (await connection.execute(text("SELECT n FROM t"))).scalars().all() == [2]


DEFERRED = [
    "CREATE TABLE lean_parents (id integer PRIMARY KEY)",
    "CREATE TABLE lean_children (id integer PRIMARY KEY, parent_id integer NOT NULL "
    "REFERENCES lean_parents (id) DEFERRABLE INITIALLY DEFERRED)",
]


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_failed_commit_fails_as_sqlalchemys_and_leaves_a_usable_connection(
    database: Database, path: str
) -> None:
    """A deferred foreign key is checked at COMMIT: the unit's body succeeds, COMMIT fails."""
    async with database.write_connection() as connection:
        for statement in DEFERRED:
            await connection.execute(text(statement))
    try:
        committed = commits(database)
        with pytest.raises(ForeignKeyViolationError):
            async with database.write_connection() as connection:
                await connection.execute(text("INSERT INTO lean_children VALUES (1, 99)"))
        assert commits(database) == committed + 1  # told before COMMIT, as SQLAlchemy tells it
        async with database.write_connection() as connection:
            await connection.execute(text("INSERT INTO lean_children VALUES (2, 98)"))
            with pytest.raises(sqlalchemy.exc.IntegrityError):
                await bastion.database.commit_write(connection)
            # As after SQLAlchemy's failed commit: still the connection's transaction, inactive,
            # until rolled back.
            transaction = connection.get_transaction()
            assert transaction is not None
            assert not transaction.is_active
            await connection.rollback()
        assert database.pool_status().checked_out == 0
        async with database.write_connection() as connection:
            await connection.execute(text("INSERT INTO lean_parents VALUES (99)"))
            await connection.execute(text("INSERT INTO lean_children VALUES (1, 99)"))
        async with database.read_connection() as connection:
            rows = await connection.execute(text("SELECT id, parent_id FROM lean_children"))
            assert rows.all() == [(1, 99)]
    finally:
        async with database.write_connection() as connection:
            await connection.execute(text("DROP TABLE lean_children, lean_parents"))
