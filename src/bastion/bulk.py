"""Fast bulk inserts: COPY on PostgreSQL, ``executemany`` on SQLite, in batches.

Two modes:

* **atomic** (the default): one transaction; every row lands or none does.
* **best effort**: each batch commits on its own (re-run while its failure is transient),
  up to ``concurrency`` at a time. A batch that a row spoils is split in halves until the
  bad rows stand alone, so the result names exactly the rows that were refused — and why —
  and every other row is stored, at the cost of a few transactions per bad row.

Values go through the columns' SQLAlchemy types first (JSON is serialised, ``UTCDateTime``
checks and converts), exactly as a normal INSERT would bind them; a column a row leaves out
gets its Python-side default computed for that row (an audit timestamp is the instant the
row's batch is prepared, not the instant the import started). The columns written are the
first row's (plus those defaults): a later row naming a column the first row does not is
refused, never silently cut down.

>>> result = await bulk_insert(db, Message.__table__, rows, batch_size=5_000)  # doctest: +SKIP
>>> result.inserted, result.failed
(100000, [])
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

from sqlalchemy import Column, Table, insert, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._translate import translate_error
from bastion.database import Database
from bastion.errors import BastionError, IntegrityViolationError

__all__ = ["BulkResult", "FailedRow", "bulk_insert"]

Row = Mapping[str, Any]
Progress = Callable[[int, int], None]
Record = tuple[Any, ...]

ENCODE_SLICE: Final = 500
"""Rows encoded between two yields to the event loop (2 to 3 ms of work)."""

INVALID_ROW: Final = "invalid_row"
"""``FailedRow.code`` of a row refused before reaching the database (a value its column
cannot take, a missing column)."""


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A row that was refused: its position in the input, a stable code, and why.

    ``code`` is a Bastion error code (``"unique_violation"``, ``"foreign_key_violation"``,
    ``"check_violation"``, …) or ``"invalid_row"``; ``message`` never quotes the row's values.
    """

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
        ValueError: ``batch_size`` or ``concurrency`` is not positive; the first row names a
            column the table does not have; or (atomic mode) a row lacks a column, names
            one the first row does not, or holds a value its column cannot take — the
            message gives the row's index; nothing is written. In best-effort mode such a
            row is a ``FailedRow`` with code ``"invalid_row"``.
        IntegrityViolationError: atomic mode, and a row broke a constraint (nothing written).
        BastionError: any other database failure. In best-effort mode the batches committed
            before it stay committed.
    """
    if batch_size < 1 or (concurrency is not None and concurrency < 1):
        raise ValueError("batch_size and concurrency must be positive")
    if not rows:
        return BulkResult(inserted=0)
    plan = _Plan(database.engine.dialect, table, rows[0])
    batches = [
        (start, rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)
    ]
    progress = _ProgressCounter(len(rows), on_progress)
    if atomic:
        async with database.write_connection() as connection:
            await _write_pipelined(connection, plan, batches, progress)
        return BulkResult(inserted=len(rows))

    limit = min(concurrency or database.settings.pool_size, database.settings.pool_size)
    gate = asyncio.Semaphore(limit)

    async def one_batch(start: int, batch: Sequence[Row]) -> tuple[int, list[FailedRow]]:
        async with gate:
            records, failed = plan.encode_valid(start, batch)
            inserted = await _insert_halving(database, plan, records, failed)
        progress.add(len(batch))
        return inserted, failed

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


async def _write_pipelined(
    connection: AsyncConnection,
    plan: _Plan,
    batches: Sequence[tuple[int, Sequence[Row]]],
    progress: _ProgressCounter,
) -> None:
    """Write ``batches`` in order on ``connection``, encoding each while the last one is written.

    The driver writes off the event loop (aiosqlite's thread; asyncpg's socket), so encoding
    batch *n + 1* on the loop meanwhile hides most of the encoding time. Encoding yields to
    the loop every :data:`ENCODE_SLICE` rows, so other requests are not held up behind it.

    Raises:
        ValueError: a row cannot be encoded (after the batch being written has finished, so
            the unit's rollback never races it).
        Whatever the write raises.
    """
    writing: asyncio.Task[None] | None = None
    written = 0
    try:
        for start, batch in batches:
            records = await plan.encode_all_yielding(start, batch)
            if writing is not None:
                await writing
                progress.add(written)
            writing = asyncio.create_task(plan.write(connection, records))
            written = len(batch)
        if writing is not None:
            await writing
            progress.add(written)
    finally:
        if writing is not None and not writing.done():
            # Leaving early (a bad row, a cancellation): let the write in flight end first.
            await asyncio.wait([writing])
            if not writing.cancelled():
                writing.exception()  # retrieved: the error that is already leaving wins


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


class _RowError(ValueError):
    """A row that cannot be encoded for its columns; ``message`` quotes no value."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Plan:
    """How rows become driver records and reach the table: computed once per call."""

    def __init__(self, dialect: Dialect, table: Table, first: Row) -> None:
        unknown = [name for name in first if name not in table.c]
        if unknown:
            raise ValueError(f"{table.name} has no column(s) {', '.join(unknown)}")
        self.table = table
        self.dialect = dialect
        # The first row's key set: a row with the same set is on the fast path; any other
        # row is checked for columns outside the plan, which would otherwise be dropped.
        self.expected = frozenset(first)
        # Columns with a Python-side default: computed for each row that leaves them out.
        self.defaults: dict[str, Callable[[], Any]] = {
            column.name: _default_of(column) for column in table.c if _has_python_default(column)
        }
        self.absent_from_first = {
            name: make for name, make in self.defaults.items() if name not in first
        }
        columns = [*first, *self.absent_from_first]
        self.planned = frozenset(columns)
        self.sql: str | None = None
        if dialect.name != "postgresql":
            # Compiled for the driver's positional style; executed without SQLAlchemy's
            # per-row parameter handling, which dominates the cost of a large executemany.
            compiled = insert(table).compile(dialect=dialect, column_keys=columns)
            self.sql = str(compiled)
            columns = list(compiled.positiontup or [])  # the table's order, not the rows'
        self.columns = columns
        self.processors = [
            # dialect_impl resolves variants (JSON → JSONB) and keeps TypeDecorator conversions.
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in columns
        ]
        self.pairs = list(zip(columns, self.processors, strict=True))

    def encode(self, row: Row) -> Record:
        """``row`` as a driver-ready tuple.

        Raises:
            _RowError: a missing column, a column outside the plan, or a value its column
                refuses (which one, not what).
        """
        if row.keys() != self.expected:
            self._refuse_unplanned(row)
        if self.absent_from_first:
            row = self._filled(row, self.absent_from_first)
        try:
            return self._tuple(row)
        except Exception:
            # The slow path, for rows unlike the first: fill any column with a default.
            row = self._filled(row, self.defaults)
            try:
                return self._tuple(row)
            except Exception:
                raise self._explain(row) from None

    def _refuse_unplanned(self, row: Row) -> None:
        unplanned = [name for name in row if name not in self.planned]
        if not unplanned:
            return
        unknown = [name for name in unplanned if name not in self.table.c]
        if unknown:
            raise _RowError(f"{self.table.name} has no column(s) {', '.join(unknown)}")
        raise _RowError(
            f"column(s) {', '.join(unplanned)} not named by the first row; every row must "
            "name the first row's columns (it may leave out those with defaults)"
        )

    def _tuple(self, row: Row) -> Record:
        return tuple(
            row[name] if process is None else process(row[name]) for name, process in self.pairs
        )

    @staticmethod
    def _filled(row: Row, defaults: Mapping[str, Callable[[], Any]]) -> Row:
        filled = dict(row)
        for name, make in defaults.items():
            if name not in filled:
                filled[name] = make()
        return filled

    def _explain(self, row: Row) -> _RowError:
        for name, process in zip(self.columns, self.processors, strict=True):
            if name not in row:
                return _RowError(f"missing column {name}")
            try:
                value = row[name]
                if process is not None:
                    process(value)
            except Exception as exc:
                return _RowError(f"column {name}: {_describe(exc)}")
        return _RowError("the row cannot be encoded")

    def _encode_columns(self, batch: Sequence[Row]) -> list[Record]:
        """The batch encoded column by column: the fast path, for rows that all encode."""
        # map() over itemgetter and the converters keeps the per-value work in C as far as
        # the converters allow; row by row, Python's per-value overhead dominates.
        expected = self.expected
        for row in batch:
            if row.keys() != expected:
                raise _RowError("rows differ in their columns")  # the slow path says how
        if self.absent_from_first:
            batch = [self._filled(row, self.absent_from_first) for row in batch]
        columns = [
            list(map(itemgetter(name), batch))
            if process is None
            else list(map(process, map(itemgetter(name), batch)))
            for name, process in self.pairs
        ]
        return list(zip(*columns, strict=True))

    def encode_all(self, start: int, batch: Sequence[Row]) -> list[Record]:
        """Every row of ``batch`` encoded (atomic mode).

        Raises:
            ValueError: a row cannot be encoded; the message gives its index in the input.
        """
        with suppress(Exception):  # on failure, find the row at fault below
            return self._encode_columns(batch)
        records: list[Record] = []
        for offset, row in enumerate(batch):
            try:
                records.append(self.encode(row))
            except _RowError as exc:
                raise ValueError(f"row {start + offset}: {exc.message}") from None
        return records

    async def encode_all_yielding(self, start: int, batch: Sequence[Row]) -> list[Record]:
        """:meth:`encode_all`, in slices of :data:`ENCODE_SLICE` rows with a yield between."""
        records: list[Record] = []
        for offset in range(0, len(batch), ENCODE_SLICE):
            await asyncio.sleep(0)  # the first one also lets a write just handed over start
            records += self.encode_all(start + offset, batch[offset : offset + ENCODE_SLICE])
        return records

    def encode_valid(
        self, start: int, batch: Sequence[Row]
    ) -> tuple[list[tuple[int, Record]], list[FailedRow]]:
        """The rows of ``batch`` that encode (with their input index), and those that don't."""
        with suppress(Exception):  # on failure, encode row by row setting bad ones aside
            return list(enumerate(self._encode_columns(batch), start)), []
        records: list[tuple[int, Record]] = []
        failed: list[FailedRow] = []
        for offset, row in enumerate(batch):
            try:
                records.append((start + offset, self.encode(row)))
            except _RowError as exc:
                failed.append(
                    FailedRow(index=start + offset, code=INVALID_ROW, message=exc.message)
                )
        return records, failed

    async def write(self, connection: AsyncConnection, records: Sequence[Record]) -> None:
        """Insert ``records`` within ``connection``'s transaction."""
        if not records:
            return
        if self.sql is not None:
            await connection.exec_driver_sql(self.sql, list(records))
        else:
            await _copy(connection, self.table, self.columns, records)


def _has_python_default(column: Column[Any]) -> bool:
    default = column.default
    return default is not None and (default.is_callable or default.is_scalar)


def _default_of(column: Column[Any]) -> Callable[[], Any]:
    default: Any = column.default
    if default.is_callable:
        # SQLAlchemy wraps a no-argument function to take the execution context; there is
        # none here, so defaults that need one are out of reach of bulk inserts.
        function = default.arg
        return lambda: function(None)
    value = default.arg
    return lambda: value


def _describe(exc: Exception) -> str:
    # The converters' own messages name the problem (a naive datetime, a wrong type) without
    # the value; anything else is described by its type only, so no value can leak.
    if isinstance(exc, ValueError | TypeError) and len(str(exc)) <= 200:
        return str(exc)
    return type(exc).__name__


def _is_row_error(exc: BaseException) -> bool:
    """Whether ``exc`` is about the rows written (so smaller batches may succeed)."""
    if isinstance(exc, IntegrityViolationError | _RowError):
        return True
    # PostgreSQL class 22, data exception: a value too long, out of range, malformed.
    return isinstance(exc, BastionError) and (exc.sqlstate or "").startswith("22")


async def _insert_halving(
    database: Database,
    plan: _Plan,
    records: list[tuple[int, Record]],
    failed: list[FailedRow],
) -> int:
    """Insert ``records`` in one retried unit; on a row error, each half in its own.

    Appends the rows that fail alone to ``failed``; returns how many were inserted.
    """
    if not records:
        return 0

    async def work(connection: AsyncConnection) -> None:
        await plan.write(connection, [record for _, record in records])

    try:
        await database.run(database.write_connection, work)
        return len(records)
    except Exception as exc:
        if not _is_row_error(exc):
            raise
        if len(records) == 1:
            code = exc.code if isinstance(exc, BastionError) else INVALID_ROW
            message = exc.message if isinstance(exc, BastionError | _RowError) else str(exc)
            failed.append(FailedRow(index=records[0][0], code=code, message=message))
            return 0
    middle = len(records) // 2
    first = await _insert_halving(database, plan, records[:middle], failed)
    return first + await _insert_halving(database, plan, records[middle:], failed)


async def _copy(
    connection: AsyncConnection, table: Table, columns: list[str], records: Sequence[Record]
) -> None:
    """COPY ``records`` into ``table`` inside the connection's transaction."""
    # The adapter opens its transaction lazily, at the first statement; COPY must run in it.
    await connection.execute(text("SELECT 1"))
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # an asyncpg.Connection
    try:
        await driver.copy_records_to_table(
            table.name, records=records, columns=columns, schema_name=table.schema
        )
    except Exception as exc:
        if getattr(exc, "sqlstate", None) is None:
            # Refused by asyncpg's encoder before reaching the server: a value of the wrong
            # type for its column. The message can quote the value, so it is not passed on.
            raise _RowError(
                f"a value has the wrong type for its column ({type(exc).__name__})"
            ) from exc
        # Raised by asyncpg directly, not through SQLAlchemy: route it through the same seam.
        raise _as_dbapi_error(exc) from exc


def _as_dbapi_error(exc: Exception) -> Exception:
    # asyncpg's own errors carry .sqlstate, which the translation reads.
    translated = translate_error(DBAPIError("COPY", None, exc))
    return translated if translated is not None else exc
