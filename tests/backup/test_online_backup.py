"""S16: an SQLite backup while other pooled connections keep writing is consistent."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from bastion import Database
from bastion.backup import BackupService
from conversations.models import Conversation, Message
from tests.backup.conftest import digests, fill


async def _count(database: Database) -> int:
    async with database.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_s16_backup_under_continuous_writes_is_consistent(
    database: Database, service: BackupService
) -> None:
    await fill(database, users=2, conversations=20, messages=50)  # 2,000 messages
    async with database.read() as session:
        conversation_id = await session.scalar(select(Conversation.id).limit(1))
    stop = asyncio.Event()
    under_way = asyncio.Event()
    written = 0

    async def write_continuously() -> None:
        nonlocal written
        while not stop.is_set():
            async with database.write() as session:
                session.add(
                    Message(conversation_id=conversation_id, role="user", content="x" * 200)
                )
            written += 1
            if written >= 20:
                under_way.set()
            await asyncio.sleep(0)

    writer = asyncio.create_task(write_continuously())
    try:
        await under_way.wait()
        at_start = await _count(database)
        written_at_start = written
        manifest = await service.create()
        written_during = written - written_at_start
    finally:
        stop.set()
        await writer
    assert written_during > 0, "the writer did not write during the backup"
    assert manifest.tables["messages"].rows >= at_start

    # The copy is sound and holds exactly what its manifest says (verify restores it aside).
    await service.verify(manifest.id)
    await service.restore(manifest.id, confirm=manifest.id)
    restored = await digests(database)
    assert restored["messages"].rows == manifest.tables["messages"].rows >= at_start
