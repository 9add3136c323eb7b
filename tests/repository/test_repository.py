"""Repository behaviour on SQLite and PostgreSQL: writes, locking, audit, upsert, loading."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError

from bastion import (
    Database,
    Eq,
    ForeignKeyViolationError,
    InvalidQueryError,
    NotFoundError,
    StaleVersionError,
    UniqueViolationError,
    acting_as,
    bulk_insert,
    use_clock,
)
from bastion.request_context import RequestContext, enter_request, leave_request
from tests.repository.conftest import Item, Shelf, SteppingClock, items_repository

ITEMS = items_repository()


async def test_two_concurrent_updates_with_the_same_version_let_exactly_one_win(
    db: Database,
) -> None:
    async with db.write_connection() as connection:
        item = await ITEMS.create(connection, {"name": "race"}, scope="alice")

    async def rename(n: int) -> str:
        async with db.write_connection() as connection:
            await ITEMS.update(
                connection, item["id"], {"name": f"writer {n}"}, scope="alice", expected_version=1
            )
        return f"writer {n}"

    outcomes = await asyncio.gather(*(rename(n) for n in range(4)), return_exceptions=True)

    winners = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert len(winners) == 1
    assert all(
        isinstance(outcome, StaleVersionError) for outcome in outcomes if outcome not in winners
    )
    async with db.read_connection() as connection:
        stored = await ITEMS.require(connection, item["id"], scope="alice")
    assert (stored["name"], stored["version"]) == (winners[0], 2)


async def test_an_update_without_a_version_bumps_it_and_a_missing_row_is_not_found(
    db: Database,
) -> None:
    async with db.write_connection() as connection:
        item = await ITEMS.create(connection, {"name": "a", "score": 1}, scope="alice")
        changed = await ITEMS.update(
            connection, item["id"], {"name": "b"}, scope="alice", increment={"score": 5}
        )
        counted = await ITEMS.update(
            connection, item["id"], {}, scope="alice", increment={"score": 1}, bump_version=False
        )
        with pytest.raises(NotFoundError, match="item not found"):
            await ITEMS.update(connection, item["id"], {"name": "c"}, scope="bob")
        with pytest.raises(ValueError, match="version"):
            await ITEMS.update(connection, item["id"], {"version": 9}, scope="alice")

    assert (changed["name"], changed["score"], changed["version"]) == ("b", 6, 2)
    assert (counted["score"], counted["version"]) == (7, 2)


async def test_rows_written_a_second_apart_have_timestamps_a_second_apart(db: Database) -> None:
    clock = SteppingClock()
    with use_clock(clock):
        async with db.write_connection() as connection:
            first = await ITEMS.create(connection, {"name": "first"}, scope="alice")
        clock.advance(1)
        async with db.write_connection() as connection:
            second = await ITEMS.create(connection, {"name": "second"}, scope="alice")
        clock.advance(1)
        async with db.write_connection() as connection:
            edited = await ITEMS.update(connection, first["id"], {"name": "1st"}, scope="alice")
        clock.advance(1)
        # The mixin's column defaults read the same clock per row, for the ORM and for bulk.
        async with db.write() as session:
            session.add(Item(owner="alice", name="orm"))
        clock.advance(1)
        await bulk_insert(db, Item.__table__, [{"owner": "alice", "name": "bulk"}])  # type: ignore[arg-type]

    assert second["created_at"] - first["created_at"] == timedelta(seconds=1)
    assert first["created_at"] == first["updated_at"]
    assert edited["updated_at"] - edited["created_at"] == timedelta(seconds=2)
    assert edited["created_at"] == first["created_at"]
    async with db.read() as session:
        orm, bulk = (
            await session.execute(
                select(Item.created_at).where(Item.name.in_(["orm", "bulk"])).order_by(Item.id)
            )
        ).scalars()
    assert orm - first["created_at"] == timedelta(seconds=3)
    assert bulk - orm == timedelta(seconds=1)
    assert orm.utcoffset() == timedelta(0)


async def test_who_made_a_change_comes_from_the_request_or_the_named_actor(
    db: Database,
) -> None:
    token = enter_request(RequestContext(request_id="r1", route="POST /items", user="carol"))
    try:
        async with db.write_connection() as connection:
            item = await ITEMS.create(connection, {"name": "x"}, scope="alice")
    finally:
        leave_request(token)
    with acting_as("dave"):
        async with db.write_connection() as connection:
            edited = await ITEMS.update(connection, item["id"], {"name": "y"}, scope="alice")

    assert (item["created_by"], item["updated_by"]) == ("carol", "carol")
    assert (edited["created_by"], edited["updated_by"]) == ("carol", "dave")
    with pytest.raises(ValueError, match="actor"):
        acting_as("").__enter__()


async def test_soft_delete_restore_and_purge(db: Database) -> None:
    async with db.write_connection() as connection:
        keep = await ITEMS.create(connection, {"name": "keep"}, scope="alice")
        gone = await ITEMS.create(connection, {"name": "gone"}, scope="alice")
        deleted = await ITEMS.soft_delete(connection, gone["id"], scope="alice")
        with pytest.raises(NotFoundError):
            await ITEMS.soft_delete(connection, gone["id"], scope="alice")
        assert await ITEMS.get(connection, gone["id"], scope="alice") is None
        assert (await ITEMS.get(connection, gone["id"], scope="alice", include_deleted=True))[
            "deleted_at"
        ] is not None
        restored = await ITEMS.restore(connection, gone["id"], scope="alice")
        again = await ITEMS.restore(connection, gone["id"], scope="alice")
        with pytest.raises(NotFoundError):
            await ITEMS.restore(connection, gone["id"], scope="bob")
        await ITEMS.soft_delete(connection, gone["id"], scope="alice")
        purged = await ITEMS.purge(connection, scope="alice")

    assert (deleted["version"], restored["version"], again["version"]) == (2, 3, 3)
    assert restored["deleted_at"] is None
    assert purged == 1
    async with db.read_connection() as connection:
        everything = await ITEMS.page(connection, scope="alice", include_deleted=True)
    assert [row["id"] for row in everything.items] == [keep["id"]]


async def test_upsert_inserts_then_updates_and_never_crosses_scopes(db: Database) -> None:
    async with db.write_connection() as connection:
        made = await ITEMS.upsert(connection, {"id": 7, "name": "new", "score": 1}, scope="alice")
        kept = await ITEMS.upsert(connection, {"id": 7, "name": "changed"}, scope="alice")
        with pytest.raises(UniqueViolationError):
            await ITEMS.upsert(connection, {"id": 7, "name": "stolen"}, scope="bob")

    assert (made["name"], made["version"]) == ("new", 1)
    assert (kept["name"], kept["score"], kept["version"]) == ("changed", 1, 2)
    assert kept["created_at"] == made["created_at"]

    async def upsert(n: int) -> None:
        async with db.write_connection() as connection:
            await ITEMS.upsert(connection, {"id": 8, "name": f"racer {n}"}, scope="alice")

    await asyncio.gather(*(upsert(n) for n in range(5)))
    async with db.read_connection() as connection:
        assert (await ITEMS.require(connection, 8, scope="alice"))["version"] == 5


async def test_a_missing_parent_is_a_foreign_key_violation_not_a_crash(db: Database) -> None:
    with pytest.raises(ForeignKeyViolationError):
        async with db.write_connection() as connection:
            await ITEMS.create(connection, {"name": "orphan", "shelf_id": 404}, scope="alice")


async def test_relationships_load_only_when_asked_for(db: Database) -> None:
    async with db.write() as session:
        session.add(Shelf(id=1, label="top"))
    async with db.write_connection() as connection:
        item = await ITEMS.create(connection, {"name": "book", "shelf_id": 1}, scope="alice")

    async with db.read() as session:
        bare = await ITEMS.load(session, item["id"], scope="alice")
        assert bare is not None
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = bare.shelf
    async with db.read() as session:
        loaded = await ITEMS.load(session, item["id"], scope="alice", eager=["shelf"])
    assert loaded is not None
    assert loaded.shelf is not None
    assert loaded.shelf.label == "top"
    with pytest.raises(ValueError, match="relationship"):
        ITEMS.eager("owner")


async def test_create_many_returns_the_rows_in_input_order(db: Database) -> None:
    async with db.write_connection() as connection:
        rows = await ITEMS.create_many(
            connection, [{"name": f"n{n}", "score": n % 3} for n in range(50)], scope="alice"
        )
    assert [row["name"] for row in rows] == [f"n{n}" for n in range(50)]
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)


async def test_sort_filter_and_cursor_input_is_checked_before_any_sql(db: Database) -> None:
    async with db.write_connection() as connection:
        await ITEMS.create_many(connection, [{"name": "a"}, {"name": "b"}], scope="alice")

    async with db.read_connection() as connection:
        with pytest.raises(InvalidQueryError, match="sort by one of") as sort_error:
            await ITEMS.page(connection, sort="-owner", scope="alice")
        with pytest.raises(InvalidQueryError) as filter_error:
            await ITEMS.page(connection, filters=[Eq("owner", "bob")], scope="alice")
        first = await ITEMS.keyset(connection, sort="name", limit=1, scope="alice")
        assert first.next_cursor is not None
        with pytest.raises(InvalidQueryError) as cursor_error:
            await ITEMS.keyset(
                connection, sort="score", limit=1, cursor=first.next_cursor, scope="alice"
            )
        for forged in ["", "!!", "W10", "x" * 600, first.next_cursor[:-2]]:
            with pytest.raises(InvalidQueryError):
                await ITEMS.keyset(connection, sort="name", cursor=forged, scope="alice")
        with pytest.raises(TypeError, match="scope"):
            await ITEMS.get(connection, 1)

    assert "owner" not in str(sort_error.value)
    assert (sort_error.value.parameter, filter_error.value.parameter) == ("sort", "filter")
    assert cursor_error.value.parameter == "cursor"


async def test_signed_cursors_refuse_tampering(db: Database) -> None:
    signed = items_repository(cursor_key=b"k" * 32)
    other = items_repository(cursor_key=b"j" * 32)
    async with db.write_connection() as connection:
        await signed.create_many(connection, [{"name": "a"}, {"name": "b"}], scope="alice")

    async with db.read_connection() as connection:
        first = await signed.keyset(connection, sort="name", limit=1, scope="alice")
        assert first.next_cursor is not None
        second = await signed.keyset(
            connection, sort="name", limit=1, cursor=first.next_cursor, scope="alice"
        )
        assert [row["name"] for row in second.items] == ["b"]
        with pytest.raises(InvalidQueryError):
            await other.keyset(
                connection, sort="name", limit=1, cursor=first.next_cursor, scope="alice"
            )
        unsigned = await ITEMS.keyset(connection, sort="name", limit=1, scope="alice")
        assert unsigned.next_cursor is not None
        with pytest.raises(InvalidQueryError):
            await signed.keyset(connection, sort="name", cursor=unsigned.next_cursor, scope="alice")
