"""What the database is: server version, size, tables and their row estimates.

Read-only questions for the admin API's ``info`` (and anyone else), answered the cheap way on
each backend — catalog estimates on PostgreSQL rather than ``count(*)`` over big tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database

__all__ = [
    "DatabaseInfo",
    "TableInfo",
    "inspect_database",
    "server_version",
    "sqlite_file_sizes",
]


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table and about how many rows it holds (an estimate on PostgreSQL)."""

    name: str
    rows: int
    estimated: bool


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """The server and the database, without anything secret."""

    backend: str
    server_version: str
    size_bytes: int | None
    tables: list[TableInfo]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_POSTGRES_TABLES = text(
    "SELECT c.relname AS name, GREATEST(c.reltuples, 0)::bigint AS rows "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND n.nspname = current_schema() ORDER BY c.relname"
)
_SQLITE_TABLES = text(
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
)


def server_version(connection: AsyncConnection) -> str:
    """The server's version as SQLAlchemy read it on connecting (no round trip)."""
    if connection.dialect.name == "sqlite":
        return sqlite3.sqlite_version
    version = connection.dialect.server_version_info or ()
    return ".".join(str(part) for part in version)


def sqlite_file_sizes(database: str) -> dict[str, int]:
    """``size_bytes`` of an SQLite file and ``wal_bytes`` of its write-ahead log, if any.

    Empty for an in-memory database. Blocking (two ``stat`` calls).
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return {}
    path = Path(database).expanduser()
    sizes = {"size_bytes": path.stat().st_size}
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        sizes["wal_bytes"] = wal.stat().st_size
    return sizes


async def inspect_database(database: Database) -> DatabaseInfo:
    """Version, size and tables of ``database``, read in one read unit.

    Raises:
        DatabaseUnavailableError, QueryError, …: the database could not answer.
    """
    async with database.read_connection() as connection:
        if database.backend == "postgresql":
            size = await connection.scalar(text("SELECT pg_database_size(current_database())"))
            rows = (await connection.execute(_POSTGRES_TABLES)).all()
            tables = [TableInfo(row.name, int(row.rows), estimated=True) for row in rows]
            return DatabaseInfo("postgresql", server_version(connection), int(size or 0), tables)
        names = [row.name for row in await connection.execute(_SQLITE_TABLES)]
        tables = []
        for name in names:
            # An exact count: SQLite keeps no estimate, and its tables are small enough here.
            quoted = '"' + name.replace('"', '""') + '"'
            count = await connection.scalar(text(f"SELECT count(*) FROM {quoted}"))  # noqa: S608
            tables.append(TableInfo(name, int(count or 0), estimated=False))
    sizes = await asyncio.to_thread(sqlite_file_sizes, database.settings.url.database or "")
    return DatabaseInfo("sqlite", sqlite3.sqlite_version, sizes.get("size_bytes"), tables)
