"""What a backup engine does, whatever the backend: dump, check a copy, restore, lock.

:func:`create_engine` picks :class:`~bastion.backup.sqlite_engine.SqliteEngine` or
:class:`~bastion.backup.postgres_engine.PostgresEngine` for a :class:`~bastion.Database`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.digest import TableDigest, table_digests
from bastion.maintenance.integrity import check_integrity
from bastion.settings import DatabaseSettings

__all__ = [
    "BackupEngine",
    "CopyCheck",
    "DumpInfo",
    "LockName",
    "StageProgress",
    "alembic_revisions",
    "check_database",
    "create_engine",
]

LockName = Literal["backup", "restore"]
StageProgress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class DumpInfo:
    """What was dumped: server version, schema revision, and each table's digest."""

    server_version: str
    alembic_revisions: tuple[str, ...]
    tables: dict[str, TableDigest]


@dataclass(frozen=True, slots=True)
class CopyCheck:
    """A restored copy, checked: integrity findings (empty: sound) and its digests."""

    problems: list[str]
    alembic_revisions: tuple[str, ...]
    tables: dict[str, TableDigest] = field(default_factory=dict)


class BackupEngine(Protocol):
    """Dump, check and restore one backend's databases."""

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        """Which backend this engine serves."""
        ...

    async def dump(self, destination: Path) -> DumpInfo:
        """Write a consistent dump of the live database to ``destination``."""
        ...

    async def check_copy(self, dump: Path, work_dir: Path) -> CopyCheck:
        """Restore ``dump`` into a scratch database, check it, digest it, drop it."""
        ...

    async def restore(self, dump: Path, work_dir: Path, progress: StageProgress | None) -> None:
        """Replace the live database's contents with ``dump``, all or nothing."""
        ...

    def lock(self, name: LockName) -> AbstractAsyncContextManager[bool]:
        """Try to take the named lock without waiting; yields whether it was taken."""
        ...


def create_engine(database: Database, *, pg_bin_dir: Path | None = None) -> BackupEngine:
    """The engine for ``database``'s backend.

    Raises:
        ConfigurationError: an in-memory SQLite database (nothing to back up).
    """
    if database.backend == "sqlite":
        from bastion.backup.sqlite_engine import SqliteEngine

        return SqliteEngine(database)
    from bastion.backup.postgres_engine import PostgresEngine

    return PostgresEngine(database, pg_bin_dir)


async def check_database(url: str) -> CopyCheck:
    """Open the database at ``url`` (a scratch copy), check its integrity and digest it."""
    settings = DatabaseSettings(DATABASE_URL=url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0)
    async with Database(settings) as database:
        report = await check_integrity(database)
        problems = [
            f"{problem.check}: {problem.detail}"
            for problem in report.problems
            if problem.severity == "error"
        ]
        async with database.read(consistent=True) as session:
            connection = await session.connection()
            revisions = await alembic_revisions(connection)
            tables = await table_digests(connection)
    return CopyCheck(problems=problems, alembic_revisions=revisions, tables=tables)


async def alembic_revisions(connection: AsyncConnection) -> tuple[str, ...]:
    """The revisions in ``alembic_version``, or ``()`` when there is no such table."""
    has_table = await connection.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
    if not has_table:
        return ()
    rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
    return tuple(sorted(str(row[0]) for row in rows))
