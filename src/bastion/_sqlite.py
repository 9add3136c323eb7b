"""SQLite connection setup: WAL, foreign keys, busy timeout and write-lock-first transactions.

Python's sqlite3 module, left to itself, opens a *deferred* transaction before the first
write; two such transactions that both read and then write deadlock and one fails at once
with "database is locked", whatever ``busy_timeout`` says. So Bastion switches the driver's
own transaction handling off and emits the BEGIN itself: ``BEGIN IMMEDIATE`` for units that may
write (the write lock is taken up front, so other writers *wait* up to ``busy_timeout``), and
no BEGIN at all for read units (each statement is its own consistent read). This is the
recipe from SQLAlchemy's SQLite dialect documentation.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

__all__ = ["UNIT_OPTION", "install_sqlite_listeners"]

# Execution option naming the kind of unit a connection serves.
UNIT_OPTION: Final = "bastion_unit"
READ_UNIT: Final = "read"
SNAPSHOT_UNIT: Final = "snapshot"


def install_sqlite_listeners(
    engine: Engine, *, busy_timeout_ms: int, memory: bool, query_only: bool
) -> None:
    """Configure every new connection of ``engine`` and take over its BEGIN statements.

    ``query_only`` makes SQLite itself refuse any write on the engine's connections.
    """

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
        # None: the driver never emits BEGIN/COMMIT on its own; see the module docstring.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if query_only:
                cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        unit = connection.get_execution_options().get(UNIT_OPTION)
        if unit == READ_UNIT:
            return
        connection.exec_driver_sql("BEGIN" if unit == SNAPSHOT_UNIT else "BEGIN IMMEDIATE")
