"""SELECTs on a read unit run on the lean path and answer exactly as ``execute`` does.

See :mod:`bastion._lean`. A result of the lean path is an ``IteratorResult``; SQLAlchemy's own
path returns a ``CursorResult``: that is how each test tells which path ran. Each comparison runs
the same statement both ways on the same connection (``execution_options={}`` sends a
statement down SQLAlchemy's path), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import (
    Integer,
    Select,
    String,
    bindparam,
    cast,
    event,
    func,
    insert,
    literal,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import Database, StatementTimeoutError
from conversations.models import ApiKey, Conversation, User
from tests.conftest import make_settings

pytestmark = pytest.mark.usefixtures("backend")

CONVERSATIONS = Conversation.__table__
TITLE_OF = select(CONVERSATIONS.c.title).where(CONVERSATIONS.c.id == bindparam("cid"))
SQLALCHEMY_PATH: dict[str, Any] = {}  # any execution options at all: SQLAlchemy's path


async def _seed(database: Database) -> tuple[uuid.UUID, list[uuid.UUID]]:
    owner = uuid.uuid4()
    ids = [uuid.uuid4() for _ in range(3)]
    async with database.write_connection() as connection:
        await connection.execute(insert(User.__table__).values(id=owner, name=f"lean-{owner}"))
        await connection.execute(
            insert(ApiKey.__table__).values(id=uuid.uuid4(), user_id=owner, key_hash="f" * 64)
        )
        for n, cid in enumerate(ids):
            await connection.execute(
                insert(CONVERSATIONS).values(
                    id=cid,
                    owner_id=owner,
                    title=f"title {n}",
                    metadata={"n": n, "tags": ["a", "é"], "nested": {"x": None}},
                    message_count=n,
                    created_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                    updated_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                )
            )
    return owner, ids


async def _both_ways(
    connection: AsyncConnection, statement: Select[Any], parameters: dict[str, Any] | None
) -> tuple[list[Any], list[Any]]:
    """The rows as mappings, first from SQLAlchemy's path, then from the lean path."""
    expected = await connection.execute(statement, parameters, execution_options=SQLALCHEMY_PATH)
    assert isinstance(expected, CursorResult)
    lean = await connection.execute(statement, parameters)
    assert isinstance(lean, IteratorResult), "the statement did not take the lean path"
    return _typed(expected.mappings()), _typed(lean.mappings())


def _typed(rows: Any) -> list[Any]:
    """Each row's values with their types: equal values of another type would not do."""
    return [{key: (value, type(value)) for key, value in row.items()} for row in rows]


async def test_select_rows_match_sqlalchemy_path(database: Database) -> None:
    owner, ids = await _seed(database)
    point = select(CONVERSATIONS).where(
        CONVERSATIONS.c.id == bindparam("cid"), CONVERSATIONS.c.owner_id == bindparam("owner")
    )
    orm_attributes = select(ApiKey.user_id).where(ApiKey.key_hash == bindparam("key_hash"))
    expanding_in = (
        select(CONVERSATIONS.c.id, CONVERSATIONS.c.title)
        .where(CONVERSATIONS.c.id.in_(bindparam("ids", expanding=True)))
        .order_by(CONVERSATIONS.c.title)
    )
    literals_and_aggregates = select(
        func.count().label("n"), func.max(CONVERSATIONS.c.message_count).label("most")
    ).where(CONVERSATIONS.c.owner_id == owner, CONVERSATIONS.c.title != "nobody")
    cases: list[tuple[Select[Any], dict[str, Any] | None]] = [
        (point, {"cid": ids[1], "owner": owner}),
        (point, {"cid": uuid.uuid4(), "owner": owner}),  # no row
        (orm_attributes, {"key_hash": "f" * 64}),
        (expanding_in, {"ids": ids[:2]}),
        (expanding_in, {"ids": ids}),  # another length: another expanded SQL text
        (literals_and_aggregates, None),
    ]
    async with database.read_connection() as connection:
        for statement, parameters in cases:
            expected, lean = await _both_ways(connection, statement, parameters)
            assert lean == expected
        # Values come back as SQLAlchemy's result processors make them, not as the driver's.
        row = (await connection.execute(point, {"cid": ids[2], "owner": owner})).one()
    assert row.id == ids[2]
    assert isinstance(row.id, uuid.UUID)
    assert row.created_at == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert row.metadata == {"n": 2, "tags": ["a", "é"], "nested": {"x": None}}
    assert row._mapping[CONVERSATIONS.c.title] == "title 2"


async def test_expanding_parameters_of_every_length_match_sqlalchemy_path(
    database: Database,
) -> None:
    # The lean path remembers each statement's expanded SQL per length of its lists
    # (bastion._lean._Expansion): lengths that come back, that change, an empty list, the same
    # list twice, lists between plain parameters and SQLAlchemy's own literal lists.
    owner, ids = await _seed(database)
    columns = select(CONVERSATIONS.c.id, CONVERSATIONS.c.title).order_by(CONVERSATIONS.c.title)
    around = columns.where(
        CONVERSATIONS.c.owner_id == bindparam("owner"),
        CONVERSATIONS.c.id.in_(bindparam("ids", expanding=True)),
        CONVERSATIONS.c.title != bindparam("not_title"),
        CONVERSATIONS.c.message_count.in_(bindparam("counts", expanding=True)),
    )
    twice = columns.where(
        CONVERSATIONS.c.id.in_(bindparam("ids", expanding=True))
        | CONVERSATIONS.c.owner_id.in_(bindparam("ids", expanding=True))
    )
    literal_list = columns.where(CONVERSATIONS.c.message_count.in_([0, 2]))
    unknown = uuid.uuid4()
    cases: list[tuple[Select[Any], dict[str, Any] | None]] = [
        (around, {"owner": owner, "ids": ids, "not_title": "title 1", "counts": [0, 1, 2]}),
        (around, {"owner": owner, "ids": ids[:1], "not_title": "x", "counts": [0]}),
        (around, {"owner": owner, "ids": ids, "not_title": "x", "counts": [2, 1, 0]}),
        (around, {"owner": owner, "ids": [], "not_title": "x", "counts": [0]}),
        (around, {"owner": owner, "ids": [ids[2], ids[0]], "not_title": "x", "counts": [0, 2]}),
        (around, {"owner": owner, "ids": ids[:1], "not_title": "title 0", "counts": [0]}),
        (around, {"owner": owner, "ids": (unknown, ids[1]), "not_title": "x", "counts": {1}}),
        (around, {"owner": owner, "ids": ids * 100, "not_title": "x", "counts": [0, 1, 2]}),
        (twice, {"ids": [ids[0], owner]}),
        (twice, {"ids": [ids[1]]}),
        (literal_list, None),
    ]
    async with database.read_connection() as connection:
        for statement, parameters in cases:
            expected, lean = await _both_ways(connection, statement, parameters)
            assert lean == expected, parameters
        rows = await connection.execute(
            around, {"owner": owner, "ids": ids, "not_title": "title 1", "counts": [0, 1, 2]}
        )
        assert [row.id for row in rows] == [ids[0], ids[2]]
        assert (await connection.execute(twice, {"ids": []})).all() == []


async def test_a_list_of_tuples_matches_sqlalchemy_path(database: Database) -> None:
    # Not remembered per length (a tuple's SQL depends on more than the list's length), yet
    # still lean, as SQLAlchemy expands it on every run.
    owner, ids = await _seed(database)
    pairs = (
        select(CONVERSATIONS.c.title)
        .where(
            tuple_(CONVERSATIONS.c.owner_id, CONVERSATIONS.c.message_count).in_(
                bindparam("pairs", expanding=True)
            )
        )
        .order_by(CONVERSATIONS.c.title)
    )
    async with database.read_connection() as connection:
        for chosen in ([(owner, 1)], [(owner, 0), (owner, 2)], [(ids[0], 0)]):
            expected, lean = await _both_ways(connection, pairs, {"pairs": chosen})
            assert lean == expected


async def test_result_api_matches(database: Database) -> None:
    owner, _ids = await _seed(database)
    titles = select(CONVERSATIONS.c.title).where(CONVERSATIONS.c.owner_id == bindparam("o"))
    titles = titles.order_by(CONVERSATIONS.c.title)
    parameters = {"o": owner}
    async with database.read_connection() as connection:
        await connection.execute(titles, parameters)  # first run: SQLAlchemy's, caches metadata
        assert await connection.scalar(titles, parameters) == "title 0"
        assert list(await connection.scalars(titles, parameters)) == [
            "title 0",
            "title 1",
            "title 2",
        ]
        result = await connection.execute(titles, parameters)
        assert isinstance(result, IteratorResult)
        assert list(result.keys()) == ["title"]
        assert [tuple(row) for row in result.all()] == [("title 0",), ("title 1",), ("title 2",)]
        one = await connection.execute(titles.limit(1), parameters)
        assert one.scalar_one() == "title 0"


async def test_a_statement_built_per_call_is_answered_by_its_own_columns(
    database: Database,
) -> None:
    owner, _ids = await _seed(database)

    def count_for(owner_id: uuid.UUID) -> Select[Any]:
        return select(func.count().label("n")).where(CONVERSATIONS.c.owner_id == owner_id)

    async with database.read_connection() as connection:
        await connection.execute(count_for(owner))
        statement = count_for(owner)  # equal to the cached one, not the same object
        result = await connection.execute(statement)
        assert isinstance(result, IteratorResult)
        row = result.one()
        # The literal owner id of *this* statement is the one bound, and its own column
        # object finds the value.
        assert row._mapping[statement.selected_columns[0]] == 3
        other = await connection.execute(count_for(uuid.uuid4()))
        assert other.scalar_one() == 0


async def test_a_read_unit_of_lean_statements_begins_no_sqlalchemy_transaction(
    database: Database,
) -> None:
    # Nothing to begin or roll back on the server, so no nominal transaction either (its begin
    # and rollback events cost a listener collection each per unit); SQLAlchemy's own path
    # still autobegins.
    owner, _ids = await _seed(database)
    statement = select(CONVERSATIONS.c.id).where(CONVERSATIONS.c.owner_id == bindparam("o"))
    registry = database.metrics.registry

    def rollbacks() -> float:
        return registry.get_sample_value("bastion_transactions_total", {"outcome": "rollback"}) or 0

    async with database.read_connection() as connection:
        await connection.execute(statement, {"o": owner})  # caches the result metadata
    before = rollbacks()
    async with database.read_connection() as connection:
        result = await connection.execute(statement, {"o": owner})
        assert isinstance(result, IteratorResult)
        assert len(result.all()) == 3
        assert not connection.in_transaction()
        assert await connection.scalar(text("SELECT 1")) == 1  # SQLAlchemy's path
        assert connection.in_transaction()
    assert rollbacks() == before + 1  # the SQLAlchemy-path statement's nominal transaction


async def test_lean_statements_are_counted_in_query_metrics(database: Database) -> None:
    owner, _ids = await _seed(database)
    statement = select(CONVERSATIONS.c.id).where(CONVERSATIONS.c.owner_id == bindparam("o"))
    async with database.read_connection() as connection:
        await connection.execute(statement, {"o": owner})
        before = database.metrics.queries
        for _ in range(5):
            result = await connection.execute(statement, {"o": owner})
            assert isinstance(result, IteratorResult)
    assert database.metrics.queries == before + 5
    assert any("conversations" in stats.fingerprint for stats in database.metrics.top(50))


@pytest.mark.parametrize("where", ["engine", "connection", "connection mid-unit"])
async def test_a_foreign_listener_sends_statements_down_sqlalchemy_path(
    database: Database, where: str
) -> None:
    # On the engine, or on the unit's own connection only (before its first statement or
    # after it): either way SQLAlchemy's path runs, with its execution context; once the
    # listener is gone, the lean path again.
    owner, _ids = await _seed(database)
    statement = select(CONVERSATIONS.c.id).where(CONVERSATIONS.c.owner_id == bindparam("o"))
    contexts: list[Any] = []

    def listener(
        _conn: Any, _cursor: Any, _sql: str, _params: Any, context: Any, _many: Any
    ) -> None:
        contexts.append(context)

    async with database.read_connection() as connection:
        await connection.execute(statement, {"o": owner})  # caches the result metadata
        engine = connection.sync_engine
    if where == "engine":
        # Listeners are checked once per unit: one added now is heeded from the next unit on.
        event.listen(engine, "before_cursor_execute", listener)
    try:
        async with database.read_connection() as connection:
            if where == "connection mid-unit":  # the lean path has run once in this unit
                assert isinstance(await connection.execute(statement, {"o": owner}), IteratorResult)
            if where.startswith("connection"):  # this connection only
                event.listen(connection.sync_connection, "before_cursor_execute", listener)
            result = await connection.execute(statement, {"o": owner})
    finally:
        if where == "engine":
            event.remove(engine, "before_cursor_execute", listener)
    assert isinstance(result, CursorResult)
    assert len(contexts) == 1
    assert contexts[0] is not None  # it saw SQLAlchemy's execution context
    async with database.read_connection() as connection:
        again = await connection.execute(statement, {"o": owner})
    assert isinstance(again, IteratorResult)  # listener gone (or on another connection)
    assert len(contexts) == 1


def _failing_select(backend: str) -> Select[Any]:
    """A SELECT that succeeds for ``{"v": "1"}`` and that the database refuses at run time for
    ``{"v": "not a number"}``."""
    if backend == "postgresql":
        return select(func.abs(cast(bindparam("v", type_=String), Integer)))
    return select(func.json_extract(bindparam("v", type_=String), "$"))


async def test_a_driver_error_is_raised_as_sqlalchemy_path_raises_it(
    database: Database, backend: str
) -> None:
    statement = _failing_select(backend)
    good, bad = {"v": "1"}, {"v": "not a number"}
    raised: list[BaseException] = []
    for options in (SQLALCHEMY_PATH, None):
        errors_before = database.metrics.errors
        with pytest.raises(Exception) as caught:  # noqa: PT011 - compared below
            async with database.read_connection() as connection:
                warm = await connection.execute(statement, good)  # caches the metadata
                assert warm.scalar() == 1
                await connection.execute(statement, bad, execution_options=options)
        raised.append(caught.value)
        assert database.metrics.errors == errors_before + 1  # handle_error listeners ran
    sqlalchemy_error, lean_error = raised
    assert type(lean_error) is type(sqlalchemy_error)
    assert type(lean_error.__cause__) is type(sqlalchemy_error.__cause__)
    assert str(lean_error) == str(sqlalchemy_error)
    async with database.read_connection() as connection:  # the pool is healthy after it
        assert (await connection.execute(statement, good)).scalar() == 1


def _slow_select(backend: str) -> tuple[Select[Any], dict[str, Any], dict[str, Any]]:
    """A SELECT, its parameters for a quick run, and for a run of seconds."""
    if backend == "postgresql":
        return select(func.pg_sleep(bindparam("s"))), {"s": 0}, {"s": 5}
    counter = select(literal(1).label("i")).cte("n", recursive=True)
    counter = counter.union_all(select(counter.c.i + 1).where(counter.c.i < bindparam("s")))
    return select(func.sum(counter.c.i)), {"s": 10}, {"s": 10**9}


async def test_statement_timeout_still_applies(backend: str, database_url: str) -> None:
    async with Database(make_settings(database_url, DB_STATEMENT_TIMEOUT=0.3)) as database:
        slow, fast, long = _slow_select(backend)
        async with database.read_connection() as connection:
            await connection.execute(slow, fast)
            assert isinstance(await connection.execute(slow, fast), IteratorResult)
        with pytest.raises(StatementTimeoutError):
            async with database.read_connection() as connection:
                await connection.execute(slow, long)
        async with database.read_connection() as connection:
            assert isinstance(await connection.execute(slow, fast), IteratorResult)
        assert database.pool_status().checked_out == 0


async def test_a_cancelled_lean_read_leaves_no_broken_connection(
    backend: str, database_url: str
) -> None:
    # One connection: the reads after the cancellation get the same one back, or a new one.
    async with Database(make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)) as database:
        _owner, ids = await _seed(database)
        slow, fast, long = _slow_select(backend)
        if backend == "sqlite":
            long = {"s": 3 * 10**6}  # about a second: its thread finishes it after the cancel
        started = asyncio.Event()

        async def read() -> None:
            async with database.read_connection() as connection:
                await connection.execute(slow, fast)
                started.set()
                await connection.execute(slow, long)

        task = asyncio.create_task(read())
        await started.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            async with database.read_connection() as connection:
                assert await connection.scalar(TITLE_OF, {"cid": ids[0]}) == "title 0"
                assert len((await connection.execute(slow, fast)).all()) == 1
            # A snapshot read shares the read pool and opens a transaction on the connection.
            async with database.read(consistent=True) as session:
                assert await session.scalar(TITLE_OF, {"cid": ids[0]}) == "title 0"
        assert database.pool_status().checked_out == 0


async def test_reads_cancelled_at_any_point_leave_the_pool_usable(
    backend: str, database_url: str
) -> None:
    # A lean read cancelled half-way through its driver call leaves the driver connection in
    # an unknown state: like SQLAlchemy's path, the lean path discards it. Pooled again, it
    # broke later units that opened a transaction on it ("SET TRANSACTION ISOLATION LEVEL must
    # be called before any query"); S10 in tests/faults/test_cancellation.py found that, with
    # many units in flight (BASTION_FAULT_SEED=3977954635 reproduces it). This sequential
    # version cancels reads after 0, 1, 2… loop turns, at each await the path has.
    async with Database(make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)) as database:
        _owner, ids = await _seed(database)

        async def read() -> None:
            async with database.read_connection() as connection:
                await connection.execute(TITLE_OF, {"cid": ids[0]})

        await read()  # caches the metadata: the reads below take the lean path
        for turns in range(40):
            task = asyncio.create_task(read())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with database.read(consistent=True) as session:
                assert await session.scalar(TITLE_OF, {"cid": ids[0]}) == "title 0"
        assert database.pool_status().checked_out == 0
