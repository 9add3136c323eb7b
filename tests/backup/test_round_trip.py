"""S19: backup → verify → restore on every backend; row counts and content hashes equal."""

from __future__ import annotations

from bastion import Database
from bastion.backup import BackupService
from tests.backup.conftest import digests, fill


async def test_s19_round_trip_restores_identical_content(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    before = await digests(database)
    manifest = await service.create()
    assert {name: table.rows for name, table in manifest.tables.items()} == {
        name: digest.rows for name, digest in before.items()
    }
    assert manifest.tables["messages"].rows == 400
    assert manifest.alembic_revisions

    report = await service.verify(manifest.id)
    assert report.tables["messages"] == 400

    await fill(database, tag="later")
    assert (await digests(database)) != before

    restored = await service.restore(manifest.id, confirm=manifest.id)
    assert (await digests(database)) == before
    assert restored.safety_backup_id is not None
    safety = await service.get(restored.safety_backup_id)
    assert safety.label == "pre-restore"
    assert safety.tables["messages"].rows == 800
