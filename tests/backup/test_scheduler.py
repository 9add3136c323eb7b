"""The schedule: one backup per interval however many workers tick, and prune after it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bastion import Database
from bastion.backup import BackupScheduler, BackupService, BackupSettings
from bastion.health import HealthStatus
from tests.backup.conftest import make_backup_settings
from tests.conftest import make_settings


class Clock:
    """A settable clock (the process edge the scheduler and health read time from)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_two_workers_racing_make_one_backup_per_interval(
    database: Database, database_url: str, backup_settings: BackupSettings
) -> None:
    clock = Clock()
    # A second Database: another worker process of the same service.
    async with Database(make_settings(database_url)) as other:
        schedulers = [
            BackupScheduler(BackupService(db, backup_settings, clock=clock), 3600, clock=clock)
            for db in (database, other, database, other)
        ]
        service = schedulers[0].service
        for interval in range(3):
            made = await asyncio.gather(*(scheduler.tick() for scheduler in schedulers))
            assert sum(result is not None for result in made) == 1, f"interval {interval}"
            # A late tick in the same interval finds a fresh backup.
            clock.now += timedelta(minutes=30)
            assert await schedulers[1].tick() is None
            clock.now += timedelta(minutes=31)
        assert len(await service.list()) == 3
        assert sum(scheduler.runs for scheduler in schedulers) == 3


async def test_a_held_backup_lock_skips_the_tick(
    database: Database, backup_settings: BackupSettings
) -> None:
    scheduler = BackupScheduler(BackupService(database, backup_settings), 60)
    async with scheduler.service.engine.lock("backup") as taken:
        assert taken
        assert await scheduler.tick() is None
    assert await scheduler.tick() is not None


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_scheduler_prunes_after_each_backup(database: Database, tmp_path: Path) -> None:
    clock = Clock()
    settings = make_backup_settings(tmp_path / "backups", BACKUP_RETENTION="last=2")
    scheduler = BackupScheduler(BackupService(database, settings, clock=clock), 60, clock=clock)
    for _ in range(4):
        assert await scheduler.tick() is not None
        clock.now += timedelta(minutes=2)
    assert len(await scheduler.service.list()) == 2


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_start_runs_backups_in_the_background_until_stop(
    database: Database, backup_settings: BackupSettings
) -> None:
    service = BackupService(database, backup_settings)
    made = asyncio.Event()
    scheduler = BackupScheduler(service, interval_s=0.05, on_backup=lambda _: made.set())
    scheduler.start()
    try:
        async with asyncio.timeout(30):
            await made.wait()
    finally:
        await scheduler.stop()
    runs = scheduler.runs
    await asyncio.sleep(0.2)
    assert scheduler.runs == runs  # stopped means stopped


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_health_degrades_when_the_newest_backup_is_too_old(
    database: Database, tmp_path: Path
) -> None:
    clock = Clock()
    settings = make_backup_settings(tmp_path / "backups", BACKUP_MAX_AGE_S=3600)
    service = BackupService(database, settings, clock=clock)
    check = service.health_check()
    assert check.__name__ == "backup"
    none_yet = await check()
    assert (none_yet.status, none_yet.error) == (HealthStatus.DEGRADED, "no_backup")
    manifest = await service.create()
    fresh = await check()
    assert fresh.status is HealthStatus.HEALTHY
    assert fresh.details["latest"] == manifest.id
    clock.now += timedelta(hours=2)
    stale = await check()
    assert (stale.status, stale.error) == (HealthStatus.DEGRADED, "backup_too_old")
    assert await service.latest_age_s() == pytest.approx(7200, abs=5)
