"""Table digests: the same data gives the same digest on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from bastion import Database
from bastion.maintenance import TableDigest, UnknownTableError, table_digests
from conversations.models import Conversation
from tests.maintenance.data import ALICE, seed


async def test_an_empty_database_has_empty_digests_of_every_user_table(
    database: Database,
) -> None:
    digests = await table_digests(database)

    assert set(digests) == {
        "users",
        "api_keys",
        "conversations",
        "messages",
        "message_sources",
        "idempotency_keys",
    }
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert set(digests.values()) == {TableDigest(rows=0, sha256=empty)}


async def test_one_changed_value_changes_only_its_tables_digest(database: Database) -> None:
    await seed(database)
    before = await table_digests(database)

    async with database.write_connection() as connection:
        await connection.execute(
            update(Conversation).where(Conversation.owner_id == ALICE).values(version=2)
        )
    after = await table_digests(database)

    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"conversations"}
    assert after["conversations"].rows == before["conversations"].rows == 3


async def test_digests_of_named_tables_only(database: Database) -> None:
    await seed(database)

    digests = await table_digests(database, tables=["users", "messages"])

    assert {name: digest.rows for name, digest in digests.items()} == {"users": 2, "messages": 4}


async def test_an_unknown_table_name_is_refused(database: Database) -> None:
    with pytest.raises(UnknownTableError, match="no such table: nope"):
        await table_digests(database, tables=["nope"])


@pytest.mark.postgres
async def test_the_same_data_has_the_same_digests_on_sqlite_and_postgresql(
    sqlite_db: Database, postgres_db: Database
) -> None:
    await seed(sqlite_db)
    await seed(postgres_db)

    on_sqlite = await table_digests(sqlite_db)
    on_postgres = await table_digests(postgres_db)

    assert on_sqlite == on_postgres
    assert on_sqlite["messages"].rows == 4
