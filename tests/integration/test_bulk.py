"""bulk_insert: COPY / executemany in batches, atomic or best effort, on both backends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Table, func, select, text

from bastion import Database, ForeignKeyViolationError, UniqueViolationError, utcnow
from bastion.bulk import bulk_insert
from conversations.models import Conversation, Message
from conversations.users import create_user

MESSAGES = cast(Table, Message.__table__)


@pytest.fixture
async def conversation_id(database: Database) -> uuid.UUID:
    await create_user(database, "bulk")
    cid = uuid.uuid4()
    async with database.write() as session:
        owner = await session.scalar(text("SELECT id FROM users"))
        session.add(Conversation(id=cid, owner_id=uuid.UUID(str(owner)), title="bulk"))
    return cid


def message_rows(cid: uuid.UUID, count: int, start: int = 0) -> list[dict[str, Any]]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        {
            "conversation_id": cid,
            "role": "user",
            "content": f"message {n}",
            "metadata": {"n": n, "nested": {"ok": True}},
            "created_at": base + timedelta(seconds=n),
        }
        for n in range(start, start + count)
    ]


async def stored(database: Database) -> list[tuple[str, dict[str, Any], datetime]]:
    async with database.read() as session:
        rows = await session.execute(
            select(Message.content, Message.metadata_, Message.created_at).order_by(Message.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def test_an_atomic_bulk_insert_stores_every_row_with_its_types(
    database: Database, conversation_id: uuid.UUID
) -> None:
    progress: list[tuple[int, int]] = []
    rows = message_rows(conversation_id, 2_500)

    result = await bulk_insert(
        database, MESSAGES, rows, batch_size=1_000, on_progress=lambda d, t: progress.append((d, t))
    )

    assert (result.inserted, result.failed) == (2_500, [])
    assert progress == [(1_000, 2_500), (2_000, 2_500), (2_500, 2_500)]
    saved = await stored(database)
    assert len(saved) == 2_500
    assert saved[7] == ("message 7", {"n": 7, "nested": {"ok": True}}, rows[7]["created_at"])
    assert saved[7][2].utcoffset() == timedelta(0)


async def test_an_atomic_bulk_insert_writes_nothing_when_one_row_is_bad(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 3_000)
    rows[2_500]["conversation_id"] = uuid.uuid4()  # no such conversation

    with pytest.raises(ForeignKeyViolationError):
        await bulk_insert(database, MESSAGES, rows, batch_size=1_000)

    assert await stored(database) == []


async def test_best_effort_keeps_the_good_rows_and_names_the_bad_ones(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 1_000)
    for bad in (3, 444, 999):
        rows[bad]["conversation_id"] = uuid.uuid4()

    result = await bulk_insert(
        database, MESSAGES, rows, batch_size=100, atomic=False, concurrency=4
    )

    assert result.inserted == 997
    assert [row.index for row in result.failed] == [3, 444, 999]
    assert {row.code for row in result.failed} == {"foreign_key_violation"}
    contents = {content for content, _, _ in await stored(database)}
    assert len(contents) == 997
    assert "message 444" not in contents
    assert "message 445" in contents


async def test_best_effort_reports_duplicates_within_the_input(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 10)
    for n, row in enumerate(rows):
        row["id"] = 1_000 + n
    rows[6]["id"] = 1_002  # the same key as row 2

    result = await bulk_insert(database, MESSAGES, rows, batch_size=5, atomic=False)

    assert result.inserted == 9
    assert [(row.index, row.code) for row in result.failed] == [(6, "unique_violation")]


async def test_bad_arguments_are_refused_before_anything_is_written(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 3)
    with pytest.raises(ValueError, match="batch_size"):
        await bulk_insert(database, MESSAGES, rows, batch_size=0)
    with pytest.raises(ValueError, match="no column"):
        await bulk_insert(database, MESSAGES, [{**rows[0], "password": "x"}])
    assert (await bulk_insert(database, MESSAGES, [])).inserted == 0
    async with database.read() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 0


async def test_a_unique_violation_in_atomic_mode_is_translated(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 2)
    rows[0]["id"] = rows[1]["id"] = 7
    with pytest.raises(UniqueViolationError):
        await bulk_insert(database, MESSAGES, rows)


async def test_an_unexpected_failure_stops_every_batch_and_leaks_nothing(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 400)

    def fail_on_third_batch(done: int, _total: int) -> None:
        if done >= 150:
            raise RuntimeError("progress display crashed")

    with pytest.raises(RuntimeError, match="progress display crashed"):
        await bulk_insert(
            database,
            MESSAGES,
            rows,
            batch_size=50,
            atomic=False,
            concurrency=4,
            on_progress=fail_on_third_batch,
        )
    # The database fixture then checks that no connection is still checked out.


async def test_best_effort_reports_exactly_the_bad_rows_of_every_kind_and_stores_the_rest(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 3_000)
    bad = {
        17: ("conversation_id", uuid.uuid4(), "foreign_key_violation"),
        1_234: ("role", "robot", "check_violation"),
        1_235: ("created_at", datetime(2026, 1, 1), "invalid_row"),  # naive: refused
        2_999: ("metadata", {"not json": object()}, "invalid_row"),
    }
    for index, (column, value, _) in bad.items():
        rows[index][column] = value
    del rows[2_000]["content"]

    result = await bulk_insert(
        database, MESSAGES, rows, batch_size=500, atomic=False, concurrency=3
    )

    expected = {index: code for index, (_, _, code) in bad.items()} | {2_000: "invalid_row"}
    assert {row.index: row.code for row in result.failed} == expected
    assert result.inserted == 3_000 - len(expected)
    missing = next(row for row in result.failed if row.index == 2_000)
    assert missing.message == "missing column content"
    naive = next(row for row in result.failed if row.index == 1_235)
    assert "created_at" in naive.message
    assert "naive" in naive.message
    stored_contents = [content for content, _, _ in await stored(database)]
    assert sorted(stored_contents) == sorted(
        row["content"] for n, row in enumerate(rows) if n not in expected
    )


async def test_an_atomic_bulk_insert_names_the_row_it_cannot_encode(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 1_500)
    rows[1_200]["created_at"] = datetime(2026, 1, 1)  # naive

    with pytest.raises(ValueError, match=r"row 1200: column created_at"):
        await bulk_insert(database, MESSAGES, rows, batch_size=500)

    assert await stored(database) == []


async def test_columns_left_out_get_their_defaults_computed_per_row(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = [
        {"conversation_id": conversation_id, "role": "user", "content": f"m{n}"} for n in range(3)
    ]
    before = utcnow()

    await bulk_insert(database, MESSAGES, rows)

    saved = await stored(database)
    assert [metadata for _, metadata, _ in saved] == [{}, {}, {}]
    assert all(before <= created <= utcnow() for _, _, created in saved)


async def test_best_effort_never_holds_more_connections_than_its_concurrency(
    database: Database, conversation_id: uuid.UUID
) -> None:
    in_use: list[int] = []

    def watch(_done: int, _total: int) -> None:
        in_use.append(database.pool_status().checked_out)

    result = await bulk_insert(
        database,
        MESSAGES,
        message_rows(conversation_id, 2_000),
        batch_size=50,
        atomic=False,
        concurrency=2,
        on_progress=watch,
    )

    assert result.inserted == 2_000
    assert len(in_use) == 40
    assert max(in_use) <= 2


async def test_an_atomic_bulk_insert_refuses_a_row_naming_a_column_the_first_row_does_not(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 1_500)
    rows[700]["id"] = 10_000  # a real column, but not in the first row: it would be dropped

    with pytest.raises(ValueError, match=r"row 700: column\(s\) id not named by the first row"):
        await bulk_insert(database, MESSAGES, rows, batch_size=500)

    assert await stored(database) == []


async def test_best_effort_reports_rows_naming_columns_outside_the_plan(
    database: Database, conversation_id: uuid.UUID
) -> None:
    rows = message_rows(conversation_id, 10)
    rows[3]["id"] = 10_000
    rows[5]["colour"] = "red"
    del rows[7]["metadata"]  # leaving out a column with a default is still fine

    result = await bulk_insert(database, MESSAGES, rows, atomic=False, batch_size=4)

    assert result.inserted == 8
    assert [(row.index, row.code) for row in result.failed] == [
        (3, "invalid_row"),
        (5, "invalid_row"),
    ]
    assert "id" in result.failed[0].message
    assert "colour" in result.failed[1].message
    # Batches run concurrently, so the stored order is not the input order.
    assert sorted(content for content, _, _ in await stored(database)) == [
        f"message {n}" for n in range(10) if n not in (3, 5)
    ]
