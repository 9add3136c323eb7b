"""S21: a restore killed at any point leaves the old database intact or the new one complete.

Two levels. The CLI, run as an operator runs it and SIGKILLed (its whole process group, as a
container kill would) when its progress output reaches a given point, on both backends; the
rerun then succeeds. And the SQLite copy step alone, in a child process that SIGKILLs itself
at exactly 10 %, 50 % and 90 % of the pages: the live file must still be the old database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion import Database
from bastion.backup import BackupService, BackupSettings
from bastion.maintenance.digest import TableDigest
from tests.backup.conftest import digests, fill
from tests.conftest import make_settings

BIN = Path(sys.executable).parent


async def _digests_of(url: str) -> dict[str, TableDigest]:
    # A fresh Database each time: another process replaced the tables under any pool.
    async with Database(make_settings(url)) as database:
        return await digests(database)


def _cli_env(url: str, settings: BackupSettings) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_", "BACKUP_"))
    }
    assert settings.encryption_key is not None
    assert settings.signing_key is not None
    env.update(
        DATABASE_URL=url,
        BACKUP_DIR=str(settings.backup_dir),
        BACKUP_ENCRYPTION_KEY=settings.encryption_key.get_secret_value(),
        BACKUP_SIGNING_KEY=settings.signing_key.get_secret_value(),
    )
    return env


def _restore_killed_at(backup_id: str, env: dict[str, str], point: tuple[str, float]) -> bool:
    """Run the restore and SIGKILL it when its progress reaches ``point``; True if killed."""
    stage, fraction = point
    process = subprocess.Popen(
        [str(BIN / "bastion"), "backup", "restore", backup_id, "--yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stderr is not None
    killed = False
    for line in process.stderr:
        name, _, progress = line.strip().partition(": ")
        done, _, total = progress.partition("/")
        if (
            name == stage
            and done.isdigit()
            and total.isdigit()
            and int(done) >= fraction * int(total)
        ):
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
    process.stderr.close()
    process.wait(timeout=60)
    return killed


# Two points: each run is a whole CLI process (the exact-point SQLite test below covers
# 10, 50 and 90 % of the copy in a fraction of the time).
POINTS = [("restore", 0.1), ("restore", 0.9)]


async def test_s21_a_killed_restore_leaves_old_or_new_and_the_rerun_succeeds(
    database: Database,
    service: BackupService,
    database_url: str,
    backup_settings: BackupSettings,
    backend: str,
) -> None:
    await fill(database, tag="new")
    manifest = await service.create()
    new = await digests(database)
    await fill(database, tag="old")
    old = await digests(database)
    for engine in database.engines:  # the CLI is the only user from here on
        await engine.dispose()
    env = _cli_env(database_url, backup_settings)

    # One point on PostgreSQL: each run there restores twice (scratch, then live).
    points = POINTS if backend == "sqlite" else [("restore", 0.5)]
    outcomes = []
    for point in points:
        assert await asyncio.to_thread(_restore_killed_at, manifest.id, env, point), point
        state = await _digests_of(database_url)
        assert state in (old, new), f"killed at {point}: the live database is neither old nor new"
        outcomes.append("new" if state == new else "old")
        if state == new:  # put the old data back for the next kill point
            safety = next(m for m in await service.list() if m.label == "pre-restore")
            async with Database(make_settings(database_url)) as fresh:
                restorer = BackupService(fresh, backup_settings)
                await restorer.restore(safety.id, confirm=safety.id)
            assert await _digests_of(database_url) == old
    assert outcomes  # every point was reached and checked

    rerun = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "bastion"), "backup", "restore", manifest.id, "--yes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert await _digests_of(database_url) == new
    # Every attempt that got past the check left its pre-restore snapshot behind.
    labels = [m.label for m in await service.list()]
    assert labels.count("pre-restore") >= len(points) + 1


_KILL_MID_COPY = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from bastion.backup.sqlite_engine import _copy

    fraction = float(sys.argv[3])

    def progress(done, total):
        if done >= fraction * total:
            os.kill(os.getpid(), signal.SIGKILL)

    _copy(Path(sys.argv[1]), Path(sys.argv[2]), 5.0, progress)
    sys.exit(3)  # not reached: the copy finished without passing the kill point
    """
)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
async def test_s21_sqlite_copy_killed_mid_way_leaves_the_old_database(
    database: Database, service: BackupService, tmp_path: Path, fraction: float
) -> None:
    await fill(database, tag="new", conversations=20)
    manifest = await service.create()
    await fill(database, tag="old", conversations=20)
    old = await digests(database)
    # The new data, unpacked and checked as a restore would, aside.
    async with service._work_dir() as work:
        dump = await service._fetch_and_check(manifest, work, None)
        aside = tmp_path / "new.db"
        dump.rename(aside)
    live = Path(database.settings.url.database or "")
    killed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _KILL_MID_COPY, str(aside), str(live), str(fraction)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for engine in database.engines:
        await engine.dispose()
    assert await digests(database) == old
    async with database.read_connection() as connection:
        result = await connection.exec_driver_sql("PRAGMA integrity_check")
        assert result.scalar() == "ok"
