"""Properties of the repository, checked by Hypothesis on SQLite and PostgreSQL.

* keyset pagination returns every row exactly once while rows are being inserted;
* filters select exactly the rows a plain Python filter selects;
* soft-deleted rows never appear in pages, counts, keyset pages or lookups.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion import Database, Eq, Filter, In, Range, Search
from tests.repository.conftest import items_repository, run_example

EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OWNER = "alice"
ITEMS = items_repository()
# Names mix LIKE's wildcards and escape character with letters of both cases.
NAME_ALPHABET = "aAbB%_\\ "


async def insert(database: Database, rows: list[dict[str, Any]]) -> list[int]:
    async with database.write_connection() as connection:
        stored = await ITEMS.create_many(connection, rows, scope=OWNER)
    return [row["id"] for row in stored]


@EXAMPLES
@given(
    scores=st.lists(st.integers(0, 4), max_size=30),
    added=st.lists(st.integers(0, 4), max_size=12),
    page_size=st.integers(1, 7),
    sort=st.sampled_from(["score", "-score", "name", "-created_at", None]),
)
def test_keyset_pages_return_every_row_exactly_once_while_rows_are_inserted(
    repo_url: str, scores: list[int], added: list[int], page_size: int, sort: str | None
) -> None:
    async def scenario(database: Database) -> None:
        before = await insert(database, [{"name": f"n{s}", "score": s} for s in scores])
        seen: list[dict[str, Any]] = []

        async def page_through() -> None:
            cursor: str | None = None
            for _ in range(len(scores) + len(added) + 1):  # a page repeating rows ends it
                async with database.read_connection() as connection:
                    page = await ITEMS.keyset(
                        connection, sort=sort, limit=page_size, cursor=cursor, scope=OWNER
                    )
                seen.extend(dict(row) for row in page.items)
                cursor = page.next_cursor
                if cursor is None:
                    return
                await asyncio.sleep(0)
            raise AssertionError("paging did not end: rows are being repeated")

        async def insert_meanwhile() -> None:
            for score in added:
                await insert(database, [{"name": f"n{score}", "score": score}])
                await asyncio.sleep(0)

        await asyncio.gather(page_through(), insert_meanwhile())

        ids = [row["id"] for row in seen]
        assert len(ids) == len(set(ids)), "a row was returned twice"
        assert set(before) <= set(ids), "a row that existed before paging was skipped"
        field = (sort or "id").lstrip("-")
        keys = [(row[field], row["id"]) for row in seen]
        descending = sort is not None and sort.startswith("-")
        assert keys == sorted(keys, reverse=descending)

    run_example(repo_url, scenario)


ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.text(NAME_ALPHABET, min_size=1, max_size=6),
            "kind": st.sampled_from(["x", "y", "z"]),
            "score": st.integers(0, 9),
        }
    ),
    max_size=25,
)
FILTERS = st.lists(
    st.one_of(
        st.builds(Eq, st.just("kind"), st.sampled_from(["x", "y", "z"])),
        st.builds(In, st.just("kind"), st.lists(st.sampled_from(["x", "y", "z"]), max_size=2)),
        st.builds(
            Range,
            st.just("score"),
            gt=st.none() | st.integers(0, 9),
            le=st.none() | st.integers(0, 9),
        ),
        st.builds(Search, st.just("name"), st.text(NAME_ALPHABET, min_size=1, max_size=3)),
    ),
    max_size=3,
)


def matches(row: dict[str, Any], item: Filter) -> bool:
    value = row[item.field]
    if isinstance(item, Eq):
        return bool(value == item.value)
    if isinstance(item, In):
        return value in item.values
    if isinstance(item, Range):
        return (item.gt is None or value > item.gt) and (item.le is None or value <= item.le)
    assert isinstance(item, Search)
    return item.text.lower() in value.lower()


@EXAMPLES
@given(rows=ROWS, filters=FILTERS)
def test_filters_select_exactly_what_a_python_filter_selects(
    repo_url: str, rows: list[dict[str, Any]], filters: list[Filter]
) -> None:
    async def scenario(database: Database) -> None:
        ids = await insert(database, rows)
        expected = {
            id for id, row in zip(ids, rows, strict=True) if all(matches(row, f) for f in filters)
        }
        async with database.read_connection() as connection:
            page = await ITEMS.page(connection, filters=filters, limit=100, scope=OWNER)
            count = await ITEMS.count(connection, filters=filters, scope=OWNER)
        assert {row["id"] for row in page.items} == expected
        assert page.total == count == len(expected)

    run_example(repo_url, scenario)


@EXAMPLES
@given(
    rows=ROWS,
    deleted=st.lists(st.integers(0, 24), unique=True, max_size=10),
    page_size=st.integers(1, 5),
)
def test_soft_deleted_rows_never_leak_into_lists_counts_or_lookups(
    repo_url: str, rows: list[dict[str, Any]], deleted: list[int], page_size: int
) -> None:
    async def scenario(database: Database) -> None:
        ids = await insert(database, rows)
        gone = {ids[n] for n in deleted if n < len(ids)}
        async with database.write_connection() as connection:
            for id in gone:
                await ITEMS.soft_delete(connection, id, scope=OWNER)
        live = set(ids) - gone
        async with database.read_connection() as connection:
            page = await ITEMS.page(connection, sort="-score", limit=100, scope=OWNER)
            assert {row["id"] for row in page.items} == live
            assert page.total == await ITEMS.count(connection, scope=OWNER) == len(live)
            walked: list[int] = []
            cursor: str | None = None
            for _ in range(len(ids) + 1):
                keyset = await ITEMS.keyset(
                    connection, sort="name", limit=page_size, cursor=cursor, scope=OWNER
                )
                walked.extend(row["id"] for row in keyset.items)
                if (cursor := keyset.next_cursor) is None:
                    break
            assert sorted(walked) == sorted(live)
            assert [await ITEMS.get(connection, id, scope=OWNER) for id in gone] == [None] * len(
                gone
            )
            assert {r["id"] for r in await ITEMS.get_many(connection, ids, scope=OWNER)} == live
            everything = await ITEMS.page(connection, limit=100, scope=OWNER, include_deleted=True)
            assert everything.total == len(ids)

    run_example(repo_url, scenario)
