"""SQLite backups through the online backup API; restores copied in one transaction.

*Dump*: ``sqlite3.Connection.backup`` in a single step holds one read snapshot for the whole
copy, so the copy is consistent however much other pooled connections write meanwhile (WAL
lets them go on); a multi-step copy would restart on every write and might never finish.

*Restore*: the archive is unpacked to a scratch file beside the work directory, checked
(``integrity_check``, ``foreign_key_check``, digests against the manifest), and only then
copied into the live database with the backup API. SQLite writes the destination inside one
write transaction that commits when the copy finishes (journal or WAL), so a process killed
mid-copy leaves the old database, intact, for the next open to roll back to: the live file is
always the old database or the new one, never a mix. The copy goes in steps, for progress.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, Literal

from bastion.backup.engines import CopyCheck, DumpInfo, LockName, StageProgress, check_database
from bastion.backup.locks import file_lock
from bastion.database import Database
from bastion.errors import ConfigurationError

__all__ = ["SqliteEngine"]

# Progress reports per restore copy: enough for a bar, few enough to cost nothing.
_COPY_STEPS: Final = 20


class SqliteEngine:
    """Backups of an SQLite file database."""

    backend: Literal["sqlite"] = "sqlite"

    def __init__(self, database: Database) -> None:
        settings = database.settings
        if settings.is_memory or not settings.url.database:
            raise ConfigurationError("an in-memory SQLite database cannot be backed up")
        self.path = Path(settings.url.database).expanduser().resolve()
        self._busy_s = max(settings.sqlite_busy_timeout_ms / 1000, 1.0)

    async def dump(self, destination: Path) -> DumpInfo:
        """Copy the live database to ``destination`` in one consistent step, then digest it."""
        await asyncio.to_thread(_copy, self.path, destination, self._busy_s, None)
        check = await check_database(f"sqlite:///{destination}")
        await asyncio.to_thread(_leave_wal, destination)
        return DumpInfo(
            server_version=sqlite3.sqlite_version,
            alembic_revisions=check.alembic_revisions,
            tables=check.tables,
        )

    async def check_copy(self, dump: Path, work_dir: Path) -> CopyCheck:
        """Check ``dump`` in place: it already is a scratch database file."""
        return await check_database(f"sqlite:///{dump}")

    async def restore(self, dump: Path, work_dir: Path, progress: StageProgress | None) -> None:
        """Copy the checked ``dump`` into the live database in one transaction."""
        await asyncio.to_thread(_copy, dump, self.path, self._busy_s, progress)

    @asynccontextmanager
    async def lock(self, name: LockName) -> AsyncIterator[bool]:
        async with file_lock(self.path.with_name(f"{self.path.name}.{name}.lock")) as taken:
            yield taken


def _copy(source: Path, destination: Path, busy_s: float, progress: StageProgress | None) -> None:
    source_connection = sqlite3.connect(source, timeout=busy_s)
    try:
        destination_connection = sqlite3.connect(destination, timeout=busy_s)
        try:
            if progress is None:
                source_connection.backup(destination_connection)
                return
            pages = source_connection.execute("PRAGMA page_count").fetchone()[0]
            source_connection.backup(
                destination_connection,
                pages=max(1, pages // _COPY_STEPS),
                progress=lambda _status, remaining, total: progress(total - remaining, total),
            )
        finally:
            destination_connection.close()
    finally:
        source_connection.close()


def _leave_wal(path: Path) -> None:
    # A self-contained file: no -wal/-shm sidecars that the archive would miss.
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")
    finally:
        connection.close()
