"""Import an export directory into a database: all of it, or nothing.

The target is an empty database migrated to the export's schema revision (``bastion db
upgrade``); ``replace=True`` empties it first (children before parents), and is refused for an
export of only some tables (it would empty the others too, with nothing to put back). Any
backend can read any backend's export: values are decoded by the *target's* reflected column
types, so a SQLite database moves to PostgreSQL with one export and one import.

Order of work, so that bad input loses nothing:

1. the manifest and every file are checked *before anything is written*: known tables and
   columns only, plain file names, every line at most ``max_line_bytes`` and a JSON object
   whose values fit their columns, row counts and SHA-256 equal to the manifest's;
2. then, in one transaction: the emptiness check (or the ``replace`` deletes), inserts in
   foreign-key order in batches (``executemany``), PostgreSQL sequences moved past the
   imported ids, and the tables' digests compared with the manifest — any difference rolls
   everything back.

>>> result = await import_database(db, Path("export"))  # doctest: +SKIP
>>> result.tables  # doctest: +SKIP
{'users': 2, 'conversations': 3, ...}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from sqlalchemy import MetaData, Table, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.codec import decode_value
from bastion.maintenance.digest import table_digests
from bastion.maintenance.errors import ImportFileError, ImportTargetError
from bastion.maintenance.export import schema_revision
from bastion.maintenance.export_format import (
    MANIFEST_NAME,
    MAX_LINE_BYTES,
    MAX_MANIFEST_BYTES,
    ExportManifest,
    table_file_name,
)
from bastion.maintenance.progress import NoProgress, Progress
from bastion.maintenance.reset import delete_all_rows
from bastion.maintenance.sequences import sync_sequences
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["ImportResult", "import_database", "read_manifest"]

BATCH_ROWS: Final = 500


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Rows imported per table, sequences set, and whether existing rows were replaced."""

    tables: dict[str, int]
    sequences: list[str]
    replaced: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def import_database(
    database: Database,
    directory: Path,
    *,
    replace: bool = False,
    batch_size: int = BATCH_ROWS,
    max_line_bytes: int = MAX_LINE_BYTES,
    progress: Progress | None = None,
) -> ImportResult:
    """Import the export in ``directory`` into ``database`` (see the module docstring).

    Raises:
        ImportFileError: the manifest or a file is malformed, names an unknown table or
            column, has a line over ``max_line_bytes``, or differs from the manifest.
        ImportTargetError: the target is not empty (and not ``replace``); ``replace`` and
            the export lacks some of the target's tables (they are named; nothing is
            deleted); the target is at another schema revision; or its content after the
            import differs from the export's.
        BastionError: a translated driver error (the transaction is rolled back).
    """
    progress = progress or NoProgress()
    manifest = await asyncio.to_thread(read_manifest, directory)
    async with database.read_connection() as connection:
        metadata = await reflect_tables(connection)
        target_revision = await schema_revision(connection, metadata)
        if replace:
            _require_every_table(manifest, metadata)
        else:  # early, to fail before reading the files; checked again below
            await _require_empty(connection, user_tables(metadata))
    tables = _check_tables(manifest, metadata, directory)
    if manifest.schema_revision and target_revision != manifest.schema_revision:
        shown = ", ".join(target_revision) or "none"
        raise ImportTargetError(
            f"the export is at schema revision {', '.join(manifest.schema_revision)} but the "
            f"target is at {shown}: migrate the target to that revision first"
        )
    dialect = database.backend
    for table in tables:
        await _check_file(directory, manifest, table, dialect, max_line_bytes, progress)
    async with database.write_connection() as connection:
        if replace:
            await delete_all_rows(connection)
        else:
            await _require_empty(connection, user_tables(metadata))
        counts: dict[str, int] = {}
        for table in tables:
            counts[table.name] = await _insert_table(
                connection,
                directory,
                table,
                dialect,
                batch_size,
                max_line_bytes,
                progress,
                expected=_entry(manifest, table.name).rows,
            )
        sequences = await sync_sequences(connection, tables)
        await _verify(connection, manifest, tables)
    return ImportResult(counts, sequences, replace)


def read_manifest(directory: Path) -> ExportManifest:
    """Read and validate ``manifest.json`` of an export directory.

    Raises:
        ImportFileError: missing, too large, not JSON, or not a manifest of this format.
    """
    path = directory / MANIFEST_NAME
    try:
        with path.open("rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ImportFileError(
            f"{directory} has no {MANIFEST_NAME}: not a complete export"
        ) from None
    except OSError as exc:
        raise ImportFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImportFileError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return ExportManifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'manifest'}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise ImportFileError(
            f"{MANIFEST_NAME} is not a valid export manifest: {problems}"
        ) from None


def _check_tables(manifest: ExportManifest, metadata: MetaData, directory: Path) -> list[Table]:
    """The target tables the manifest names, in the target's foreign-key order."""
    names = [table.name for table in manifest.tables]
    known = {table.name for table in user_tables(metadata)}
    unknown = sorted(name for name in names if name not in known)
    if unknown:
        raise ImportFileError(f"the export has tables the target does not: {', '.join(unknown)}")
    listed = {table.file for table in manifest.tables}
    strays = sorted(path.name for path in directory.glob("*.jsonl") if path.name not in listed)
    if strays:
        raise ImportFileError(f"files not listed in {MANIFEST_NAME}: {', '.join(strays)}")
    wanted = set(names)
    return [table for table in user_tables(metadata) if table.name in wanted]


def _require_every_table(manifest: ExportManifest, metadata: MetaData) -> None:
    """Refuse ``replace`` unless the export holds every user table of the target.

    Replacing empties every table, so a partial export would lose the rows of the tables it
    does not hold.

    Raises:
        ImportTargetError: the target tables the export does not hold, by name.
    """
    held = {table.name for table in manifest.tables}
    missing = [table.name for table in user_tables(metadata) if table.name not in held]
    if missing:
        raise ImportTargetError(
            f"replace empties every table, but the export does not hold {', '.join(missing)}: "
            "import a full export, or empty the target yourself and import without replace"
        )


def _entry(manifest: ExportManifest, name: str) -> Any:
    return next(table for table in manifest.tables if table.name == name)


async def _check_file(
    directory: Path,
    manifest: ExportManifest,
    table: Table,
    dialect: str,
    max_line_bytes: int,
    progress: Progress,
) -> None:
    """Decode every row of ``table``'s file, and compare its count and SHA-256."""
    entry = _entry(manifest, table.name)
    progress.start("checking", table.name, entry.rows)
    hasher = hashlib.sha256()
    rows = _rows(directory / entry.file, table, dialect, max_line_bytes, hasher)
    count = 0
    try:
        while batch := await asyncio.to_thread(_next_batch, rows, BATCH_ROWS):
            count += len(batch)
            progress.advance(len(batch))
    finally:
        rows.close()
    if count != entry.rows:
        raise ImportFileError(f"{entry.file}: {count} rows, the manifest says {entry.rows}")
    if hasher.hexdigest() != entry.sha256:
        raise ImportFileError(f"{entry.file}: content differs from the manifest's SHA-256")


def _rows(
    path: Path,
    table: Table,
    dialect: str,
    max_line_bytes: int,
    hasher: Any = None,
) -> Generator[tuple[int, dict[str, Any]]]:
    """``(line number, decoded row)`` for each line of ``path`` (blocking).

    Raises:
        ImportFileError: a line too long, not a JSON object, with an unknown column, a set of
            columns other than the first line's, or a value that does not fit its column.
    """
    columns = table.columns
    expected_keys: frozenset[str] | None = None
    try:
        file = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"cannot read {path.name}: {exc.strerror}") from None
    with file:
        number = 0
        while line := file.readline(max_line_bytes + 1):
            number += 1
            where = f"{path.name} line {number}"
            if len(line) > max_line_bytes:
                raise ImportFileError(f"{where}: longer than {max_line_bytes} bytes")
            if hasher is not None:
                hasher.update(line)
            try:
                document = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ImportFileError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(document, dict):
                raise ImportFileError(f"{where}: expected a JSON object (one row)")
            keys = frozenset(document)
            if expected_keys is None:
                unknown = sorted(keys - set(columns.keys()))
                if unknown:
                    raise ImportFileError(
                        f"{where}: table {table.name} has no column {', '.join(unknown)}"
                    )
                expected_keys = keys
            elif keys != expected_keys:
                raise ImportFileError(f"{where}: other columns than the first line's")
            row = {}
            for name, value in document.items():
                try:
                    row[name] = decode_value(value, columns[name].type, dialect)
                except ValueError as exc:
                    raise ImportFileError(f"{where}: column {name}: {exc}") from None
            yield number, row


async def _require_empty(connection: AsyncConnection, tables: list[Table]) -> None:
    holding = [
        table.name
        for table in tables
        if await connection.scalar(select(literal(1)).select_from(table).limit(1)) is not None
    ]
    if holding:
        raise ImportTargetError(
            f"the target is not empty ({', '.join(holding)} hold rows): import into an empty "
            "database, or replace its content (--replace)"
        )


async def _insert_table(
    connection: AsyncConnection,
    directory: Path,
    table: Table,
    dialect: str,
    batch_size: int,
    max_line_bytes: int,
    progress: Progress,
    *,
    expected: int,
) -> int:
    progress.start("importing", table.name, expected)
    rows = _rows(directory / table_file_name(table.name), table, dialect, max_line_bytes)
    statement = insert(table)
    inserted = 0
    try:
        while batch := await asyncio.to_thread(_next_batch, rows, batch_size):
            await connection.execute(statement, batch)
            inserted += len(batch)
            progress.advance(len(batch))
    finally:
        rows.close()
    return inserted


def _next_batch(rows: Iterator[tuple[int, dict[str, Any]]], size: int) -> list[dict[str, Any]]:
    batch = []
    for _, row in rows:
        batch.append(row)
        if len(batch) == size:
            break
    return batch


async def _verify(
    connection: AsyncConnection, manifest: ExportManifest, tables: list[Table]
) -> None:
    digests = await table_digests(connection, tables=[table.name for table in tables])
    differing = [
        entry.name
        for entry in manifest.tables
        if (digests[entry.name].rows, digests[entry.name].sha256) != (entry.rows, entry.sha256)
    ]
    if differing:
        raise ImportTargetError(
            f"after import the content of {', '.join(differing)} differs from the export "
            "(a column type that cannot hold the exported values?); nothing was imported"
        )
