"""Optimize: refresh the planner's statistics and reclaim space.

* SQLite: ``PRAGMA optimize`` and ``ANALYZE``; with ``vacuum=True`` also ``VACUUM``, which
  rewrites the whole file (needs free disk space about the file's size, and holds the write
  lock while it runs).
* PostgreSQL: ``VACUUM (ANALYZE)`` of each user table, outside a transaction (as VACUUM
  requires); with ``vacuum=True`` ``VACUUM (FULL, ANALYZE)``, which rewrites each table under
  an exclusive lock.

>>> result = await optimize(db)  # doctest: +SKIP
>>> result.statements  # doctest: +SKIP
['VACUUM (ANALYZE) "users"', ...]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bastion.database import Database
from bastion.maintenance._autocommit import autocommit_connection
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["OptimizeResult", "optimize"]


@dataclass(frozen=True, slots=True)
class OptimizeResult:
    """What :func:`optimize` ran, and how long it took in all."""

    backend: str
    statements: list[str]
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def optimize(
    database: Database, *, vacuum: bool = False, tables: Sequence[str] | None = None
) -> OptimizeResult:
    """Analyze (and with ``vacuum``, rewrite) the database; see the module docstring.

    ``tables`` narrows the work on PostgreSQL; SQLite's statements cover the whole file.

    Raises:
        UnknownTableError: a name in ``tables`` is not a user table.
        BastionError: a translated driver error (for instance a busy SQLite file).
    """
    started = time.perf_counter()
    statements: list[str] = []
    async with autocommit_connection(database) as connection:
        metadata = await reflect_tables(connection)
        selected = user_tables(metadata, tables)  # names checked on every backend
        if database.backend == "sqlite":
            statements += ["PRAGMA optimize", "ANALYZE"] + (["VACUUM"] if vacuum else [])
        else:
            preparer = connection.dialect.identifier_preparer
            options = "FULL, ANALYZE" if vacuum else "ANALYZE"
            statements += [
                f"VACUUM ({options}) {preparer.format_table(table)}" for table in selected
            ]
        for statement in statements:
            await connection.exec_driver_sql(statement)
    return OptimizeResult(database.backend, statements, time.perf_counter() - started)
