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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, Literal

from bastion.backup.engines import CopyCheck, DumpInfo, LockName, StageProgress, check_database
from bastion.backup.locks import file_lock
from bastion.database import Database
from bastion.errors import ConfigurationError, DatabaseUnavailableError

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
        """Copy the live database to ``destination`` in one consistent step, then digest it.

        Raises:
            DatabaseUnavailableError: SQLite could not read the live database.
        """
        await _translated(_copy, self.path, destination, self._busy_s, None)
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
        """Copy the checked ``dump`` into the live database in one transaction.

        Raises:
            DatabaseUnavailableError: the live database stayed locked by other writers for
                longer than the busy timeout (nothing was changed), or could not be written.
        """
        await _translated(_copy, dump, self.path, self._busy_s, progress)

    @asynccontextmanager
    async def lock(self, name: LockName) -> AsyncIterator[bool]:
        async with file_lock(self.path.with_name(f"{self.path.name}.{name}.lock")) as taken:
            yield taken


async def _translated(
    copy: Callable[[Path, Path, float, StageProgress | None], None],
    source: Path,
    destination: Path,
    busy_s: float,
    progress: StageProgress | None,
) -> None:
    try:
        await asyncio.to_thread(copy, source, destination, busy_s, progress)
    except _StillBusyError:
        raise DatabaseUnavailableError(
            f"the database stayed locked by another writer for over {busy_s:g} s; the copy "
            "changed nothing (try again when it is quieter)"
        ) from None
    except sqlite3.Error as exc:
        # A failed copy rolled back: the destination is as it was.
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL:
            raise DatabaseUnavailableError(
                "the database's disk is full: the SQLite copy changed nothing (free space, "
                "then run it again)"
            ) from exc
        raise DatabaseUnavailableError(
            f"the SQLite copy failed and changed nothing ({exc.sqlite_errorname})"
        ) from exc


class _StillBusyError(Exception):
    """The other database stayed locked for longer than the busy timeout."""


class _Watch:
    """The backup's progress callback: reports progress, and gives up on a lock held too long.

    Python's ``Connection.backup`` retries a busy or locked step forever (it does not consult
    ``busy_timeout``); raising from this callback is the way to stop it, which aborts the copy
    and rolls the destination back.
    """

    def __init__(self, busy_s: float, progress: StageProgress | None) -> None:
        self._busy_s = busy_s
        self._progress = progress
        self._busy_since: float | None = None

    def __call__(self, status: int, remaining: int, total: int) -> None:
        if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            now = time.monotonic()
            self._busy_since = self._busy_since or now
            if now - self._busy_since > self._busy_s:
                raise _StillBusyError
            return
        self._busy_since = None
        if self._progress is not None:
            self._progress(total - remaining, total)


def _copy(source: Path, destination: Path, busy_s: float, progress: StageProgress | None) -> None:
    source_connection = sqlite3.connect(source, timeout=busy_s)
    try:
        destination_connection = sqlite3.connect(destination, timeout=busy_s)
        try:
            # One step (a consistent snapshot of a live source) unless progress is wanted,
            # which is only for the restore, whose source is a private file nobody writes.
            pages = -1
            if progress is not None:
                page_count = source_connection.execute("PRAGMA page_count").fetchone()[0]
                pages = max(1, page_count // _COPY_STEPS)
            source_connection.backup(
                destination_connection,
                pages=pages,
                progress=_Watch(busy_s, progress),
                sleep=0.05,
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
