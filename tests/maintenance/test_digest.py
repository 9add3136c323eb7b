"""Table digests: the same data gives the same digest on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from bastion import Database, DatabaseSettings
from bastion.maintenance import TableDigest, UnknownTableError, table_digests
from bastion.migrations import upgrade
from conversations import MIGRATIONS
from conversations.models import Conversation
from tests.maintenance.data import ALICE, seed


async def test_an_empty_database_has_empty_digests_of_every_user_table(
    database: Database,
) -> None:
    digests = await table_digests(database)

    assert "alembic_version" not in digests
    assert set(digests) >= {
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


@pytest.fixture
async def icu_postgres_url(postgres_test_url: str) -> AsyncIterator[str]:
    """A migrated PostgreSQL database whose default collation is ICU's (not code point)."""
    url = make_url(postgres_test_url)
    name = f"{url.database}_icu"
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 '
            "LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'"
        )
    finally:
        await admin.close()
    icu_url = url.set(database=name).render_as_string(hide_password=False)
    try:
        async with Database(DatabaseSettings(DATABASE_URL=icu_url)) as database:
            await upgrade(database, MIGRATIONS)
        yield icu_url
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.mark.postgres
async def test_text_keys_order_the_same_under_a_locale_collation(
    sqlite_db: Database, icu_postgres_url: str
) -> None:
    await seed(sqlite_db)
    async with Database(DatabaseSettings(DATABASE_URL=icu_postgres_url)) as icu_db:
        await seed(icu_db)
        async with icu_db.read_connection() as connection:
            # The premise: this server sorts these keys differently from code point order.
            keys = (
                (await connection.execute(text("SELECT key FROM idempotency_keys ORDER BY key")))
                .scalars()
                .all()
            )
        on_postgres = await table_digests(icu_db)

    assert keys != sorted(keys)
    assert on_postgres == await table_digests(sqlite_db)
