"""Migrations through Bastion: they keep data, and the models match the scripts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from bastion import ConfigurationError, Database, DatabaseSettings
from bastion.migrations import current_revisions, downgrade, head_revisions, upgrade
from conversations.models import Conversation, Message
from conversations.users import create_user

SOURCE = Path(__file__).resolve().parents[2] / "src" / "conversations" / "migrations"

REBUILD_CONVERSATIONS = '''"""Widen conversations.title: on SQLite, a table rebuild."""

import sqlalchemy as sa
from alembic import op

revision = "rebuild"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", recreate="always") as batch:
        batch.alter_column("title", type_=sa.String(300), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("conversations", recreate="always") as batch:
        batch.alter_column("title", type_=sa.String(200), existing_nullable=False)
'''


@pytest.fixture
def migrations_with_a_rebuild(tmp_path: Path) -> str:
    target = tmp_path / "migrations"
    shutil.copytree(SOURCE, target, ignore=shutil.ignore_patterns("__pycache__"))
    # On top of the real head, so the rebuild also runs over every real migration.
    (head,) = head_revisions("conversations:migrations")
    (target / "versions" / "rebuild.py").write_text(REBUILD_CONVERSATIONS.replace("{head}", head))
    return str(target)


async def counts(database: Database) -> tuple[int, int]:
    async with database.read() as session:
        conversations = await session.scalar(select(func.count()).select_from(Conversation))
        messages = await session.scalar(select(func.count()).select_from(Message))
    return int(conversations or 0), int(messages or 0)


async def test_a_table_rebuild_keeps_every_child_row(
    tmp_path: Path, migrations_with_a_rebuild: str
) -> None:
    """On SQLite a rebuild drops the old table; with foreign keys on, that would cascade."""
    settings = DatabaseSettings(DATABASE_URL=f"sqlite:///{tmp_path}/rebuild.db")
    async with Database(settings) as database:
        await upgrade(database, migrations_with_a_rebuild, "0001")
        await create_user(database, "alice")
        async with database.write() as session:
            owner = await session.scalar(text("SELECT id FROM users"))
            await session.execute(
                text(
                    "INSERT INTO conversations (id, owner_id, title, status, metadata, "
                    "message_count, created_at, updated_at, version) VALUES "
                    "('c0ffee00c0ffee00c0ffee00c0ffee00', :owner, 't', 'active', '{}', 1, "
                    "'2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)"
                ),
                {"owner": owner},
            )
            await session.execute(
                text(
                    "INSERT INTO messages (conversation_id, role, content, metadata, created_at) "
                    "VALUES ('c0ffee00c0ffee00c0ffee00c0ffee00', 'user', 'hi', '{}', "
                    "'2026-01-01 00:00:00')"
                )
            )
        before = await counts(database)

        await upgrade(database, migrations_with_a_rebuild)
        after_upgrade = await counts(database)
        await downgrade(database, migrations_with_a_rebuild, "0001")
        after_downgrade = await counts(database)

        async with database.read() as session:
            foreign_keys = await session.scalar(text("PRAGMA foreign_keys"))

    assert before == after_upgrade == after_downgrade == (1, 1)
    assert foreign_keys == 1  # switched back on for the connection's next user


async def test_upgrade_reaches_head_and_an_unknown_revision_is_a_clear_error(
    database_url: str,
) -> None:
    async with Database(DatabaseSettings(DATABASE_URL=database_url)) as database:
        assert set(await current_revisions(database)) == set(
            head_revisions("conversations:migrations")
        )
        with pytest.raises(ConfigurationError, match="migration 'nonexistent'"):
            await upgrade(database, "conversations:migrations", "nonexistent")
