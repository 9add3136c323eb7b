"""The user tables of a database, reflected, in foreign-key order.

Every maintenance operation works from what the database *is* (reflection), not from an
application's models, so it serves any schema. ``alembic_version`` is left out: it records the
schema, not user data, and export / digests carry the revision separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.maintenance.errors import UnknownTableError

__all__ = ["SCHEMA_TABLES", "reflect_tables", "user_tables"]

SCHEMA_TABLES: Final = frozenset({"alembic_version"})
"""Tables that describe the schema rather than hold data; never digested, exported or reset."""


async def reflect_tables(connection: AsyncConnection) -> MetaData:
    """Reflect every table of the connection's default schema (one catalog read)."""
    metadata = MetaData()
    await connection.run_sync(lambda sync_connection: metadata.reflect(sync_connection))
    return metadata


def user_tables(metadata: MetaData, names: Sequence[str] | None = None) -> list[Table]:
    """The user tables of ``metadata``, parents before children (foreign-key order).

    ``names`` narrows the list (the order stays foreign-key order).

    Raises:
        UnknownTableError: a name in ``names`` is not a user table of the database.
    """
    tables = [table for table in metadata.sorted_tables if table.name not in SCHEMA_TABLES]
    if names is None:
        return tables
    known = {table.name for table in tables}
    unknown = sorted(set(names) - known)
    if unknown:
        raise UnknownTableError(
            f"no such table: {', '.join(unknown)} (tables: {', '.join(sorted(known)) or 'none'})"
        )
    wanted = set(names)
    return [table for table in tables if table.name in wanted]
