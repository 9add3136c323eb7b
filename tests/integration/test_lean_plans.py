"""A statement object run again takes its kept plan, and answers as SQLAlchemy's path does.

See :mod:`bastion._lean_plans`. Each test runs a statement on the lean path more than once (the
first lean run makes the plan, the later ones use it) and compares its rows with SQLAlchemy's
path (``execution_options={}``) on the same connection, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import gc
import shutil
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Select,
    String,
    TypeDecorator,
    bindparam,
    delete,
    exc,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.result import IteratorResult

from bastion import Database, returning_rows
from bastion._lean_plans import _PLANS
from conversations.models import User
from tests.conftest import _empty_postgres_tables, make_settings
from tests.integration.test_lean_reads import (
    CONVERSATIONS,
    SQLALCHEMY_PATH,
    _both_ways,
    _seed,
)

USERS = User.__table__


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


@pytest.mark.usefixtures("backend")
async def test_a_planned_run_compiles_nothing(database: Database) -> None:
    # The plan is what runs: with the engine's compiled cache emptied, a planned statement
    # runs without putting its compiled form back (a statement without a plan would).
    owner, ids = await _seed(database)
    point = select(CONVERSATIONS.c.title).where(
        CONVERSATIONS.c.id == bindparam("cid"), CONVERSATIONS.c.owner_id == bindparam("owner")
    )
    async with database.read_connection() as connection:
        await _both_ways(connection, point, {"cid": ids[0], "owner": owner})
        cache = connection.sync_engine._compiled_cache
        assert cache is not None
        cache.clear()
        title = (await connection.execute(point, {"cid": ids[1], "owner": owner})).scalar_one()
        assert len(cache) == 0
        unplanned = select(CONVERSATIONS.c.title).where(CONVERSATIONS.c.id == ids[2])
        await connection.execute(unplanned)
        assert len(cache) == 1
    assert title == "title 1"


class _Stamped(TypeDecorator[str]):
    """A bind processor whose answer depends on more than its value (a setting, the time)."""

    impl = String
    cache_ok = True
    suffix = "A"

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return f"{value}-{_Stamped.suffix}"


@pytest.mark.usefixtures("backend")
async def test_values_fixed_in_the_statement_are_processed_on_every_run(
    database: Database,
) -> None:
    # As SQLAlchemy does it: a processor may answer differently from one run to the next,
    # and a value fixed in the statement may be a mutable object changed in between.
    document = {"n": 1}
    stamped = select(literal("x", _Stamped()).label("v"), literal(document, JSON()).label("d"))
    answers = []
    async with database.read_connection() as connection:
        for suffix, n in (("A", 1), ("B", 2), ("C", 3)):
            _Stamped.suffix = suffix
            document["n"] = n
            expected, lean = await _both_ways(connection, stamped, None)
            assert lean == expected
            answers.append((lean[0]["v"][0], lean[0]["d"][0]))
    assert stamped in _PLANS
    assert answers == [("x-A", {"n": 1}), ("x-B", {"n": 2}), ("x-C", {"n": 3})]


@pytest.mark.usefixtures("backend")
async def test_planned_writes_return_what_they_wrote(database: Database) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    add = insert(USERS).returning(USERS.c.name)
    rename = update(USERS).where(USERS.c.id == bindparam("uid")).values(name=bindparam("n"))
    rename = rename.returning(USERS.c.id, USERS.c.name)
    remove = delete(USERS).where(USERS.c.id == bindparam("uid")).returning(USERS.c.name)
    stamp = datetime(2026, 11, 25, tzinfo=UTC)
    async with database.write_connection() as connection:
        for n, uid in enumerate((first, second)):
            row = {"id": uid, "name": f"user {n}", "created_at": stamp}
            if n == 0:  # SQLAlchemy's run caches the result metadata
                await connection.execute(add, row)
            else:
                assert (await returning_rows(connection, add, row)).scalar_one() == "user 1"
        await connection.execute(rename, {"uid": first, "n": "warm"})
        renamed = []
        for uid, name in ((first, "a"), (second, "b"), (first, "c")):
            result = await returning_rows(connection, rename, {"uid": uid, "n": name})
            assert isinstance(result, IteratorResult)
            renamed.append(tuple(result.one()))
        await connection.execute(remove, {"uid": uuid.uuid4()})
        removed = await returning_rows(connection, remove, {"uid": second})
        assert isinstance(removed, IteratorResult)
        assert removed.scalar_one() == "b"
        assert all(statement in _PLANS for statement in (add, rename, remove))
    assert renamed == [(first, "a"), (second, "b"), (first, "c")]
    async with database.read_connection() as connection:
        names = (await connection.scalars(select(USERS.c.name), execution_options={})).all()
    assert names == ["c"]


@pytest.mark.usefixtures("backend")
async def test_a_list_of_rows_to_a_planned_insert_runs_on_sqlalchemy_path(
    database: Database,
) -> None:
    add = insert(USERS).returning(USERS.c.name, sort_by_parameter_order=True)
    stamp = datetime(2026, 11, 25, tzinfo=UTC)

    def row(name: str) -> dict[str, Any]:
        return {"id": uuid.uuid4(), "name": name, "created_at": stamp}

    async with database.write_connection() as connection:
        await connection.execute(add, row("warm-up"))
        assert isinstance(await returning_rows(connection, add, row("planned")), IteratorResult)
        assert add in _PLANS
        several = await connection.returning(add, [row("b"), row("a")])  # type: ignore[arg-type]
    assert isinstance(several, CursorResult)
    assert several.scalars().all() == ["b", "a"]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_read_and_write_engines_keep_a_plan_each(database_url: str) -> None:
    # SQLite's read units and write units have engines (and compiled caches) of their own:
    # one statement run in both, in turn, keeps its two plans rather than replacing them.
    async with Database(make_settings(database_url)) as database:
        owner, ids = await _seed(database)
        point = select(CONVERSATIONS.c.title).where(
            CONVERSATIONS.c.id == bindparam("cid"), CONVERSATIONS.c.owner_id == bindparam("owner")
        )
        titles = []
        for n in range(6):
            unit = database.read_connection if n % 2 else database.write_connection
            async with unit() as connection:
                if n < 2:
                    await connection.execute(
                        point, {"cid": ids[0], "owner": owner}, execution_options={}
                    )
                result = await connection.execute(point, {"cid": ids[n % 3], "owner": owner})
                assert isinstance(result, IteratorResult)
                titles.append(result.scalar_one())
        assert len(_PLANS[point]) == 2
    assert titles == ["title 0", "title 1", "title 2"] * 2


@pytest.mark.usefixtures("backend")
async def test_plans_keep_no_closed_database_alive(database_url: str) -> None:
    # A plan refers to its engine weakly and to no compiled cache (which holds its compiled
    # form, which holds the statement): once a Database is closed and dropped, its engines,
    # and statements nothing else holds, go, plans and all.
    statements: list[weakref.ref[Any]] = []
    engines: list[weakref.ref[Any]] = []
    for _ in range(3):
        database = Database(make_settings(database_url))
        async with database:
            point = select(CONVERSATIONS.c.title).where(CONVERSATIONS.c.id == bindparam("cid"))
            async with database.read_connection() as connection:
                for _run in range(3):
                    await connection.execute(point, {"cid": uuid.uuid4()})
                engines.append(weakref.ref(connection.sync_engine))
            assert point in _PLANS
            statements.append(weakref.ref(point))
        del database, point, connection
    gc.collect()
    assert [ref() for ref in statements] == [None, None, None]
    assert [ref() for ref in engines] == [None, None, None]
