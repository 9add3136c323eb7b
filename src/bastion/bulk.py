"""Fast bulk inserts: COPY on PostgreSQL, ``executemany`` on SQLite, in batches.

Two modes:

* **atomic** (the default): one transaction; every row lands or none does.
* **best effort**: each batch commits on its own, up to ``concurrency`` at a time. A batch
  that fails is retried row by row, so the result names exactly the rows that were refused
  (and why), and every other row is kept.

Values go through the columns' SQLAlchemy types first (JSON is serialised, ``UTCDateTime``
checks and converts), exactly as a normal INSERT would bind them.

>>> result = await bulk_insert(db, Message.__table__, rows, batch_size=5_000)  # doctest: +SKIP
>>> result.inserted, result.failed
(100000, [])
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, insert, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._translate import translate_error
from bastion.database import Database
from bastion.errors import BastionError, IntegrityViolationError

__all__ = ["BulkResult", "FailedRow", "bulk_insert"]

Row = Mapping[str, Any]
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A row the database refused: its position in the input, and why."""

    index: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BulkResult:
    """How many rows were inserted, and which were refused (best-effort mode only)."""

    inserted: int
    failed: list[FailedRow] = field(default_factory=list)


async def bulk_insert(
    database: Database,
    table: Table,
    rows: Sequence[Row],
    *,
    batch_size: int = 5_000,
    atomic: bool = True,
    concurrency: int | None = None,
    on_progress: Progress | None = None,
) -> BulkResult:
    """Insert ``rows`` (mappings of column name to value) into ``table``.

    ``concurrency`` (best-effort mode) bounds the batches in flight; it defaults to, and
    never exceeds, the write pool's size. ``on_progress(done, total)`` is called after each
    batch.

    Raises:
        ValueError: ``batch_size`` or ``concurrency`` is not positive, or a row names a column
            the table does not have.
        KeyError: a row lacks a column the first row has.
        IntegrityViolationError: atomic mode, and a row broke a constraint (nothing written).
        BastionError: any other database failure (atomic mode: nothing written).
    """
    if batch_size < 1 or (concurrency is not None and concurrency < 1):
        raise ValueError("batch_size and concurrency must be positive")
    columns = _columns_of(table, rows)
    batches = [
        (start, rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)
    ]
    progress = _ProgressCounter(len(rows), on_progress)
    if atomic:
        async with database.write_connection() as connection:
            for _start, batch in batches:
                await _insert_batch(connection, table, columns, batch)
                progress.add(len(batch))
        return BulkResult(inserted=len(rows))

    limit = min(concurrency or database.settings.pool_size, database.settings.pool_size)
    gate = asyncio.Semaphore(limit)

    async def one_batch(start: int, batch: Sequence[Row]) -> tuple[int, list[FailedRow]]:
        async with gate:
            result = await _insert_best_effort(database, table, columns, start, batch)
        progress.add(len(batch))
        return result

    # A TaskGroup, not gather: if one batch fails unexpectedly, the others are cancelled and
    # awaited, so no connection is still in use when the error reaches the caller.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one_batch(start, batch)) for start, batch in batches]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None  # the error itself, not a group of one
    outcomes = [task.result() for task in tasks]
    failed = sorted((row for _, rows_failed in outcomes for row in rows_failed), key=_index)
    return BulkResult(inserted=sum(inserted for inserted, _ in outcomes), failed=failed)


def _index(row: FailedRow) -> int:
    return row.index


class _ProgressCounter:
    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def add(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


def _columns_of(table: Table, rows: Sequence[Row]) -> list[str]:
    """The columns the rows fill (those of the first row; every row must have the same)."""
    if not rows:
        return []
    columns = list(rows[0])
    unknown = [name for name in columns if name not in table.c]
    if unknown:
        raise ValueError(f"{table.name} has no column(s) {', '.join(unknown)}")
    return columns


async def _insert_best_effort(
    database: Database, table: Table, columns: list[str], start: int, batch: Sequence[Row]
) -> tuple[int, list[FailedRow]]:
    try:
        async with database.write_connection() as connection:
            await _insert_batch(connection, table, columns, batch)
        return len(batch), []
    except IntegrityViolationError:
        pass  # find the offending rows one by one; the rest of the batch is still wanted
    inserted, failed = 0, []
    for offset, row in enumerate(batch):
        try:
            async with database.write_connection() as connection:
                await _insert_batch(connection, table, columns, [row])
            inserted += 1
        except BastionError as exc:
            failed.append(FailedRow(index=start + offset, code=exc.code, message=exc.message))
    return inserted, failed


async def _insert_batch(
    connection: AsyncConnection, table: Table, columns: list[str], batch: Sequence[Row]
) -> None:
    if not batch:
        return
    if connection.dialect.name == "postgresql":
        await _copy(connection, table, columns, batch)
    else:
        await _executemany(connection, table, columns, batch)


def _records(
    dialect: Dialect, table: Table, columns: list[str], batch: Sequence[Row]
) -> list[tuple[Any, ...]]:
    """The batch as driver-ready tuples: each value through its column's bind processor."""
    # dialect_impl resolves variants (JSON → JSONB) and keeps TypeDecorator conversions.
    processors = [
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    ]
    return [
        tuple(
            process(row[name]) if process is not None else row[name]
            for name, process in zip(columns, processors, strict=True)
        )
        for row in batch
    ]


async def _executemany(
    connection: AsyncConnection, table: Table, columns: list[str], batch: Sequence[Row]
) -> None:
    """One driver-level ``executemany`` of a plain INSERT (SQLite)."""
    # Compiled by SQLAlchemy for the driver's positional style; executed without SQLAlchemy's
    # per-row parameter handling, which dominates the cost of a large executemany.
    compiled = insert(table).compile(dialect=connection.dialect, column_keys=columns)
    order = list(compiled.positiontup or [])  # the table's column order, not the rows'
    await connection.exec_driver_sql(
        str(compiled), _records(connection.dialect, table, order, batch)
    )


async def _copy(
    connection: AsyncConnection, table: Table, columns: list[str], batch: Sequence[Row]
) -> None:
    """COPY ``batch`` into ``table`` inside the connection's transaction."""
    # The adapter opens its transaction lazily, at the first statement; COPY must run in it.
    await connection.execute(text("SELECT 1"))
    records = _records(connection.dialect, table, columns, batch)
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # an asyncpg.Connection
    try:
        await driver.copy_records_to_table(
            table.name, records=records, columns=columns, schema_name=table.schema
        )
    except Exception as exc:
        # Raised by asyncpg directly, not through SQLAlchemy: route it through the same seam.
        raise _as_dbapi_error(exc) from exc


def _as_dbapi_error(exc: Exception) -> Exception:
    # asyncpg's own errors carry .sqlstate, which the translation reads.
    translated = translate_error(DBAPIError("COPY", None, exc))
    return translated if translated is not None else exc
