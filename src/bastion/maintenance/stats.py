"""Statistics: rows, size on disk, index use, dead rows and last vacuum/analyze per table.

Row counts are exact (``count(*)``) for tables the catalog believes smaller than
``exact_below`` rows, and the catalog's estimate above that (``pg_class.reltuples`` on
PostgreSQL, ``sqlite_stat1`` on SQLite once ANALYZE ran): ``rows_estimated`` says which.

Sizes: PostgreSQL ``pg_total_relation_size`` (table + indexes + TOAST); SQLite the ``dbstat``
virtual table when the library has it (``size_source = "dbstat"``), otherwise only the
file's ``page_count * page_size`` (``size_source = "pages"``, per-table sizes ``None``).
Index scans and dead rows exist only on PostgreSQL (``None`` on SQLite).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["DatabaseStats", "IndexStats", "TableStats", "collect_stats"]

EXACT_BELOW: Final = 100_000

_POSTGRES_TABLES = text(
    "SELECT s.relname AS name, c.reltuples::bigint AS estimate, "
    "pg_total_relation_size(s.relid) AS size_bytes, s.n_dead_tup AS dead_rows, "
    "GREATEST(s.last_vacuum, s.last_autovacuum) AS last_vacuum, "
    "GREATEST(s.last_analyze, s.last_autoanalyze) AS last_analyze "
    "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
    "WHERE s.schemaname = current_schema()"
)
_POSTGRES_INDEXES = text(
    "SELECT relname AS table_name, indexrelname AS name, idx_scan AS scans, "
    "pg_relation_size(indexrelid) AS size_bytes "
    "FROM pg_stat_user_indexes WHERE schemaname = current_schema() ORDER BY indexrelname"
)


@dataclass(frozen=True, slots=True)
class IndexStats:
    """An index: its size and, on PostgreSQL, how often the planner used it."""

    name: str
    size_bytes: int | None
    scans: int | None


@dataclass(frozen=True, slots=True)
class TableStats:
    """A table's rows, size, dead rows, last maintenance, and its indexes."""

    name: str
    rows: int
    rows_estimated: bool
    size_bytes: int | None
    dead_rows: int | None = None
    last_vacuum: datetime | None = None
    last_analyze: datetime | None = None
    indexes: list[IndexStats] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    """Statistics of every user table, and the database's size and where it came from."""

    backend: str
    size_bytes: int | None
    size_source: str
    tables: list[TableStats]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO-8601 strings."""
        document = asdict(self)
        for table in document["tables"]:
            for key in ("last_vacuum", "last_analyze"):
                if table[key] is not None:
                    table[key] = table[key].isoformat()
        return document


async def collect_stats(database: Database, *, exact_below: int = EXACT_BELOW) -> DatabaseStats:
    """Gather :class:`DatabaseStats` in one read unit.

    Raises:
        BastionError: a translated driver error.
    """
    async with database.read_connection() as connection:
        if database.backend == "sqlite":
            return await _sqlite_stats(connection, exact_below)
        return await _postgres_stats(connection, exact_below)


async def _count(connection: AsyncConnection, table: Any) -> int:
    return int(await connection.scalar(select(func.count()).select_from(table)) or 0)


async def _postgres_stats(connection: AsyncConnection, exact_below: int) -> DatabaseStats:
    metadata = await reflect_tables(connection)
    found = {row.name: row for row in (await connection.execute(_POSTGRES_TABLES)).all()}
    indexes: dict[str, list[IndexStats]] = {}
    for row in (await connection.execute(_POSTGRES_INDEXES)).all():
        indexes.setdefault(row.table_name, []).append(
            IndexStats(row.name, int(row.size_bytes), int(row.scans))
        )
    tables = []
    for table in user_tables(metadata):
        row = found[table.name]
        # reltuples is -1 until the table was first vacuumed or analyzed: unknown, so count.
        estimated = row.estimate >= exact_below
        rows = int(row.estimate) if estimated else await _count(connection, table)
        tables.append(
            TableStats(
                table.name,
                rows,
                estimated,
                int(row.size_bytes),
                int(row.dead_rows),
                row.last_vacuum,
                row.last_analyze,
                indexes.get(table.name, []),
            )
        )
    size = await connection.scalar(text("SELECT pg_database_size(current_database())"))
    return DatabaseStats("postgresql", int(size or 0), "pg_database_size", tables)


async def _sqlite_stats(connection: AsyncConnection, exact_below: int) -> DatabaseStats:
    metadata = await reflect_tables(connection)
    page_size = int(await connection.scalar(text("PRAGMA page_size")) or 0)
    page_count = int(await connection.scalar(text("PRAGMA page_count")) or 0)
    sizes = await _dbstat_sizes(connection)
    estimates = await _sqlite_stat1(connection)
    tables = []
    for table in user_tables(metadata):
        estimate = estimates.get(table.name)
        estimated = estimate is not None and estimate >= exact_below
        rows = estimate if estimated and estimate is not None else await _count(connection, table)
        index_names = [index.name for index in table.indexes if index.name] + [
            name for name in sizes if name.startswith(f"sqlite_autoindex_{table.name}_")
        ]
        tables.append(
            TableStats(
                table.name,
                rows,
                estimated,
                sizes.get(table.name) if sizes else None,
                indexes=[
                    IndexStats(name, sizes.get(name) if sizes else None, None)
                    for name in sorted(index_names)
                ],
            )
        )
    source = "dbstat" if sizes else "pages"
    return DatabaseStats("sqlite", page_size * page_count, source, tables)


async def _dbstat_sizes(connection: AsyncConnection) -> dict[str, int]:
    """Bytes per table and index from ``dbstat``; empty when SQLite was built without it."""
    try:
        rows = await connection.execute(
            text("SELECT name, SUM(pgsize) AS size FROM dbstat GROUP BY name")
        )
    except sa_exc.OperationalError:
        return {}
    return {str(row.name): int(row.size) for row in rows}


async def _sqlite_stat1(connection: AsyncConnection) -> dict[str, int]:
    """Row estimates ANALYZE left in ``sqlite_stat1`` (first number of ``stat``), if any."""
    exists = await connection.scalar(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'")
    )
    if exists is None:
        return {}
    rows = await connection.execute(text("SELECT tbl, stat FROM sqlite_stat1 WHERE idx IS NULL"))
    estimates = {str(row.tbl): int(str(row.stat).split()[0]) for row in rows}
    rows = await connection.execute(text("SELECT tbl, stat FROM sqlite_stat1"))
    for row in rows:
        estimates.setdefault(str(row.tbl), int(str(row.stat).split()[0]))
    return estimates
