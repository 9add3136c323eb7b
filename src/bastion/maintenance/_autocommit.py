"""A connection outside any transaction, for statements that refuse to run inside one.

``VACUUM`` (both backends) cannot run in a transaction block; Bastion's write units always
open one (``BEGIN IMMEDIATE`` on SQLite). Driver errors leave translated, as from a unit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._sqlite import READ_UNIT, UNIT_OPTION
from bastion._translate import translate_error
from bastion.database import Database

__all__ = ["autocommit_connection"]


@asynccontextmanager
async def autocommit_connection(database: Database) -> AsyncIterator[AsyncConnection]:
    """A connection of the write engine on which every statement commits by itself.

    Raises:
        DatabaseStateError: the Database is not running.
        BastionError: a translated driver error.
    """
    try:
        async with database.engine.connect() as connection:
            if database.backend == "sqlite":
                # Bastion's SQLite listener emits no BEGIN for a read unit; the driver's own
                # transaction handling is off, so each statement is its own transaction.
                yield await connection.execution_options(**{UNIT_OPTION: READ_UNIT})
            else:
                yield await connection.execution_options(isolation_level="AUTOCOMMIT")
    except Exception as exc:
        translated = translate_error(exc)
        if translated is None or translated is exc:
            raise
        raise translated from exc
