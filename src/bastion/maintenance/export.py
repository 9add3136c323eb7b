"""Export the whole database (or some tables) as JSON Lines, one file per table.

The export reads one consistent snapshot, streams each table in primary-key order into
``<table>.jsonl`` (see :mod:`bastion.maintenance.export_format`) without holding more than a
batch in memory, and writes ``manifest.json`` last. It refuses a directory that is not empty,
so an earlier export is never overwritten; if it fails, the files it wrote are removed. Files
are readable by their owner only (mode 0600; a directory it creates, 0700): they hold all of
the service's data.

>>> manifest = await export_database(db, Path("export"))  # doctest: +SKIP
>>> [(table.name, table.rows) for table in manifest.tables]  # doctest: +SKIP
[('users', 2), ('conversations', 3), ...]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import MetaData, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.digest import canonical_lines, open_snapshot
from bastion.maintenance.errors import MaintenanceError
from bastion.maintenance.export_format import (
    MANIFEST_NAME,
    ExportedTable,
    ExportManifest,
    table_file_name,
)
from bastion.maintenance.progress import NoProgress, Progress
from bastion.maintenance.tables import reflect_tables, user_tables
from bastion.types import utcnow

__all__ = ["export_database", "schema_revision"]


async def export_database(
    database: Database,
    directory: Path,
    *,
    tables: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> ExportManifest:
    """Write every user table (or those in ``tables``) and a manifest into ``directory``.

    ``directory`` is created if missing and must otherwise be empty.

    Raises:
        MaintenanceError: ``directory`` is not an empty directory.
        UnknownTableError: a name in ``tables`` is not a user table.
        OSError: a file could not be written (files written so far are removed).
        BastionError: a translated driver error.
    """
    progress = progress or NoProgress()
    await asyncio.to_thread(_prepare_directory, directory)
    written: list[Path] = []
    try:
        async with open_snapshot(database) as connection:
            metadata = await reflect_tables(connection)
            selected = user_tables(metadata, tables)
            revision = await schema_revision(connection, metadata)
            exported = []
            for table in selected:
                total = await connection.scalar(select(func.count()).select_from(table))
                progress.start("exporting", table.name, int(total or 0))
                path = directory / table_file_name(table.name)
                written.append(path)
                exported.append(await _export_table(connection, table, path, progress))
        manifest = ExportManifest(
            created_at=utcnow(),
            source_backend=database.backend,
            schema_revision=revision,
            tables=exported,
        )
        manifest_path = directory / MANIFEST_NAME
        written.append(manifest_path)
        await asyncio.to_thread(_write_private, manifest_path, manifest.model_dump_json(indent=2))
    except BaseException:
        await asyncio.to_thread(_remove, written)
        raise
    return manifest


async def schema_revision(connection: AsyncConnection, metadata: MetaData) -> list[str]:
    """The Alembic revisions in ``alembic_version`` (empty when the table is absent)."""
    version_table = metadata.tables.get("alembic_version")
    if version_table is None:
        return []
    rows = await connection.execute(select(version_table.c.version_num))
    return sorted(str(value) for value in rows.scalars())


async def _export_table(
    connection: AsyncConnection, table: Any, path: Path, progress: Progress
) -> ExportedTable:
    hasher = hashlib.sha256()
    rows = 0
    file = await asyncio.to_thread(_create_private, path)
    try:
        async for batch in canonical_lines(connection, table):
            data = b"".join(batch)
            hasher.update(data)
            await asyncio.to_thread(file.write, data)
            rows += len(batch)
            progress.advance(len(batch))
    finally:
        await asyncio.to_thread(file.close)
    return ExportedTable(name=table.name, file=path.name, rows=rows, sha256=hasher.hexdigest())


def _create_private(path: Path) -> BinaryIO:
    """A new file only its owner can read: an export holds all of the service's data."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _write_private(path: Path, text: str) -> None:
    with _create_private(path) as file:
        file.write(text.encode())


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise MaintenanceError(f"{directory} is not a directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise MaintenanceError(f"{directory} is not empty: export into a new directory")


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
