"""A restore from another migration revision is refused unless explicitly allowed: the
running code expects the live schema (and pg_restore --clean keeps tables it does not know)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from bastion import Database
from bastion.backup import BackupIntegrityError, BackupService
from tests.backup.conftest import digests, fill


async def set_revision(database: Database, revision: str) -> None:
    async with database.write_connection() as connection:
        await connection.execute(
            text("UPDATE alembic_version SET version_num = :r"), {"r": revision}
        )


async def test_a_backup_from_another_revision_is_refused_unless_allowed(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    manifest = await service.create()
    (revision,) = manifest.alembic_revisions
    await set_revision(database, "0002")  # as if the live schema had moved on
    await fill(database, tag="after")
    before = await digests(database)

    with pytest.raises(BackupIntegrityError) as refused:
        await service.restore(manifest.id, confirm=manifest.id)
    assert refused.value.reason == "schema"
    assert await digests(database) == before  # nothing changed, no safety backup either
    assert [item.id for item in await service.list()] == [manifest.id]

    report = await service.restore(manifest.id, confirm=manifest.id, allow_schema_change=True)
    assert report.safety_backup_id is not None
    async with database.read_connection() as connection:
        assert await connection.scalar(text("SELECT version_num FROM alembic_version")) == revision
