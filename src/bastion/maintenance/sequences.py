"""PostgreSQL sequences behind identity / serial columns, moved past the rows a table holds.

Rows written with explicit ids (an import) leave the sequence where it was, and the next
ordinary INSERT would collide with an imported id; rows deleted (a reset) leave it high.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table, cast, func, literal, select, text
from sqlalchemy.dialects.postgresql import REGCLASS
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["sync_sequences"]


async def sync_sequences(connection: AsyncConnection, tables: Sequence[Table]) -> list[str]:
    """Set each sequence owned by a column of ``tables`` to continue after ``max(column)``.

    A sequence of an empty table restarts at 1. Does nothing on SQLite, whose
    ``INTEGER PRIMARY KEY`` already continues after the largest rowid. Returns the
    sequences set.
    """
    if connection.dialect.name != "postgresql":
        return []
    preparer = connection.dialect.identifier_preparer
    done = []
    for table in tables:
        for column in table.columns:
            sequence = await connection.scalar(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": preparer.format_table(table), "column": column.name},
            )
            if sequence is None:
                continue
            next_value = func.coalesce(func.max(column), 0) + 1
            await connection.execute(
                select(func.setval(cast(literal(sequence), REGCLASS), next_value, False))
            )
            done.append(str(sequence))
    return done
