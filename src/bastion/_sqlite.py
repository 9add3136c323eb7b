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

import time
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util import await_

__all__ = ["UNIT_OPTION", "install_sqlite_listeners"]

# Execution option naming the kind of unit a connection serves.
UNIT_OPTION: Final = "bastion_unit"
READ_UNIT: Final = "read"
SNAPSHOT_UNIT: Final = "snapshot"


# SQLite calls the progress handler every this many virtual-machine steps: often enough to stop
# a statement within a millisecond or so of its deadline, rarely enough to cost nothing.
_PROGRESS_STEPS: Final = 10_000
_DEADLINE: Final = "bastion_deadline"


def install_sqlite_listeners(
    engine: Engine,
    *,
    busy_timeout_ms: int,
    statement_timeout_s: float,
    memory: bool,
    query_only: bool,
) -> None:
    """Configure every new connection of ``engine`` and take over its BEGIN statements.

    ``query_only`` makes SQLite itself refuse any write on the engine's connections.
    ``statement_timeout_s`` (> 0) interrupts a statement that runs longer: it fails with
    ``SQLITE_INTERRUPT``, which Bastion reports as a statement timeout.
    """

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, record: Any) -> None:
        if statement_timeout_s > 0:
            _install_deadline(dbapi_connection, record)
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

    if statement_timeout_s > 0:

        @event.listens_for(engine, "before_cursor_execute")
        def _start_clock(connection: Connection, *_args: Any) -> None:
            deadline = connection.connection.info.get(_DEADLINE)
            if deadline is not None:
                deadline[0] = time.monotonic() + statement_timeout_s


def _install_deadline(dbapi_connection: Any, record: Any) -> None:
    """Abort any statement on this connection that runs past the deadline set before it."""
    # One mutable cell per connection: set in the event loop before each statement, read by
    # SQLite's progress handler in aiosqlite's thread while the statement runs.
    deadline = [float("inf")]
    record.info[_DEADLINE] = deadline

    def past_deadline() -> bool:
        return time.monotonic() > deadline[0]

    # In aiosqlite's thread (an in-memory connection may only be touched there); this runs
    # inside SQLAlchemy's greenlet, hence await_.
    await_(dbapi_connection.driver_connection.set_progress_handler(past_deadline, _PROGRESS_STEPS))
