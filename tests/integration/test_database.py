"""Database: lifecycle, units of work and error translation, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError

from bastion import (
    CheckViolationError,
    ConfigurationError,
    Database,
    DatabaseSettings,
    DatabaseState,
    DatabaseStateError,
    DatabaseUnavailableError,
    ForeignKeyViolationError,
    NotNullViolationError,
    PoolTimeoutError,
    ReadOnlyViolationError,
    TransactionConflictError,
    UniqueViolationError,
)
from tests.conftest import make_settings
from tests.integration.conftest import Child, Parent


class BoomError(Exception):
    pass


async def count_parents(database: Database) -> int:
    async with database.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Parent)) or 0)


async def test_a_write_unit_commits_when_its_block_ends(probe_tables: Database) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="one"))

    async with probe_tables.read() as session:
        assert await session.scalar(select(Parent.name).where(Parent.id == 1)) == "one"


async def test_a_write_unit_rolls_back_and_reraises_when_its_block_raises(
    probe_tables: Database,
) -> None:
    with pytest.raises(BoomError):
        async with probe_tables.write() as session:
            session.add(Parent(id=1, name="one"))
            await session.flush()
            raise BoomError

    assert await count_parents(probe_tables) == 0


WRITES_IN_DISGUISE = {
    "orm_add": None,
    "core_insert": lambda: insert(Parent).values(id=2, name="two"),
    "raw_sql": lambda: text("INSERT INTO probe_parents (id, name) VALUES (3, 'three')"),
    "insert_in_a_cte": lambda: select(
        insert(Parent).values(id=4, name="four").returning(Parent.id).cte("written")
    ),
}


@pytest.mark.parametrize(
    ("unit", "write"),
    [
        (unit, write)
        for unit in ("read", "read_consistent", "read_connection")
        for write in WRITES_IN_DISGUISE
        if not (unit == "read_connection" and write == "orm_add")  # no session to add to
    ],
)
async def test_a_read_unit_cannot_write_whatever_sql_it_runs(
    probe_tables: Database, unit: str, write: str
) -> None:
    statement = WRITES_IN_DISGUISE[write]
    if write == "insert_in_a_cte" and probe_tables.backend == "sqlite":
        pytest.skip("SQLite has no data-modifying CTEs")
    with pytest.raises(ReadOnlyViolationError):
        if unit == "read_connection":
            assert statement is not None
            async with probe_tables.read_connection() as connection:
                await connection.execute(statement())
        else:
            async with probe_tables.read(consistent=unit == "read_consistent") as session:
                if statement is None:
                    session.add(Parent(id=1, name="one"))
                else:
                    await session.execute(statement())

    assert await count_parents(probe_tables) == 0


async def test_a_consistent_read_unit_reads_in_one_snapshot(probe_tables: Database) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="one"))

    async def add_second_parent() -> None:
        async with probe_tables.write() as session:
            session.add(Parent(id=2, name="two"))

    async with probe_tables.read(consistent=True) as session:
        before = await session.scalar(select(func.count()).select_from(Parent))
        await add_second_parent()
        after = await session.scalar(select(func.count()).select_from(Parent))
    async with probe_tables.read() as session:
        now = await session.scalar(select(func.count()).select_from(Parent))

    assert (before, after, now) == (1, 1, 2)


async def test_a_plain_read_unit_sees_each_statements_own_moment(probe_tables: Database) -> None:
    """The control for the test above: without consistent=True, the second count moves."""
    async with probe_tables.read() as session:
        before = await session.scalar(select(func.count()).select_from(Parent))
        async with probe_tables.write() as writer:
            writer.add(Parent(id=1, name="one"))
        after = await session.scalar(select(func.count()).select_from(Parent))

    assert (before, after) == (0, 1)


@pytest.mark.parametrize(
    ("row", "error", "code"),
    [
        ({"id": 2, "name": "taken"}, UniqueViolationError, "unique_violation"),
        ({"id": 1, "name": "other"}, UniqueViolationError, "unique_violation"),
        ({"id": 3, "name": None}, NotNullViolationError, "not_null_violation"),
        ({"id": 4, "name": "x" * 30}, CheckViolationError, "check_violation"),
    ],
)
async def test_constraint_violations_become_errors_the_caller_can_act_on(
    probe_tables: Database, row: dict[str, object], error: type[Exception], code: str
) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="taken"))

    with pytest.raises(error) as caught:
        async with probe_tables.write() as session:
            session.add(Parent(note="hunter2", **row))

    assert caught.value.code == code  # type: ignore[attr-defined]
    assert caught.value.sqlstate  # type: ignore[attr-defined]
    assert isinstance(caught.value.__cause__, IntegrityError)
    # Parameters (which may be secrets or personal data) never reach the message.
    assert "hunter2" not in str(caught.value)
    assert await count_parents(probe_tables) == 1


async def test_a_missing_parent_is_a_foreign_key_violation(probe_tables: Database) -> None:
    with pytest.raises(ForeignKeyViolationError):
        async with probe_tables.write() as session:
            session.add(Child(id=1, parent_id=999))


async def test_timestamps_are_stored_and_returned_as_aware_utc(probe_tables: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 5, 1, 12, 30, tzinfo=plus_two)
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="one", at=local))

    async with probe_tables.read() as session:
        stored = await session.scalar(select(Parent.at))
    assert stored == local
    assert stored is not None
    assert stored.utcoffset() == timedelta(0)
    assert stored.hour == 10


async def test_naive_timestamps_are_refused(probe_tables: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        async with probe_tables.write() as session:
            session.add(Parent(id=1, name="one", at=datetime(2026, 5, 1, 12, 30)))
    assert await count_parents(probe_tables) == 0


async def test_an_exhausted_pool_answers_pool_timeout_instead_of_hanging(
    database_url: str,
) -> None:
    settings = make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=0.2)
    async with Database(settings) as database:
        async with database.read() as holder:
            await holder.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError):
                async with database.read() as session:
                    await session.execute(text("SELECT 1"))
        assert database.pool_status().checked_out == 0


async def test_units_waiting_for_a_connection_are_served_in_arrival_order(
    database_url: str,
) -> None:
    # See bastion._pool_gate: without the gate, a unit arriving while a woken waiter had not
    # yet run took the connection, and that waiter went to the back of the line.
    settings = make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    async with Database(settings) as database:
        served: list[int] = []

        async def read(n: int) -> None:
            async with database.read_connection() as connection:
                await connection.execute(text("SELECT 1"))
                served.append(n)

        tasks = []
        for n in range(20):
            tasks.append(asyncio.create_task(read(n)))
            await asyncio.sleep(0)  # each one asks before the next arrives
        await asyncio.gather(*tasks)
        assert served == list(range(20))
        assert database.pool_status().checked_out == 0


async def test_a_cancelled_unit_returns_its_connection(probe_tables: Database) -> None:
    entered = asyncio.Event()

    async def stuck_writer() -> None:
        async with probe_tables.write() as session:
            session.add(Parent(id=1, name="one"))
            await session.flush()
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(stuck_writer())
    await entered.wait()
    assert probe_tables.pool_status().checked_out == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the shielded close finishes on its own, soon
        if probe_tables.pool_status().checked_out == 0:
            break
        await asyncio.sleep(0.02)
    assert probe_tables.pool_status().checked_out == 0
    assert await count_parents(probe_tables) == 0


async def test_lifecycle_is_start_once_close_once(settings: DatabaseSettings) -> None:
    database = Database(settings)
    assert database.state is DatabaseState.NEW
    with pytest.raises(DatabaseStateError, match="new, not running"):
        async with database.read():
            pass

    await database.start()
    assert database.state is DatabaseState.RUNNING
    with pytest.raises(DatabaseStateError, match="create a new Database"):
        await database.start()

    await database.close()
    await database.close()  # harmless
    assert database.state is DatabaseState.CLOSED
    with pytest.raises(DatabaseStateError, match="closed, not running"):
        async with database.write():
            pass
    with pytest.raises(DatabaseStateError, match="create a new Database"):
        await database.start()


async def test_close_waits_for_running_units_then_closes(settings: DatabaseSettings) -> None:
    database = Database(settings)
    await database.start()
    release = asyncio.Event()

    async def running_unit() -> int:
        async with database.read() as session:
            await session.execute(text("SELECT 1"))
            await release.wait()
            return int(await session.scalar(text("SELECT 2")) or 0)

    unit = asyncio.create_task(running_unit())
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(database.close(timeout_s=10))
    await asyncio.sleep(0.1)
    assert database.state is DatabaseState.CLOSING
    with pytest.raises(DatabaseStateError):
        async with database.read():
            pass
    release.set()
    assert await unit == 2
    await closing
    assert database.state is DatabaseState.CLOSED


async def test_close_gives_up_waiting_after_its_timeout(settings: DatabaseSettings) -> None:
    database = Database(settings)
    await database.start()
    release = asyncio.Event()

    async def stuck_unit() -> None:
        async with database.read() as session:
            await session.execute(text("SELECT 1"))
            await release.wait()

    unit = asyncio.create_task(stuck_unit())
    await asyncio.sleep(0.05)
    await database.close(timeout_s=0.2)
    assert database.state is DatabaseState.CLOSED
    release.set()
    await unit


@pytest.mark.postgres
async def test_start_fails_fast_with_a_clear_error_when_postgres_is_unreachable() -> None:
    settings = DatabaseSettings(
        DATABASE_URL="postgresql://app:hunter2@127.0.0.1:1/app", DB_CONNECT_TIMEOUT=2
    )
    database = Database(settings)
    with pytest.raises(DatabaseUnavailableError) as caught:
        await database.start()
    message = str(caught.value)
    assert "cannot connect to postgresql+asyncpg://app:***@127.0.0.1:1/app" in message
    assert "hunter2" not in message
    assert "hunter2" not in repr(database)
    assert database.state is DatabaseState.CLOSED


async def test_start_fails_when_the_sqlite_directory_cannot_be_made(tmp_path: object) -> None:
    blocker = tmp_path / "file"  # type: ignore[operator]
    blocker.write_text("not a directory")
    database = Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{blocker}/sub/app.db"))
    with pytest.raises(ConfigurationError, match="DATABASE_URL: cannot create the directory"):
        await database.start()


async def test_in_memory_sqlite_is_one_database_shared_by_units_in_turn() -> None:
    async with Database(DatabaseSettings(DATABASE_URL=":memory:")) as database:
        async with database.write() as session:
            await session.execute(text("CREATE TABLE t (x INTEGER)"))
            await session.execute(text("INSERT INTO t VALUES (1)"))

        async def read_one() -> int:
            async with database.read() as session:
                return int(await session.scalar(text("SELECT x FROM t")) or 0)

        assert await asyncio.gather(*(read_one() for _ in range(5))) == [1] * 5


async def test_sqlite_writers_queue_for_the_lock_instead_of_failing(tmp_path: object) -> None:
    """Read-modify-write from 40 concurrent units: none fails, no update is lost."""
    path = tmp_path / "counter.db"  # type: ignore[operator]
    async with Database(make_settings(f"sqlite:///{path}", DB_POOL_SIZE=8)) as database:
        async with database.write() as session:
            await session.execute(text("CREATE TABLE counter (value INTEGER NOT NULL)"))
            await session.execute(text("INSERT INTO counter VALUES (0)"))

        async def increment() -> None:
            async with database.write() as session:
                value = await session.scalar(text("SELECT value FROM counter"))
                await asyncio.sleep(0)  # let the other writers pile up on the lock
                await session.execute(
                    text("UPDATE counter SET value = :v"), {"v": int(value or 0) + 1}
                )

        await asyncio.gather(*(increment() for _ in range(40)))

        async with database.read() as session:
            assert await session.scalar(text("SELECT value FROM counter")) == 40


async def test_a_read_connection_reads_and_refuses_writes(probe_tables: Database) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="one"))

    async with probe_tables.read_connection() as connection:
        rows = (await connection.execute(select(Parent.id, Parent.name))).all()
    with pytest.raises(ReadOnlyViolationError, match="read unit cannot write"):
        async with probe_tables.read_connection() as connection:
            await connection.execute(insert(Parent).values(id=2, name="two"))

    assert [tuple(row) for row in rows] == [(1, "one")]
    assert await count_parents(probe_tables) == 1


async def test_a_write_connection_commits_or_rolls_back(probe_tables: Database) -> None:
    async with probe_tables.write_connection() as connection:
        await connection.execute(insert(Parent).values(id=1, name="one"))
    with pytest.raises(BoomError):
        async with probe_tables.write_connection() as connection:
            await connection.execute(insert(Parent).values(id=2, name="two"))
            raise BoomError
    with pytest.raises(UniqueViolationError):
        async with probe_tables.write_connection() as connection:
            await connection.execute(insert(Parent).values(id=3, name="one"))

    assert await count_parents(probe_tables) == 1


async def test_the_applications_own_errors_pass_through_a_unit_untouched(
    probe_tables: Database,
) -> None:
    with pytest.raises(FileNotFoundError):
        async with probe_tables.read() as session:
            await session.execute(select(Parent.id))
            raise FileNotFoundError("settings.yaml")
    with pytest.raises(TimeoutError):
        async with probe_tables.write() as session:
            session.add(Parent(id=1, name="one"))
            await session.flush()
            raise TimeoutError
    assert await count_parents(probe_tables) == 0


async def test_parameters_never_reach_the_errors_text_or_its_cause(
    probe_tables: Database,
) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="taken"))
    with pytest.raises(UniqueViolationError) as caught:
        async with probe_tables.write() as session:
            session.add(Parent(id=2, name="taken", note="hunter2-token"))

    assert "hunter2-token" not in str(caught.value)
    assert "hunter2-token" not in str(caught.value.__cause__)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_a_serialization_failure_is_a_transaction_conflict(probe_tables: Database) -> None:
    async with probe_tables.write() as session:
        session.add(Parent(id=1, name="one"))
    first_read = asyncio.Event()
    first_wrote = asyncio.Event()

    async def writer(name: str, *, first: bool) -> None:
        async with probe_tables.write() as session:
            await session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
            await session.scalar(select(Parent.name).where(Parent.id == 1))
            if first:
                first_read.set()
                await session.execute(text("UPDATE probe_parents SET note = :n"), {"n": name})
                await first_wrote.wait()
            else:
                await first_read.wait()
                first_wrote.set()
                await asyncio.sleep(0.1)
                await session.execute(text("UPDATE probe_parents SET note = :n"), {"n": name})

    results = await asyncio.gather(
        writer("a", first=True), writer("b", first=False), return_exceptions=True
    )

    conflicts = [r for r in results if isinstance(r, TransactionConflictError)]
    assert len(conflicts) == 1
    assert conflicts[0].sqlstate in ("40001", "40P01")


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_start_warns_when_the_pools_could_exceed_max_connections(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    crowded = make_settings(database_url, WEB_CONCURRENCY=1000)
    modest = make_settings(database_url, WEB_CONCURRENCY=1)
    with caplog.at_level("WARNING", logger="bastion.database"):
        async with Database(modest):
            pass
        assert "max_connections" not in caplog.text
        async with Database(crowded):
            pass
    assert "1000 worker(s) x 2 pool(s)" in caplog.text
    assert "exceed the server's max_connections" in caplog.text
