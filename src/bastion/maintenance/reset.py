"""Reset: delete every row of every user table, keeping the schema. Destructive.

It runs only when confirmed with the database's own name (the file name on SQLite, e.g.
``app.db``; the database name on PostgreSQL), so a command pointed at the wrong database by
a stray ``DATABASE_URL`` refuses instead of emptying it. ``alembic_version`` is kept, so the
schema stays at its revision. All tables are emptied in one transaction: all or nothing.
On PostgreSQL the tables are truncated and their identity / serial sequences restart at 1.
"""

from __future__ import annotations

from pathlib import PurePath

from sqlalchemy import Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.errors import ConfirmationRequiredError
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["database_name", "reset_database"]


def database_name(database: Database) -> str:
    """The name :func:`reset_database` wants as confirmation: file name or database name."""
    url = database.settings.url
    name = url.database or ""
    return PurePath(name).name if database.backend == "sqlite" else name


async def reset_database(database: Database, *, confirm: str | None) -> dict[str, int]:
    """Delete all rows of every user table (children first); returns rows deleted per table.

    Raises:
        ConfirmationRequiredError: ``confirm`` is not the database's name (see
            :func:`database_name`).
        BastionError: a translated driver error; nothing was deleted.
    """
    expected = database_name(database)
    if not expected or confirm != expected:
        raise ConfirmationRequiredError(
            f"reset deletes every row: confirm with the database name {expected!r}"
        )
    async with database.write_connection() as connection:
        return await delete_all_rows(connection)


async def delete_all_rows(connection: AsyncConnection) -> dict[str, int]:
    """Delete every row of every user table on ``connection``; returns the rows per table.

    Runs in the connection's transaction. SQLite deletes children before parents;
    PostgreSQL counts, then empties all tables with one ``TRUNCATE`` (fast on big tables,
    transactional, but it locks the tables exclusively until the transaction ends) and
    restarts their sequences.
    """
    metadata = await reflect_tables(connection)
    tables = user_tables(metadata)
    counts: dict[str, int] = {}
    if connection.dialect.name == "postgresql":
        for table in reversed(tables):
            counts[table.name] = await _count(connection, table)
        if tables:
            preparer = connection.dialect.identifier_preparer
            names = ", ".join(preparer.format_table(table) for table in tables)
            await connection.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
        return counts
    for table in reversed(tables):
        counts[table.name] = int((await connection.execute(delete(table))).rowcount)
    return counts


async def _count(connection: AsyncConnection, table: Table) -> int:
    return int(await connection.scalar(select(func.count()).select_from(table)) or 0)
