"""Cleanup: purge rows soft-deleted (``deleted_at`` set) more than N days ago.

Every user table with a ``deleted_at`` timestamp column takes part, children before
parents. Rows go in batches, each batch its own short write transaction (re-run if it meets a
conflict), so a purge of millions of rows never holds a lock for long. Rows of other tables
that refer to a purged row go with it by their foreign key's ``ON DELETE CASCADE`` (in the
reference schema: a conversation's messages and their sources); they are not counted.

>>> await purge_soft_deleted(db, days_old=30, dry_run=True)  # doctest: +SKIP
{'conversations': 12}
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Column, DateTime, Table, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.codec import decode_value
from bastion.maintenance.tables import reflect_tables, user_tables
from bastion.types import utcnow

__all__ = ["SOFT_DELETE_COLUMN", "purge_soft_deleted"]

SOFT_DELETE_COLUMN: Final = "deleted_at"
BATCH_ROWS: Final = 1000


async def purge_soft_deleted(
    database: Database,
    days_old: int,
    *,
    tables: Sequence[str] | None = None,
    dry_run: bool = False,
    batch_size: int = BATCH_ROWS,
    now: datetime | None = None,
) -> dict[str, int]:
    """Delete rows whose ``deleted_at`` is more than ``days_old`` days before ``now``.

    Returns the rows deleted (with ``dry_run``: that would be deleted) per table, for every
    table that has a ``deleted_at`` column (0 when none qualified).

    Raises:
        ValueError: ``days_old`` < 0 or ``batch_size`` < 1.
        UnknownTableError: a name in ``tables`` is not a user table.
        BastionError: a translated driver error; batches committed before it stay deleted.
    """
    if days_old < 0:
        raise ValueError(f"days_old must be 0 or more, got {days_old}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    cutoff = (now or utcnow()) - timedelta(days=days_old)
    async with database.read_connection() as connection:
        metadata = await reflect_tables(connection)
    candidates = [
        table
        for table in reversed(user_tables(metadata, tables))
        if SOFT_DELETE_COLUMN in table.columns
        and isinstance(table.columns[SOFT_DELETE_COLUMN].type, DateTime)
    ]
    counts: dict[str, int] = {}
    for table in candidates:
        column = table.columns[SOFT_DELETE_COLUMN]
        bound = decode_value(cutoff.isoformat(), column.type, database.backend)
        if dry_run:
            counts[table.name] = await _count_old(database, table, column, bound)
        else:
            counts[table.name] = await _delete_old(database, table, column, bound, batch_size)
    return counts


async def _count_old(database: Database, table: Table, column: Column[Any], cutoff: Any) -> int:
    async with database.read_connection() as connection:
        statement = select(func.count()).select_from(table).where(column < cutoff)
        return int(await connection.scalar(statement) or 0)


async def _delete_old(
    database: Database, table: Table, column: Column[Any], cutoff: Any, batch_size: int
) -> int:
    key = list(table.primary_key.columns)
    if not key:
        # No key to pick a batch by: one statement (rare for a table with soft deletes).
        async def delete_all(connection: AsyncConnection) -> int:
            result = await connection.execute(delete(table).where(column < cutoff))
            return int(result.rowcount)

        return await database.run(database.write_connection, delete_all)

    batch = select(*key).where(column < cutoff).limit(batch_size)
    target = key[0] if len(key) == 1 else tuple_(*key)
    statement = delete(table).where(target.in_(batch.scalar_subquery() if len(key) == 1 else batch))

    async def delete_batch(connection: AsyncConnection) -> int:
        return int((await connection.execute(statement)).rowcount)

    deleted = 0
    while True:
        count = await database.run(database.write_connection, delete_batch)
        deleted += count
        if count < batch_size:
            return deleted
