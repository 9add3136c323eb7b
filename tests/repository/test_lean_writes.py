"""Repository writes with ``RETURNING`` run on the driver directly in write units.

See :meth:`bastion._lean.LeanConnection.returning`. As for lean reads, the lean path answers
with an ``IteratorResult`` and SQLAlchemy's with a ``CursorResult``: that is how each test
tells which path ran. Each test runs on PostgreSQL and on SQLite (where a statement runs on
the event loop once known fast, else on the connection's thread: both are the lean path).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.result import IteratorResult

from bastion import Database, returning_rows
from bastion.errors import ForeignKeyViolationError, ReadOnlyViolationError
from tests.repository.conftest import Item, items_repository

ITEMS = Item.__table__
INSERT_ITEM = insert(ITEMS).returning(*ITEMS.c)
WHEN = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)


def _row(name: str, **overrides: Any) -> dict[str, Any]:
    """Every column but the key: a column left out whose default SQLAlchemy computes in
    Python would send the INSERT down SQLAlchemy's path."""
    values: dict[str, Any] = {
        "owner": "alice",
        "name": name,
        "kind": "k",
        "score": 1,
        "shelf_id": None,
        "version": 1,
        "created_at": WHEN,
        "updated_at": WHEN,
        "deleted_at": None,
        "created_by": "tests",
        "updated_by": "tests",
    }
    values.update(overrides)
    return values


def _typed(rows: Any) -> list[dict[str, Any]]:
    """Each row's values with their types, without the generated key."""
    return [
        {key: (value, type(value)) for key, value in row.items() if key != "id"} for row in rows
    ]


async def test_an_insert_returns_what_sqlalchemy_path_returns(db: Database) -> None:
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("warm-up"))  # caches the result metadata
        expected = await connection.execute(INSERT_ITEM, _row("same"))
        lean = await returning_rows(connection, INSERT_ITEM, _row("same"))
    assert isinstance(expected, CursorResult)
    assert isinstance(lean, IteratorResult)
    assert _typed(lean.mappings()) == _typed(expected.mappings())


async def test_an_update_setting_an_expression_runs_lean_and_answers_the_same(db: Database) -> None:
    # score = score + 10 makes "score" a postfetch column: informative only, not a default.
    # updated_at and updated_by are set: their onupdate defaults are not computed.
    statement = (
        update(ITEMS)
        .where(ITEMS.c.owner == "alice")
        .values(score=ITEMS.c.score + 10, updated_at=WHEN, updated_by="tests")
        .returning(ITEMS.c.name, ITEMS.c.score)
    )
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("a", score=1))
        await connection.execute(statement, {})  # caches the result metadata: score 11
        lean = await returning_rows(connection, statement, {})
    assert isinstance(lean, IteratorResult)
    assert [tuple(row) for row in lean] == [("a", 21)]


async def test_python_side_defaults_send_the_insert_down_sqlalchemy_path(
    db: Database,
) -> None:
    # Item.kind and Item.score have Python defaults: SQLAlchemy computes them before the
    # INSERT, so a row that leaves them out is never written on the lean path.
    statement = insert(ITEMS).returning(ITEMS.c.kind, ITEMS.c.score)
    without_defaults = {k: v for k, v in _row("defaults").items() if k not in {"kind", "score"}}
    async with db.write_connection() as connection:
        await connection.execute(statement, without_defaults)
        result = await returning_rows(connection, statement, without_defaults)
    assert isinstance(result, CursorResult)
    assert result.one() == ("x", 0)


async def test_repository_writes_commit_and_roll_back_with_their_unit(db: Database) -> None:
    items = items_repository()
    async with db.write_connection() as connection:
        kept = await items.create(connection, {"name": "kept", "kind": "k", "score": 1}, scope="a")
        await items.update(connection, kept["id"], {"name": "kept!"}, scope="a")
    with pytest.raises(RuntimeError):
        async with db.write_connection() as connection:
            await items.create(connection, {"name": "gone", "kind": "k", "score": 1}, scope="a")
            await items.update(connection, kept["id"], {"name": "changed"}, scope="a")
            raise RuntimeError("the route failed after its writes")
    async with db.read_connection() as connection:
        names = list(await connection.scalars(select(ITEMS.c.name).order_by(ITEMS.c.name)))
    assert names == ["kept!"]


async def test_a_constraint_error_is_the_error_sqlalchemy_path_gives(db: Database) -> None:
    items = items_repository()
    async with db.write_connection() as connection:
        await items.create(connection, {"name": "warm", "kind": "k", "score": 1}, scope="a")
    orphan = {"name": "orphan", "kind": "k", "score": 1, "shelf_id": 999}
    raised: list[BaseException] = []
    for through_sqlalchemy in (True, False):
        with pytest.raises(ForeignKeyViolationError) as caught:
            async with db.write_connection() as connection:
                if through_sqlalchemy:
                    await connection.execute(INSERT_ITEM, {**_row("orphan"), "shelf_id": 999})
                else:
                    await items.create(connection, orphan, scope="a")
        raised.append(caught.value)
    sqlalchemy_error, lean_error = raised
    assert type(lean_error.__cause__) is type(sqlalchemy_error.__cause__)
    async with db.write_connection() as connection:  # the pool is healthy after it
        await items.create(connection, {"name": "after", "kind": "k", "score": 1}, scope="a")
    async with db.read_connection() as connection:
        names = set(await connection.scalars(select(ITEMS.c.name)))
    assert names == {"warm", "after"}


async def test_a_read_unit_refuses_a_write_whichever_path_it_asks_for(db: Database) -> None:
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("warm-up"))
    with pytest.raises(ReadOnlyViolationError):
        async with db.read_connection() as connection:
            await returning_rows(connection, INSERT_ITEM, _row("sneaked in"))
    async with db.read_connection() as connection:
        names = list(await connection.scalars(select(ITEMS.c.name)))
    assert names == ["warm-up"]


async def test_lean_writes_are_counted_in_query_metrics(db: Database) -> None:
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("warm-up"))
        before = db.metrics.queries
        for n in range(5):
            result = await returning_rows(connection, INSERT_ITEM, _row(f"counted {n}"))
            assert isinstance(result, IteratorResult)  # the path whose count is checked
    assert db.metrics.queries == before + 5


async def test_a_statement_with_execution_options_of_its_own_takes_sqlalchemy_path(
    db: Database,
) -> None:
    # Options on the statement (a schema translate map, a compiled cache, stream_results)
    # change how it runs: only SQLAlchemy's path reads them.
    plain = select(ITEMS.c.name)
    with_options = plain.execution_options(bastion_probe=True)
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("one"))
        await connection.execute(plain)  # caches the result metadata
        result = await connection.execute(with_options)
    assert isinstance(result, CursorResult)
    assert result.scalar_one() == "one"


async def test_statements_inside_a_savepoint_block_take_sqlalchemy_path(db: Database) -> None:
    # Within ``async with begin_nested()`` SQLAlchemy checks the transaction state before
    # every statement: the lean path does not, so it steps aside there.
    async with db.write_connection() as connection:
        await connection.execute(INSERT_ITEM, _row("warm-up"))
        await returning_rows(connection, INSERT_ITEM, _row("outside"))
        async with connection.begin_nested():
            inside = await returning_rows(connection, INSERT_ITEM, _row("inside"))
        after = await returning_rows(connection, INSERT_ITEM, _row("after"))
    assert isinstance(inside, CursorResult)
    assert isinstance(after, IteratorResult)
    assert inside.one().name == "inside"


async def test_a_list_of_one_row_runs_lean_and_several_keep_their_order(db: Database) -> None:
    batched = insert(ITEMS).returning(ITEMS.c.name, sort_by_parameter_order=True)
    async with db.write_connection() as connection:
        await connection.execute(batched, _row("warm-up"))  # caches the result metadata
        one = await returning_rows(connection, batched, [_row("one")])
        several = await returning_rows(connection, batched, [_row(n) for n in ("c", "a", "b")])
    assert isinstance(one, IteratorResult)
    assert one.scalars().all() == ["one"]
    assert isinstance(several, CursorResult)  # a batch is SQLAlchemy's to run
    assert several.scalars().all() == ["c", "a", "b"]


async def test_repository_create_many_of_one_row_answers_as_create_does(db: Database) -> None:
    items = items_repository()
    async with db.write_connection() as connection:
        (many,) = await items.create_many(connection, [_row("many")], scope="alice")
        single = await items.create(connection, _row("single"), scope="alice")
    assert _typed([many]) == _typed([{**single, "name": "many"}])


async def test_returning_rows_refuses_what_is_not_parameter_sets(db: Database) -> None:
    async with db.write_connection() as connection:
        with pytest.raises(ValueError, match="no parameter sets"):
            await returning_rows(connection, INSERT_ITEM, [])
        with pytest.raises(TypeError, match="mapping"):
            await returning_rows(connection, INSERT_ITEM, "name=x")  # type: ignore[arg-type]
