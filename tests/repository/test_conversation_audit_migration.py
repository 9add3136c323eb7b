"""Migration 0003 (conversations' created_by / updated_by) goes down and up, keeping rows.

Run on a database of its own (a fresh SQLite file, a throwaway PostgreSQL database), so the
shared test database is never left at an old revision.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import make_url

from bastion import Database
from bastion.migrations import current_revisions, downgrade, upgrade
from conversations import MIGRATIONS
from conversations.models import Conversation, User
from conversations.users import create_user
from tests.conftest import POSTGRES_URL, _asyncpg_dsn, make_settings


@pytest.fixture
async def fresh_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
        return
    name = f"bastion_mig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def audit_columns(database: Database) -> set[str]:
    async with database.engine.connect() as connection:
        columns = await connection.run_sync(
            lambda sync: {c["name"] for c in inspect(sync).get_columns("conversations")}
        )
    return columns & {"created_by", "updated_by"}


async def counts(database: Database) -> tuple[int, int]:
    async with database.read() as session:
        conversations = await session.scalar(text("SELECT count(*) FROM conversations"))
        messages = await session.scalar(text("SELECT count(*) FROM messages"))
    return int(conversations or 0), int(messages or 0)


async def test_the_audit_migration_downgrades_and_upgrades_keeping_every_row(
    fresh_url: str,
) -> None:
    async with Database(make_settings(fresh_url)) as database:
        await upgrade(database, MIGRATIONS)
        key = await create_user(database, "alice")
        assert key
        async with database.write() as session:
            owner = await session.scalar(select(User.id))
            assert owner is not None
            session.add(Conversation(owner_id=owner, title="kept", created_by="alice"))
        assert await audit_columns(database) == {"created_by", "updated_by"}

        await downgrade(database, MIGRATIONS, "0002")
        downgraded = (await current_revisions(database), await audit_columns(database))
        await upgrade(database, MIGRATIONS)
        upgraded = (await current_revisions(database), await audit_columns(database))
        rows = await counts(database)

    assert downgraded == (("0002",), set())
    assert upgraded == (("0003",), {"created_by", "updated_by"})
    assert rows == (1, 0)
