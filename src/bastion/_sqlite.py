"""SQLite connection setup: WAL, foreign keys, busy timeout and write-lock-first transactions.

Python's sqlite3 module, left to itself, opens a *deferred* transaction before the first
write; two such transactions that both read and then write deadlock and one fails at once
with "database is locked", whatever ``busy_timeout`` says. So Bastion switches the driver's
own transaction handling off and emits the BEGIN itself: ``BEGIN IMMEDIATE`` for units that may
write (the write lock is taken up front, so other writers *wait* up to ``busy_timeout``), and
no BEGIN at all for read units (each statement is its own consistent read). This is the
recipe from SQLAlchemy's SQLite dialect documentation.

A connection discarded mid-statement (a cancelled unit's) must let go of the file at once; see
:class:`_ClosingConnection` and :class:`_StopOnce` for the two ways it otherwise would not.
"""

from __future__ import annotations

import sqlite3
import time
import weakref
from contextlib import suppress
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.util import await_

from bastion._lean_transactions import raise_as_sqlalchemy
from bastion._sqlite_inline import InlineAdaptedConnection, InlineReads, inline_driver_class
from bastion._sqlite_inline_writes import BEGIN_WRITE, InlineWrites

__all__ = ["UNIT_OPTION", "install_sqlite_listeners", "sqlite_connect_args"]

# Execution option naming the kind of unit a connection serves.
UNIT_OPTION: Final = "bastion_unit"
READ_UNIT: Final = "read"
SNAPSHOT_UNIT: Final = "snapshot"


# SQLite calls the progress handler every this many virtual-machine steps: often enough to stop
# a statement within a millisecond or so of its deadline, rarely enough to cost nothing.
_PROGRESS_STEPS: Final = 10_000
_DEADLINE: Final = "bastion_deadline"
_NO_DEADLINE: Final = float("inf")


class _ClosingConnection(sqlite3.Connection):
    """A sqlite3 connection that resets its cursors' statements before it closes.

    Since Python 3.11, ``sqlite3.Connection.close()`` no longer finalizes the statements of
    cursors still alive (3.10 did; CPython issue #135117); ``sqlite3_close_v2`` then leaves a
    "zombie" handle whose transaction, or the read snapshot of an unfinished SELECT, lasts
    until the last such cursor is freed. A unit cancelled mid-statement leaves exactly that:
    its connection is invalidated and closed, but the statement's cursor stays referenced from
    the CancelledError's traceback (a reference cycle through SQLAlchemy's frames, freed only
    by the cyclic garbage collector), so the write lock or the snapshot outlived the unit.
    Resetting every live cursor first makes ``close()`` release the file there and then.
    ``close()`` runs in aiosqlite's thread after whatever statement was running, so nothing
    races with it. (A ROLLBACK would not do: it cannot end a pending SELECT's snapshot.)

    Normal-path cost: one weak reference per cursor, about 1 µs per statement.
    """

    bastion_deadline: list[float] | None = None
    """The statement deadline cell of :func:`_install_deadline`, if it installed one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cursors: weakref.WeakSet[sqlite3.Cursor] = weakref.WeakSet()

    # COMMIT and ROLLBACK are transaction control, not statements: the statement timeout does
    # not apply to them, nor to the BEGIN of the connection's next unit (the pool's reset on
    # return rolls back, so a connection rests with no deadline). Left in place, the last
    # statement's deadline would: SQLite calls the progress handler every so many steps
    # summed over runs of a cached statement, so now and then inside a BEGIN or COMMIT, and
    # one that came over DB_STATEMENT_TIMEOUT after that statement was interrupted.
    def commit(self) -> None:
        _lift_deadline(self.bastion_deadline)
        super().commit()

    def rollback(self) -> None:
        _lift_deadline(self.bastion_deadline)
        super().rollback()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "factory" not in kwargs:
            kwargs["factory"] = _Cursor
        cursor = super().cursor(*args, **kwargs)
        self._cursors.add(cursor)
        return cursor

    # The C shortcuts create their cursors without calling cursor(): route them through it.
    def execute(self, *args: Any) -> sqlite3.Cursor:
        return self.cursor().execute(*args)  # type: ignore[no-any-return]

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        return self.cursor().executemany(*args)  # type: ignore[no-any-return]

    def executescript(self, *args: Any) -> sqlite3.Cursor:
        return self.cursor().executescript(*args)  # type: ignore[no-any-return]

    def close_cursors(self) -> None:
        """Close every live cursor: ends the read snapshot of any unfinished SELECT."""
        for cursor in list(self._cursors):
            with suppress(sqlite3.Error):  # releasing the file matters more
                cursor.close()

    def close(self) -> None:
        self.close_cursors()
        super().close()


class _Cursor(sqlite3.Cursor):
    """A cursor that can carry attributes (:class:`InlineReads` notes its statement on it) and
    leaves its connection's set of live cursors when it is closed.

    A closed cursor can hold no statement, but it can stay alive for long: aiosqlite's worker
    thread keeps a reference to the last call it ran (a cursor's ``close``, typically) until
    it is given the next, which with statements on the event loop may be never. Left in the
    set, it made every return to the pool close cursors again (a greenlet switch per unit).
    """

    def close(self) -> None:
        super().close()
        cursors = getattr(self.connection, "_cursors", None)
        if cursors is not None:
            cursors.discard(self)


class _StopOnce:
    """Mixed into aiosqlite's connection class: ``stop()`` may be called more than once.

    When a unit is cancelled, SQLAlchemy closes its invalidated connection in a shielded task
    (aiosqlite's ``close()``, which ends with ``stop()``); if the cancellation is delivered
    again — as anyio's cancel scopes do at every await — SQLAlchemy also calls ``stop()``
    itself. aiosqlite's worker thread exits after the first stop, so the second one queues
    work nobody runs and the graceful-close task waits forever, holding the connection ("Task
    was destroyed but it is pending!"). Here every later call returns the first call's future,
    which the thread does resolve.
    """

    _bastion_stopping: tuple[Any] | None = None

    def stop(self) -> Any:
        if self._bastion_stopping is None:
            self._bastion_stopping = (super().stop(),)  # type: ignore[misc]
        return self._bastion_stopping[0]


def _adopt_driver_connection(*mixins: type) -> Any:
    """A ``connect`` listener giving each new aiosqlite connection ``mixins`` in front of its class.

    aiosqlite builds its connection objects itself, so the object switches to a subclass of its
    own class that only adds the mixins' methods: :class:`_StopOnce` everywhere, and
    :class:`InlineReads` on the read pool. aiosqlite < 0.22 has no ``stop()``; SQLAlchemy never
    force-stops its connections there, so the class is left alone.
    """

    def adopt(dbapi_connection: Any, _record: Any) -> None:
        driver_connection = dbapi_connection.driver_connection
        driver_class: type = type(driver_connection)
        if not hasattr(driver_class, "stop") or issubclass(driver_class, _StopOnce):
            return
        driver_connection.__class__ = inline_driver_class(driver_class, *mixins)
        if InlineReads in mixins and type(dbapi_connection) is AsyncAdapt_aiosqlite_connection:
            dbapi_connection.__class__ = InlineAdaptedConnection

    return adopt


def sqlite_connect_args() -> dict[str, Any]:
    """The driver arguments of Bastion's SQLite engines (see :class:`_ClosingConnection`).

    ``check_same_thread=False``: the read pool's calls run on the event loop as well as on
    aiosqlite's thread, one at a time (see :mod:`bastion._sqlite_inline`).
    """
    return {"factory": _ClosingConnection, "check_same_thread": False}


def install_sqlite_listeners(
    engine: Engine,
    *,
    busy_timeout_ms: int,
    statement_timeout_s: float,
    memory: bool,
    query_only: bool,
) -> None:
    """Configure every new connection of ``engine`` and take over its BEGIN statements.

    ``query_only`` makes SQLite itself refuse any write on the engine's connections, and lets
    their calls run on the event loop (:class:`InlineReads`) unless ``memory``.
    ``statement_timeout_s`` (> 0) interrupts a statement that runs longer: it fails with
    ``SQLITE_INTERRUPT``, which Bastion reports as a statement timeout.
    """

    # insert=True: ahead of the dialect's own "connect" listeners, whose awaits on the driver
    # a cancellation can already interrupt (SQLAlchemy then terminates the connection).
    # Reads run on the event loop (query_only pool), and so do a write transaction's statements
    # once known fast; see bastion._sqlite_inline and bastion._sqlite_inline_writes. Not for an
    # in-memory database, whose one connection serves both kinds of unit.
    inline = query_only and not memory
    inline_writes = not query_only and not memory
    mixins: tuple[type, ...] = (_StopOnce,)
    if inline:
        mixins = (_StopOnce, InlineReads)
    elif inline_writes:
        mixins = (_StopOnce, InlineWrites)
    event.listen(engine, "connect", _adopt_driver_connection(*mixins), insert=True)

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, record: Any) -> None:
        deadline = (
            _install_deadline(dbapi_connection, record)
            if statement_timeout_s > 0 or inline
            else [_NO_DEADLINE, _NO_DEADLINE]
        )
        # None: the driver never emits BEGIN/COMMIT on its own; see the module docstring.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # An inline read must fail at once rather than wait on the loop; see InlineReads.
            cursor.execute(f"PRAGMA busy_timeout={0 if inline else int(busy_timeout_ms)}")
            if query_only:
                cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()
        if inline or inline_writes:
            driver_connection = dbapi_connection.driver_connection
            driver_connection._bastion_busy_timeout_ms = busy_timeout_ms
            driver_connection._bastion_deadline = deadline  # last: from here calls may go inline

    @event.listens_for(engine, "reset")
    def _release_snapshots(dbapi_connection: Any, _record: Any, state: Any) -> None:
        # A unit that stopped reading a streamed result half-way (cancelled between two fetches,
        # or it simply broke off) leaves its statement pending, and with it a read snapshot that
        # blocks checkpoints; the ROLLBACK that follows cannot end it. Close such cursors before
        # the connection goes back to the pool. (Outside the event loop's greenlet, SQLAlchemy
        # is discarding the connection anyway.)
        driver_connection = dbapi_connection.driver_connection
        sqlite_connection = getattr(driver_connection, "_connection", None)
        if (
            state.asyncio_safe
            and isinstance(sqlite_connection, _ClosingConnection)
            and sqlite_connection._cursors
        ):
            await_(driver_connection._execute(sqlite_connection.close_cursors))

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        unit = connection.get_execution_options().get(UNIT_OPTION)
        if unit == READ_UNIT or _begun_already(connection):
            return
        _send_begin(connection, "BEGIN" if unit == SNAPSHOT_UNIT else BEGIN_WRITE)

    if statement_timeout_s > 0:

        @event.listens_for(engine, "before_cursor_execute")
        def _start_clock(connection: Connection, *_args: Any) -> None:
            deadline = connection.connection.info.get(_DEADLINE)
            if deadline is not None:
                deadline[0] = time.monotonic() + statement_timeout_s


def _begun_already(connection: Connection) -> bool:
    """Whether ``BEGIN IMMEDIATE`` was sent before SQLAlchemy's transaction began
    (:mod:`bastion._lean_transactions`)."""
    adapted = connection.connection.dbapi_connection
    return getattr(getattr(adapted, "driver_connection", None), "bastion_begun", False) is True


def _send_begin(connection: Connection, sql: str) -> None:
    """Send ``sql`` (a BEGIN) straight to the driver, its errors raised as ``execute``'s.

    ``exec_driver_sql`` would build an execution context, a cursor and a result for a statement
    that returns nothing: 4.6 % of the reference service's SQLite ``create_message``, in
    instructions (``bench/README.md``, finding 20). The driver call is all it needs
    (``BEGIN IMMEDIATE`` itself runs on the loop or the thread as
    :mod:`bastion._sqlite_inline_writes` decides). Being transaction control, it is not a
    query: statement listeners (metrics, the slow-query log) do not see it, as they do not see
    COMMIT, so a BEGIN IMMEDIATE that waited for another process's write lock no longer shows
    there as a slow statement (``FALLBACKS["busy"]`` counts such waits). A failure, a
    cancellation included, goes through SQLAlchemy's own handler: translated to its exception
    classes, ``handle_error`` listeners told, the connection invalidated on a disconnect or an
    interruption.
    """
    adapted = connection.connection.dbapi_connection
    assert adapted is not None
    driver_connection = adapted.driver_connection
    try:
        await_(driver_connection._execute(driver_connection._conn.execute, sql))
    except BaseException as error:
        raise_as_sqlalchemy(connection, adapted, error, sql)


def _install_deadline(dbapi_connection: Any, record: Any) -> list[float]:
    """Abort any statement on this connection that runs past the deadline set before it.

    Returns the deadline cell: ``[statement deadline in time.monotonic() seconds, inline
    budget's end in time.thread_time() seconds]``. The second is set only while a call runs on
    the event loop (:mod:`bastion._sqlite_inline`); it counts CPU time, so a statement the
    operating system merely preempted is not taken for a slow one.
    """
    # One mutable cell per connection: set in the event loop before each statement, read by
    # SQLite's progress handler in aiosqlite's thread while the statement runs.
    deadline = [_NO_DEADLINE, _NO_DEADLINE]
    record.info[_DEADLINE] = deadline
    driver = getattr(dbapi_connection.driver_connection, "_connection", None)
    if isinstance(driver, _ClosingConnection):
        driver.bastion_deadline = deadline

    def past_deadline() -> bool:
        return time.monotonic() > deadline[0] or time.thread_time() > deadline[1]

    # In aiosqlite's thread (an in-memory connection may only be touched there); this runs
    # inside SQLAlchemy's greenlet, hence await_.
    await_(dbapi_connection.driver_connection.set_progress_handler(past_deadline, _PROGRESS_STEPS))
    return deadline


def _lift_deadline(deadline: list[float] | None) -> None:
    """No statement deadline until the next statement sets one (``deadline``: the cell of
    :func:`_install_deadline`, or ``None`` where there is none)."""
    if deadline is not None:
        deadline[0] = _NO_DEADLINE
