"""A known data set, written the same way on any backend; ways to damage an SQLite file and
to empty the shared PostgreSQL test database.

``seed`` writes fixed ids, times and documents covering every column type of the reference
schema: UUIDs, aware timestamps, JSON, bytes, text with non-ASCII characters, big integers,
NULLs, and soft-deleted rows.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from bastion import Database
from conversations.models import (
    ApiKey,
    Conversation,
    Message,
    MessageSource,
    User,
    idempotency_keys,
)

NOW = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
LIVE = uuid.UUID("10000000-0000-4000-8000-000000000001")
RECENTLY_DELETED = uuid.UUID("10000000-0000-4000-8000-000000000002")
LONG_DELETED = uuid.UUID("10000000-0000-4000-8000-000000000003")


async def seed(database: Database, *, now: datetime = NOW) -> None:
    """Write the known data set: 2 users, 2 keys, 3 conversations, 4 messages, 3 sources."""
    conversations = [
        (LIVE, ALICE, "live ünïcode ✓", None, {"tags": ["a", "b"], "n": 1.5, "z": None}),
        (RECENTLY_DELETED, ALICE, "deleted yesterday", now - timedelta(days=1), {}),
        (LONG_DELETED, BOB, "deleted long ago", now - timedelta(days=90), {"b": 1, "a": 2}),
    ]
    async with database.write_connection() as connection:
        await connection.execute(
            insert(User),
            [
                {"id": ALICE, "name": "alice", "created_at": now},
                {"id": BOB, "name": "bob", "created_at": now - timedelta(seconds=1)},
            ],
        )
        await connection.execute(
            insert(ApiKey),
            [
                {
                    "id": uuid.UUID(int=1),
                    "user_id": ALICE,
                    "key_hash": "a" * 64,
                    "created_at": now,
                    "revoked_at": None,
                },
                {
                    "id": uuid.UUID(int=2),
                    "user_id": BOB,
                    "key_hash": "b" * 64,
                    "created_at": now,
                    "revoked_at": now,
                },
            ],
        )
        await connection.execute(
            insert(Conversation),
            [
                {
                    "id": conversation_id,
                    "owner_id": owner,
                    "title": title,
                    "status": "active",
                    "metadata_": metadata,
                    "message_count": 2**40,
                    "created_at": now - timedelta(days=100),
                    "updated_at": now,
                    "deleted_at": deleted_at,
                    "version": 1,
                }
                for conversation_id, owner, title, deleted_at, metadata in conversations
            ],
        )
        await connection.execute(
            insert(Message),
            [
                {
                    "id": message_id,
                    "conversation_id": conversation_id,
                    "role": "user",
                    "content": f"message {message_id} \x01 tab\t",
                    "metadata_": {"i": message_id},
                    "created_at": now,
                }
                for message_id, conversation_id in (
                    (1, LIVE),
                    (2, LIVE),
                    (3, RECENTLY_DELETED),
                    (4, LONG_DELETED),
                )
            ],
        )
        await connection.execute(
            insert(MessageSource),
            [
                {"message_id": 1, "position": 0, "url": "https://a.example/", "title": None},
                {"message_id": 1, "position": 1, "url": "https://b.example/", "title": "B"},
                {"message_id": 4, "position": 0, "url": "https://c.example/", "title": "C"},
            ],
        )
        # Keys that sort differently by locale than by code point ("B" < "a" < "é" in C).
        await connection.execute(
            insert(idempotency_keys),
            [
                {
                    "scope": "alice",
                    "key": key,
                    "request_hash": "0" * 64,
                    "status_code": 201,
                    "headers": {"content-type": "application/json", "n": index},
                    "body": bytes(range(256)) if index == 0 else b"",
                    "created_at": now,
                }
                for index, key in enumerate(["k1", "B", "a", "\u00e9", "Z", "_"])
            ],
        )


def corrupt_copy(source: Path, target: Path, table: str) -> None:
    """Copy an SQLite file and overwrite the page header of ``table``'s root page."""
    shutil.copyfile(source, target)
    connection = sqlite3.connect(target)
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    (root_page,) = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    connection.close()
    with target.open("r+b") as file:
        file.seek((root_page - 1) * page_size)
        file.write(b"\xa5" * 12)


async def empty_postgres(url: str) -> None:
    """Empty every table but ``alembic_version`` (whatever tables later migrations add)."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch(
            "SELECT quote_ident(tablename) AS name FROM pg_tables "
            "WHERE schemaname = current_schema() AND tablename <> 'alembic_version'"
        )
        names = ", ".join(row["name"] for row in tables)
        await connection.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()
