"""Cleanup, reset, optimize and stats on real databases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, table

from bastion import ConfirmationRequiredError, Database
from bastion.maintenance import (
    UnknownTableError,
    collect_stats,
    database_name,
    optimize,
    purge_soft_deleted,
    reset_database,
    table_digests,
)
from conversations.models import Conversation, Message, MessageSource, User
from tests.maintenance.data import ALICE, LIVE, NOW, RECENTLY_DELETED, seed


async def _ids(database: Database, column: Any) -> list[Any]:
    async with database.read_connection() as connection:
        return sorted((await connection.execute(select(column))).scalars().all())


async def test_cleanup_purges_only_rows_deleted_before_the_cutoff(database: Database) -> None:
    await seed(database)

    counts = await purge_soft_deleted(database, days_old=30, now=NOW)

    assert counts == {"conversations": 1}
    assert await _ids(database, Conversation.id) == sorted([LIVE, RECENTLY_DELETED])
    # The purged conversation's messages and their sources went by ON DELETE CASCADE.
    assert await _ids(database, Message.id) == [1, 2, 3]
    assert await _ids(database, MessageSource.message_id) == [1, 1]


async def test_cleanup_in_small_batches_deletes_every_old_row(database: Database) -> None:
    await seed(database)
    async with database.write_connection() as connection:
        await connection.execute(
            insert(Conversation),
            [
                {"owner_id": ALICE, "title": f"old {n}", "deleted_at": NOW - timedelta(days=40)}
                for n in range(7)
            ],
        )

    counts = await purge_soft_deleted(database, days_old=30, now=NOW, batch_size=3)

    assert counts == {"conversations": 8}
    assert await _ids(database, Conversation.id) == sorted([LIVE, RECENTLY_DELETED])


async def test_a_dry_run_counts_and_deletes_nothing(database: Database) -> None:
    await seed(database)
    before = await table_digests(database)

    counts = await purge_soft_deleted(database, days_old=0, now=NOW, dry_run=True)

    assert counts == {"conversations": 2}
    assert await table_digests(database) == before


async def test_cleanup_refuses_a_negative_age_and_unknown_tables(database: Database) -> None:
    with pytest.raises(ValueError, match="days_old must be 0 or more"):
        await purge_soft_deleted(database, days_old=-1)
    with pytest.raises(UnknownTableError):
        await purge_soft_deleted(database, days_old=1, tables=["nope"])


async def test_reset_refuses_without_the_database_name(database: Database) -> None:
    await seed(database)
    before = await table_digests(database)

    for confirm in (None, "", "yes", "other.db"):
        with pytest.raises(ConfirmationRequiredError, match="confirm with the database name"):
            await reset_database(database, confirm=confirm)

    assert await table_digests(database) == before


async def test_reset_empties_every_table_and_keeps_the_schema(database: Database) -> None:
    await seed(database)

    counts = await reset_database(database, confirm=database_name(database))

    assert counts["conversations"] == 3
    assert counts["messages"] == 4
    assert {digest.rows for digest in (await table_digests(database)).values()} == {0}
    async with database.read_connection() as connection:
        revision = await connection.scalar(
            select(func.count()).select_from(table("alembic_version"))
        )
    assert revision == 1
    await seed(database)  # the schema still takes the same data, ids and all


async def test_optimize_analyzes_every_table(database: Database) -> None:
    await seed(database)

    result = await optimize(database)

    if database.backend == "sqlite":
        assert result.statements == ["PRAGMA optimize", "ANALYZE"]
    else:
        assert "VACUUM (ANALYZE) conversations" in result.statements
        assert len(result.statements) == len(await table_digests(database))  # one per table
    stats = await collect_stats(database)
    conversations = next(entry for entry in stats.tables if entry.name == "conversations")
    if database.backend == "postgresql":
        assert conversations.last_analyze is not None


async def test_sqlite_vacuum_runs_outside_a_transaction(sqlite_db: Database) -> None:
    await seed(sqlite_db)

    result = await optimize(sqlite_db, vacuum=True)

    assert result.statements[-1] == "VACUUM"
    assert (await table_digests(sqlite_db))["messages"].rows == 4


async def test_stats_count_rows_and_sizes_of_every_table(database: Database) -> None:
    await seed(database)

    stats = await collect_stats(database)

    rows = {entry.name: (entry.rows, entry.rows_estimated) for entry in stats.tables}
    assert rows["messages"] == (4, False)
    assert rows["conversations"] == (3, False)
    assert stats.size_bytes is not None
    assert stats.size_bytes > 0
    conversations = next(entry for entry in stats.tables if entry.name == "conversations")
    index_names = {index.name for index in conversations.indexes}
    assert "ix_conversations_owner_created" in index_names
    document = stats.to_dict()
    assert document["backend"] == database.backend


async def test_stats_use_the_catalog_estimate_above_the_exact_threshold(
    database: Database,
) -> None:
    await seed(database)
    await optimize(database)  # ANALYZE fills sqlite_stat1 / pg_class.reltuples

    stats = await collect_stats(database, exact_below=2)

    rows = {entry.name: (entry.rows, entry.rows_estimated) for entry in stats.tables}
    assert rows["messages"] == (4, True)
    assert rows["users"] == (2, True)


async def _first_messages(database: Database, count: int) -> list[int]:
    """Add a user, a conversation and ``count`` messages with database-made ids."""
    async with database.write_connection() as connection:
        await connection.execute(insert(User).values(id=ALICE, name="alice", created_at=NOW))
        await connection.execute(
            insert(Conversation).values(id=LIVE, owner_id=ALICE, title="t", metadata_={})
        )
        statement = (
            insert(Message)
            .values(conversation_id=LIVE, role="user", content="m", metadata_={})
            .returning(Message.id)
        )
        return [(await connection.execute(statement)).scalar_one() for _ in range(count)]


async def test_after_a_reset_new_ids_start_again_at_1(database: Database) -> None:
    assert await _first_messages(database, 3) == [1, 2, 3]

    await reset_database(database, confirm=database_name(database))

    assert await _first_messages(database, 1) == [1]
