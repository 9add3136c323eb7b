"""Content digests of tables: equal data gives equal digests on SQLite and PostgreSQL.

A table's digest is the SHA-256 of its rows, one canonical JSON line per row (see
:mod:`bastion.maintenance.codec`: the row is an object of column name → canonical value,
serialised with sorted keys and no spaces), in primary-key order — or ordered by every
orderable column when the table has no primary key. Text is ordered by code point on both
backends (``COLLATE "C"`` on PostgreSQL, SQLite's default binary collation), so the order
does not depend on the server's locale. ``alembic_version`` is not digested (it describes the
schema; exports carry the revision on its own).

Rows are streamed (a server-side cursor on PostgreSQL), so memory stays bounded whatever the
table's size.

>>> async with db.read(consistent=True) as session:  # doctest: +SKIP
...     digests = await table_digests(await session.connection())
>>> digests["users"]  # doctest: +SKIP
TableDigest(rows=2, sha256='9f2c…')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import JSON, String, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from bastion.database import Database
from bastion.maintenance.codec import encoder_for
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["TableDigest", "canonical_lines", "open_snapshot", "row_encoder", "table_digests"]

STREAM_BATCH_ROWS: Final = 1000


@dataclass(frozen=True, slots=True)
class TableDigest:
    """How many rows a table holds and the SHA-256 (hex) of their canonical lines."""

    rows: int
    sha256: str


async def table_digests(
    target: AsyncConnection | Database, *, tables: Sequence[str] | None = None
) -> dict[str, TableDigest]:
    """Digest every user table (or those named in ``tables``), keyed by table name.

    ``target`` is a connection (its transaction, if any, gives one snapshot) or a running
    :class:`~bastion.database.Database` (read in one consistent snapshot).

    Raises:
        UnknownTableError: a name in ``tables`` is not a table of the database.
        BastionError: the database failed (translated when ``target`` is a Database).
    """
    async with open_snapshot(target) as connection:
        metadata = await reflect_tables(connection)
        digests: dict[str, TableDigest] = {}
        for table in user_tables(metadata, tables):
            hasher = hashlib.sha256()
            rows = 0
            async for batch in canonical_lines(connection, table):
                rows += len(batch)
                hasher.update(b"".join(batch))
            digests[table.name] = TableDigest(rows=rows, sha256=hasher.hexdigest())
        return digests


async def canonical_lines(connection: AsyncConnection, table: Table) -> AsyncIterator[list[bytes]]:
    """The rows of ``table`` as canonical JSON lines (``\\n``-terminated), in batches.

    The same lines make the digest and the export files, so an export can be checked against
    a digest without reading the data twice.
    """
    columns = list(table.columns)
    line = row_encoder(columns)
    statement = select(*columns).order_by(*_row_order(table, connection.dialect.name))
    result = await connection.stream(statement)
    async for partition in result.partitions(STREAM_BATCH_ROWS):
        yield [line(row) for row in partition]


def row_encoder(columns: Sequence[Any]) -> Callable[[Sequence[Any]], bytes]:
    """A function turning a row of ``columns`` into its canonical JSON line.

    The line is an object of column name → canonical value, with sorted keys, no spaces,
    and ``\n`` at the end.
    """
    names = [column.name for column in columns]
    encoders = [encoder_for(column.type) for column in columns]

    def line(row: Sequence[Any]) -> bytes:
        document = {
            name: encode(value) for name, encode, value in zip(names, encoders, row, strict=True)
        }
        return dumps_canonical(document).encode() + b"\n"

    return line


def dumps_canonical(document: Any) -> str:
    """``json.dumps`` with sorted keys, no spaces and UTF-8 kept as is."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@asynccontextmanager
async def open_snapshot(target: AsyncConnection | Database) -> AsyncIterator[AsyncConnection]:
    """``target`` itself, or a connection reading one consistent snapshot of a Database."""
    if isinstance(target, AsyncConnection):
        yield target
        return
    async with target.read(consistent=True) as session:
        yield await session.connection()


def _row_order(table: Table, dialect_name: str) -> list[ColumnElement[Any]]:
    key = list(table.primary_key.columns) or [
        column for column in table.columns if not isinstance(column.type, JSON)
    ]
    order: list[ColumnElement[Any]] = []
    for column in key:
        expression: ColumnElement[Any] = column
        if dialect_name == "postgresql" and isinstance(column.type, String):
            expression = column.collate("C")
        order.append(expression.asc().nulls_last() if not column.primary_key else expression)
    return order
