"""A statement object run again takes its kept plan, and answers as SQLAlchemy's path does.

See :mod:`bastion._lean_plans`. Each test runs a statement on the lean path more than once (the
first lean run makes the plan, the later ones use it) and compares its rows with SQLAlchemy's
path (``execution_options={}``) on the same connection, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select, bindparam, exc, func, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import Database
from bastion._lean_plans import _PLANS
from tests.conftest import _empty_postgres_tables, make_settings
from tests.integration.test_lean_reads import CONVERSATIONS, _seed, _typed

SQLALCHEMY_PATH: dict[str, Any] = {}


async def _both_ways(
    connection: AsyncConnection, statement: Select[Any], parameters: dict[str, Any] | None
) -> tuple[list[Any], list[Any]]:
    """The rows, first from SQLAlchemy's path, then from the lean path."""
    expected = await connection.execute(statement, parameters, execution_options=SQLALCHEMY_PATH)
    assert isinstance(expected, CursorResult)
    lean = await connection.execute(statement, parameters)
    assert isinstance(lean, IteratorResult), "the statement did not take the lean path"
    return _typed(expected.mappings()), _typed(lean.mappings())


@pytest.mark.usefixtures("backend")
async def test_a_planned_statement_binds_each_runs_values(database: Database) -> None:
    owner, ids = await _seed(database)
    point = select(CONVERSATIONS).where(
        CONVERSATIONS.c.id == bindparam("cid"), CONVERSATIONS.c.owner_id == bindparam("owner")
    )
    async with database.read_connection() as connection:
        for cid in [*ids, uuid.uuid4(), ids[0]]:
            expected, lean = await _both_ways(connection, point, {"cid": cid, "owner": owner})
            assert lean == expected
            assert point in _PLANS
        titles = [
            (await connection.execute(point, {"cid": cid, "owner": owner})).one().title
            for cid in ids
        ]
    assert titles == ["title 0", "title 1", "title 2"]


@pytest.mark.usefixtures("backend")
async def test_values_fixed_in_the_statement_come_from_it(database: Database) -> None:
    owner, _ids = await _seed(database)
    fixed = (
        select(CONVERSATIONS.c.title)
        .where(CONVERSATIONS.c.owner_id == owner, CONVERSATIONS.c.title != "title 2")
        .order_by(CONVERSATIONS.c.title.desc())
        .limit(bindparam("n"))
        .offset(0)
    )
    async with database.read_connection() as connection:
        for n in (1, 5, 1):
            expected, lean = await _both_ways(connection, fixed, {"n": n})
            assert lean == expected
            assert fixed in _PLANS
        assert (await connection.scalars(fixed, {"n": 5})).all() == ["title 1", "title 0"]
        assert (await connection.scalars(fixed, {"n": 1})).all() == ["title 1"]


@pytest.mark.usefixtures("backend")
async def test_a_bind_computed_per_run_gets_no_plan(database: Database) -> None:
    # A callable_ bind's value is asked for on every run: a plan would keep its first value.
    owner, ids = await _seed(database)
    current = [ids[0]]
    by_callable = select(CONVERSATIONS.c.title).where(
        CONVERSATIONS.c.owner_id == owner,
        CONVERSATIONS.c.id
        == bindparam("cid", callable_=lambda: current[0], type_=CONVERSATIONS.c.id.type),
    )
    async with database.read_connection() as connection:
        for cid, title in zip(ids, ["title 0", "title 1", "title 2"], strict=True):
            current[0] = cid
            expected, lean = await _both_ways(connection, by_callable, None)
            assert lean == expected
            assert [row["title"][0] for row in lean] == [title]
    assert by_callable not in _PLANS


@pytest.mark.usefixtures("backend")
async def test_a_run_with_other_parameter_names_makes_its_own_plan(database: Database) -> None:
    # Without a parameter the bind's own value applies; with it, the caller's.
    owner, _ids = await _seed(database)
    titled = select(CONVERSATIONS.c.title).where(
        CONVERSATIONS.c.owner_id == owner, CONVERSATIONS.c.title == bindparam("t", "title 0")
    )
    async with database.read_connection() as connection:
        answers = []
        for parameters in (None, {"t": "title 2"}, None, {"t": "title 1"}, {"t": "title 2"}):
            expected, lean = await _both_ways(connection, titled, parameters)
            assert lean == expected
            answers.append(lean[0]["title"][0])
    assert answers == ["title 0", "title 2", "title 0", "title 1", "title 2"]


@pytest.mark.usefixtures("backend")
async def test_a_statement_built_per_call_gets_no_plan(database: Database) -> None:
    owner, _ids = await _seed(database)

    def count_for(owner_id: uuid.UUID) -> Select[Any]:
        return select(func.count().label("n")).where(CONVERSATIONS.c.owner_id == owner_id)

    async with database.read_connection() as connection:
        await connection.execute(count_for(owner))  # SQLAlchemy's run: compiled from this one
        statements = [count_for(owner if n % 2 else uuid.uuid4()) for n in range(20)]
        counts = [(await connection.execute(statement)).scalar_one() for statement in statements]
    assert counts == [0, 3] * 10
    assert not any(statement in _PLANS for statement in statements)


@pytest.mark.usefixtures("backend")
async def test_an_unprocessable_value_fails_as_on_sqlalchemy_path(database: Database) -> None:
    _owner, ids = await _seed(database)
    by_id = select(CONVERSATIONS.c.title).where(CONVERSATIONS.c.id == bindparam("cid"))
    async with database.read_connection() as connection:
        await _both_ways(connection, by_id, {"cid": ids[0]})
        assert by_id in _PLANS
        with pytest.raises(exc.StatementError) as on_sqlalchemy_path:
            await connection.execute(by_id, {"cid": 12.5}, execution_options=SQLALCHEMY_PATH)
    async with database.read_connection() as connection:
        with pytest.raises(exc.StatementError) as planned:
            await connection.execute(by_id, {"cid": 12.5})
        assert (await connection.execute(by_id, {"cid": ids[1]})).scalar_one() == "title 1"
    assert type(planned.value) is type(on_sqlalchemy_path.value)
    assert type(planned.value.orig) is type(on_sqlalchemy_path.value.orig)


@pytest.fixture
def sqlite_path(sqlite_template: Path, tmp_path: Path) -> Path:
    """A migrated SQLite database of this test's own."""
    path = tmp_path / "plans.db"
    shutil.copyfile(sqlite_template, path)
    return path


@pytest.mark.postgres
async def test_a_plan_is_made_per_engine_and_dialect(
    postgres_test_url: str, sqlite_path: Path
) -> None:
    # One statement object run on SQLite and PostgreSQL in turn: each engine's SQL
    # ("?" against "$1" placeholders) and bind processors, not the other's plan.
    point = select(CONVERSATIONS.c.title).where(
        CONVERSATIONS.c.id == bindparam("cid"), CONVERSATIONS.c.owner_id == bindparam("owner")
    )
    try:
        async with (
            Database(make_settings(f"sqlite:///{sqlite_path}")) as on_sqlite,
            Database(make_settings(postgres_test_url)) as on_postgres,
        ):
            seeded = [await _seed(on_sqlite), await _seed(on_postgres)]
            for _round in range(3):
                for database, (owner, ids) in zip((on_sqlite, on_postgres), seeded, strict=True):
                    async with database.read_connection() as connection:
                        expected, lean = await _both_ways(
                            connection, point, {"cid": ids[2], "owner": owner}
                        )
                    assert lean == expected
                    assert [row["title"][0] for row in lean] == ["title 2"]
    finally:
        await _empty_postgres_tables(postgres_test_url)
