"""S22 and the restore lock: no restore without confirmation, a dry run changes nothing,
and a second restore while one runs is refused (409 over the admin API)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from bastion import Database, DatabaseUnavailableError
from bastion.backup import (
    BackupService,
    BackupSettings,
    ConfirmationRequiredError,
    RestoreInProgressError,
    RestoreReport,
)
from tests.backup.conftest import digests, fill
from tests.conftest import make_settings

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


@sqlite_only
async def test_s22_restore_without_confirmation_is_refused(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    manifest = await service.create()
    await fill(database, tag="after")
    before = await digests(database)
    for confirm in (None, "", "yes", "20261123T031500Z-1a2b3c4d"):
        with pytest.raises(ConfirmationRequiredError):
            await service.restore(manifest.id, confirm=confirm)
    assert await digests(database) == before
    assert len(await service.list()) == 1


@sqlite_only
async def test_s22_a_dry_run_lists_the_archive_and_target_and_changes_nothing(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    manifest = await service.create()
    await fill(database, tag="after")
    before = await digests(database)
    report = await service.restore(manifest.id, dry_run=True)
    assert report.dry_run
    assert report.tables["messages"] == 400
    assert report.alembic_revisions == list(manifest.alembic_revisions)
    assert report.target == database.settings.display_url
    assert report.safety_backup_id is None
    assert await digests(database) == before
    assert len(await service.list()) == 1


async def test_a_second_restore_while_one_runs_is_refused(
    database: Database, service: BackupService
) -> None:
    manifest = await service.create()
    async with service.engine.lock("restore") as taken:
        assert taken
        with pytest.raises(RestoreInProgressError):
            await service.restore(manifest.id, confirm=manifest.id)
    # Released: the same restore now runs.
    report = await service.restore(manifest.id, confirm=manifest.id)
    assert report.safety_backup_id is not None


async def test_a_restore_leaves_no_pooled_connection_on_the_old_data(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    manifest = await service.create()
    await fill(database, tag="after")
    async with database.read() as session:  # a pooled connection, used before the restore
        await session.connection()
    await service.restore(manifest.id, confirm=manifest.id)
    assert database.pool_status().checked_in == 0
    assert (await digests(database))["messages"].rows == 400


async def test_two_restores_racing_one_runs_the_other_is_refused(
    database: Database, service: BackupService
) -> None:
    manifest = await service.create()
    results = await asyncio.gather(
        service.restore(manifest.id, confirm=manifest.id),
        service.restore(manifest.id, confirm=manifest.id),
        return_exceptions=True,
    )
    refused = [result for result in results if isinstance(result, RestoreInProgressError)]
    assert len(refused) == 1, results
    assert sum(isinstance(result, RestoreReport) for result in results) == 1


@sqlite_only
async def test_a_live_database_locked_by_a_writer_is_left_as_it_was(
    database_url: str, backup_settings: BackupSettings
) -> None:
    async with Database(make_settings(database_url, DB_SQLITE_BUSY_TIMEOUT=100)) as database:
        service = BackupService(database, backup_settings)
        await fill(database)
        manifest = await service.create()
        await fill(database, tag="after")
        before = await digests(database)
        async with database.write() as session:  # holds the write lock throughout
            await session.execute(text("DELETE FROM idempotency_keys"))
            with pytest.raises(DatabaseUnavailableError) as caught:
                await service.restore(manifest.id, confirm=manifest.id)
        assert "changed nothing" in caught.value.message
        assert await digests(database) == before
