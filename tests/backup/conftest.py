"""Fixtures of the backup tests: a database of their own per test, keys, a service, data.

On PostgreSQL each test gets a fresh migrated database (restores drop and recreate tables, so
they must not share the session's database with other tests); on SQLite a copy of the
migrated template, as everywhere.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pyrage
import pytest
from sqlalchemy.engine import make_url

from bastion import Database, DatabaseSettings
from bastion.backup import BackupService, BackupSettings
from bastion.maintenance.digest import TableDigest, table_digests
from bastion.migrations import upgrade
from conversations import MIGRATIONS
from conversations.models import Conversation, Message, User
from tests.conftest import POSTGRES_URL, _asyncpg_dsn

SIGNING_KEY = "test-signing-key-0123456789abcdef-0123456789"


@pytest.fixture(scope="session")
def age_identity() -> str:
    return str(pyrage.x25519.Identity.generate())


@pytest.fixture(scope="session")
def postgres_backup_databases() -> Iterator[tuple[str, list[str]]]:
    """A migrated template database (never connected to after), and the copies made of it.

    Copies of a template are much cheaper than a migration per test; they are all dropped at
    the end of the session.
    """
    template = f"bastion_backup_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{template}"'))
    asyncio.run(_migrate(_url(template)))
    copies: list[str] = []
    yield template, copies
    for name in [*copies, template]:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _url(name: str) -> str:
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database of ``backend`` that this test alone uses."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "live.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    postgres_template, copies = request.getfixturevalue("postgres_backup_databases")
    name = f"bastion_backup_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    copies.append(name)
    return _url(name)


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        await upgrade(database, MIGRATIONS)


def make_backup_settings(directory: Path, **overrides: Any) -> BackupSettings:
    values: dict[str, Any] = {"BACKUP_DIR": directory, "BACKUP_SIGNING_KEY": SIGNING_KEY}
    values.update(overrides)
    return BackupSettings(**values)


@pytest.fixture
def backup_settings(tmp_path: Path, age_identity: str) -> BackupSettings:
    return make_backup_settings(
        tmp_path / "backups", BACKUP_ENCRYPTION_KEY=age_identity, BACKUP_ENCRYPT=True
    )


@pytest.fixture
def service(database: Database, backup_settings: BackupSettings) -> BackupService:
    return BackupService(database, backup_settings)


async def fill(
    database: Database,
    *,
    users: int = 2,
    conversations: int = 10,
    messages: int = 20,
    tag: str = "a",
) -> None:
    """Add users, each with ``conversations`` conversations of ``messages`` messages."""
    async with database.write() as session:
        for index in range(users):
            user = User(name=f"{tag}-user-{index}-{uuid.uuid4().hex[:6]}")
            session.add(user)
            await session.flush()
            for number in range(conversations):
                conversation = Conversation(
                    owner_id=user.id, title=f"{tag} conversation {number}", metadata_={"n": number}
                )
                session.add(conversation)
                await session.flush()
                session.add_all(
                    Message(
                        conversation_id=conversation.id,
                        role="user" if turn % 2 == 0 else "assistant",
                        content=f"{tag} message {turn} of {number}: héllo ✓ " * 3,
                    )
                    for turn in range(messages)
                )


async def digests(database: Database) -> dict[str, TableDigest]:
    return await table_digests(database)
