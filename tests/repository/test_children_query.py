"""``Repository.children_query``: a parent list's children, the same on every backend.

On PostgreSQL the list is bound as one array (``= ANY``), elsewhere as an expanding ``IN``
(see :mod:`bastion.repository._in_list`); these tests hold both to the same answers.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    bindparam,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from bastion import Database, Repository
from bastion.repository._in_list import InList
from tests.repository.conftest import Item, Shelf

SHELVES = Repository(Shelf, name="shelf")
ITEMS_OF = SHELVES.children_query("items", order_by=Item.name)


async def _seed(db: Database) -> None:
    async with db.write_connection() as connection:
        await connection.execute(
            Shelf.__table__.insert(), [{"id": n, "label": f"shelf {n}"} for n in range(1, 31)]
        )
        # Shelf n holds n % 4 items, named so that name order is not insertion order.
        rows = [
            {"owner": "alice", "name": f"item {9 - k}", "shelf_id": n}
            for n in range(1, 31)
            for k in range(n % 4)
        ]
        await connection.execute(Item.__table__.insert(), rows)


async def _children(db: Database, parent_ids: list[Any]) -> list[tuple[int, str]]:
    async with db.read_connection() as connection:
        result = await connection.execute(ITEMS_OF, {"parent_ids": parent_ids})
        return [(row.shelf_id, row.name) for row in result]


def _expected(parent_ids: list[Any]) -> list[tuple[int, str]]:
    wanted = {n for n in parent_ids if n is not None}
    return sorted((n, f"item {9 - k}") for n in range(1, 31) for k in range(n % 4) if n in wanted)


async def test_children_of_lists_of_every_length_come_back_by_parent_then_order(
    db: Database,
) -> None:
    await _seed(db)
    for length in range(1, 31):
        parents = list(range(31 - length, 31))
        assert await _children(db, parents) == _expected(parents), f"{length} parents"


async def test_an_empty_list_a_null_duplicates_and_unknown_parents_match_as_in_does(
    db: Database,
) -> None:
    await _seed(db)
    assert await _children(db, []) == []
    assert await _children(db, [3, 3, 7, 999]) == _expected([3, 7])
    assert await _children(db, [None, 2]) == _expected([2])
    # The same statement again after other lengths: nothing stale is reused.
    assert await _children(db, [1, 2, 3]) == _expected([1, 2, 3])


def test_postgresql_binds_the_list_as_one_array_and_others_expand_it() -> None:
    on_postgresql = str(ITEMS_OF.compile(dialect=postgresql.asyncpg.dialect()))
    on_sqlite = str(ITEMS_OF.compile(dialect=sqlite.dialect()))

    assert "repo_items.shelf_id = ANY ($1::INTEGER[])" in on_postgresql
    assert "POSTCOMPILE" not in on_postgresql
    assert "repo_items.shelf_id IN (__[POSTCOMPILE_parent_ids])" in on_sqlite


def test_elsewhere_the_statement_is_exactly_the_expanding_in_it_stands_for() -> None:
    # Not ``IN (...) = 1``, as a boolean column is rendered without a boolean type: SQLite
    # would then scan the table instead of using the index on the child key.
    parents = bindparam("parent_ids", expanding=True, type_=Item.shelf_id.type)
    expanding_in = (
        select(*Item.__table__.c)
        .where(Item.shelf_id.in_(parents))
        .order_by(Item.shelf_id, Item.name)
    )
    dialect = sqlite.dialect()
    assert str(ITEMS_OF.compile(dialect=dialect)) == str(expanding_in.compile(dialect=dialect))


def test_the_statement_cache_tells_columns_and_parameter_names_apart() -> None:
    def key(column: Any, name: str) -> Any:
        cache_key = select(Item.id).where(InList(column, name))._generate_cache_key()
        assert cache_key is not None
        return cache_key.key

    assert key(Item.shelf_id, "ids") == key(Item.shelf_id, "ids")
    assert key(Item.shelf_id, "ids") != key(Item.score, "ids")
    assert key(Item.shelf_id, "ids") != key(Item.shelf_id, "other_ids")


class _Counted(TypeDecorator[int]):
    impl = BigInteger
    cache_ok = True


@pytest.mark.parametrize(
    ("key_type", "as_array"),
    [
        (Integer(), True),
        (BigInteger().with_variant(Integer(), "sqlite"), True),
        (_Counted(), True),
        (Uuid(), True),
        # A cast to some of these cuts or rounds each item ('abcdefghij'::VARCHAR(8) is
        # 'abcdefgh': a list item could match another key). Only integers and UUIDs, which
        # convert exactly, are bound as an array; the rest keep the expanding IN.
        (String(8), False),
        (Text(), False),
        (Numeric(10, 2), False),
        (DateTime(timezone=True), False),
    ],
)
def test_postgresql_binds_an_array_only_for_keys_that_convert_exactly(
    key_type: Any, as_array: bool
) -> None:
    keys = Table("keys", MetaData(), Column("key", key_type, primary_key=True))
    statement = select(keys.c.key).where(InList(keys.c.key, "ids"))
    sql = str(statement.compile(dialect=postgresql.asyncpg.dialect()))

    assert ("= ANY" in sql) is as_array, sql
    assert ("POSTCOMPILE_ids" in sql) is not as_array, sql


def test_the_filtered_column_brings_its_table_into_the_from_clause() -> None:
    statement = select(literal(1)).where(InList(Item.shelf_id, "ids"))
    for dialect in (sqlite.dialect(), postgresql.asyncpg.dialect()):
        assert "FROM repo_items" in str(statement.compile(dialect=dialect))
