"""A write unit's BEGIN and COMMIT, awaited on the driver directly: no greenlet per unit.

SQLAlchemy's asyncio extension runs ``AsyncConnection.begin()`` and ``commit()`` as its sync
``Connection``'s, each in a greenlet of its own (``greenlet_spawn``), because a listener or the
dialect may await the driver there. Spawning a greenlet and switching to it and back costs
15 to 35 µs of CPU here, and those two were the only greenlets left on the reference service's
requests: a read request spawns none (:mod:`bastion._lean`), a write request spawned two. An
empty ``Database.write_connection()`` unit on SQLite cost about 270 µs of CPU with them and
about 170 µs without (``bench/README.md``, finding 45).

When it applies, :func:`begin_write` and :func:`commit_write` do what SQLAlchemy's would:

* **BEGIN.** On SQLite, Bastion's ``begin`` listener sends ``BEGIN IMMEDIATE`` through
  ``await_`` (:mod:`bastion._sqlite`); here it is awaited first (on the event loop, or on
  aiosqlite's thread when another process holds the lock, as
  :mod:`bastion._sqlite_inline_writes` decides), and SQLAlchemy's transaction is then begun
  synchronously, the listener told that BEGIN was sent. On PostgreSQL, SQLAlchemy's begin sends
  nothing (asyncpg's adapter begins at the unit's first statement), so it is simply begun
  synchronously. A failed BEGIN goes through SQLAlchemy's own handler, in a greenlet, as from
  the listener: translated, ``handle_error`` listeners told, the connection invalidated on a
  disconnect or an interruption.
* **COMMIT.** SQLAlchemy's ``commit`` listeners are told, then the driver's COMMIT is awaited
  as the adapter would run it (aiosqlite's on its thread; asyncpg's on the adapter's
  transaction, which is then discarded), and SQLAlchemy's transaction ends as
  ``RootTransaction`` ends it after a COMMIT. A failed COMMIT (a cancellation included) goes
  through SQLAlchemy's handler in a greenlet, and the transaction is left inactive but current,
  as after SQLAlchemy's own failed commit, so the unit's close still rolls it back.

Either steps aside, and SQLAlchemy's ``begin()`` or ``commit()`` runs, for anything else: a
connection that is not a write unit's :class:`~bastion._lean.LeanConnection`, one that is
closed, invalidated, echoing, with listeners of its own or engine listeners other than
Bastion's (``begin``, ``commit`` and the statement events), a transaction context manager,
a savepoint open, and on SQLite a driver connection that is not Bastion's inline-writing one
(an in-memory database) or that has a call on its thread or a transaction already open.

SQLAlchemy internals used: ``Connection._transaction``, ``_nested_transaction``,
``_trans_context_manager``, ``_has_events``, ``_echo``, ``_handle_dbapi_exception``, the engine's
``_has_events`` and ``dispatch``, ``RootTransaction._deactivate_from_connection`` and the
adapters' ``_handle_exception``, ``_transaction`` and ``_call_and_discard``.
``tests/integration/test_lean_transactions.py`` compares both paths' outcomes, so an upgrade
that changes them fails there first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

from sqlalchemy.util import greenlet_spawn

from bastion._lean import LeanConnection, plain_connection
from bastion._sqlite_inline_writes import BEGIN_WRITE, InlineWrites

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["begin_write", "commit_write", "raise_as_sqlalchemy"]


async def begin_write(connection: AsyncConnection) -> None:
    """Begin ``connection``'s transaction, as ``await connection.begin()`` does.

    Raises:
        The same as ``AsyncConnection.begin`` (SQLAlchemy's exception classes).
    """
    sync = _lean_sync(connection)
    if sync is None or sync._transaction is not None or sync._nested_transaction is not None:
        await connection.begin()
        return
    adapted = sync.connection.dbapi_connection
    driver = _DRIVERS.get(sync.dialect.driver)
    if driver is None or not driver.may_begin(adapted):
        await connection.begin()
        return
    await _driver_call(sync, adapted, driver.begin, driver.begin_statement)
    driver.begun(adapted, True)
    try:
        sync.begin()
    finally:
        driver.begun(adapted, False)


async def commit_write(connection: AsyncConnection) -> None:
    """Commit ``connection``'s transaction, as ``await connection.commit()`` does.

    Raises:
        The same as ``AsyncConnection.commit`` (SQLAlchemy's exception classes).
    """
    sync = _lean_sync(connection)
    transaction = None if sync is None else sync._transaction
    adapted = None if sync is None else sync.connection.dbapi_connection
    driver = None if sync is None else _DRIVERS.get(sync.dialect.driver)
    if (
        sync is None
        or transaction is None
        or not transaction.is_active
        or sync._nested_transaction is not None
        or driver is None
        or not driver.may_commit(adapted)
    ):
        await connection.commit()
        return
    engine = sync.engine
    if engine._has_events:  # as Connection._commit_impl (the connection has none of its own)
        engine.dispatch.commit(sync)
    try:
        await _driver_call(sync, adapted, driver.commit, None)
    finally:
        # As RootTransaction._do_commit, whether or not COMMIT succeeded: the transaction is
        # made inactive, and stays the connection's current one only if COMMIT failed, so
        # that a rollback still occurs.
        transaction._deactivate_from_connection()
    sync._transaction = None


def _lean_sync(connection: AsyncConnection) -> Connection | None:
    """``connection``'s sync ``Connection`` if the lean path may run its BEGIN and COMMIT."""
    if not isinstance(connection, LeanConnection) or not connection._bastion_writes:
        return None
    sync = connection.sync_connection
    if (
        sync is None
        or not plain_connection(sync)
        or sync._trans_context_manager is not None
        or sync._dbapi_connection is None
        or not connection._bastion_control_listeners_unchanged(sync)
    ):
        return None
    return sync


async def _driver_call(
    sync: Connection,
    adapted: Any,
    call: Callable[[Any], Awaitable[None]],
    statement: str | None,
) -> None:
    """Await ``call(adapted)``; a failure is raised as SQLAlchemy raises a driver's error
    (see :func:`raise_as_sqlalchemy`)."""
    try:
        await call(adapted)
    except BaseException as error:
        await greenlet_spawn(raise_as_sqlalchemy, sync, adapted, error, statement)
        raise  # not reached: the call above always raises


def raise_as_sqlalchemy(
    sync: Connection, adapted: Any, error: BaseException, statement: str | None
) -> NoReturn:
    """Raise ``error``, met in a BEGIN or COMMIT sent to the driver directly, as SQLAlchemy's
    begin or commit would: made DBAPI-shaped by the adapter, then through
    ``Connection._handle_dbapi_exception`` (translation, ``handle_error`` listeners,
    invalidation on a disconnect or an interruption). Also used by Bastion's ``begin`` listener
    (:mod:`bastion._sqlite`).

    Call it in a greenlet (invalidating a connection closes it, which may await) and inside an
    ``except`` block, where SQLAlchemy's handler finds the exception to re-raise. With the
    statement, SQLAlchemy wraps even a non-DBAPI error as a ``StatementError``; only a DBAPI
    error carries it, as ``exec_driver_sql`` raised those.
    """
    try:
        if isinstance(error, Exception):
            adapted._handle_exception(error)  # raises the DBAPI-shaped error
        raise error
    except BaseException as raised:
        is_dbapi_error = isinstance(raised, sync.dialect.loaded_dbapi.Error)
        sync._handle_dbapi_exception(
            raised, statement if is_dbapi_error else None, () if statement else None, None, None
        )
        raise


@dataclass(frozen=True, slots=True)
class _Driver:
    """How one driver's write units begin and commit on the lean path."""

    may_begin: Callable[[Any], bool]
    begin: Callable[[Any], Awaitable[None]]
    begin_statement: str | None
    begun: Callable[[Any, bool], None]
    may_commit: Callable[[Any], bool]
    commit: Callable[[Any], Awaitable[None]]


# -- SQLite (aiosqlite, Bastion's inline-writing connections) ------------------------------------


def _inline_writes(adapted: Any) -> InlineWrites | None:
    driver = getattr(adapted, "_connection", None)
    return driver if isinstance(driver, InlineWrites) and driver.bastion_ready() else None


def _sqlite_may_begin(adapted: Any) -> bool:
    driver = _inline_writes(adapted)
    return driver is not None and not driver._connection.in_transaction  # type: ignore[attr-defined]


async def _sqlite_begin(adapted: Any) -> None:
    driver = adapted._connection
    # The call Bastion's begin listener makes (bastion._sqlite's _send_begin), awaited here.
    await driver._execute(driver._conn.execute, BEGIN_WRITE)


def _sqlite_begun(adapted: Any, begun: bool) -> None:
    adapted._connection.bastion_begun = begun


def _sqlite_may_commit(adapted: Any) -> bool:
    # A call on the thread (a cancelled statement's) is still SQLAlchemy's to wait for.
    return _inline_writes(adapted) is not None


async def _sqlite_commit(adapted: Any) -> None:
    await adapted._connection.commit()  # as the adapter's commit(): on aiosqlite's thread


# -- PostgreSQL (asyncpg) ------------------------------------------------------------------------


def _asyncpg_may(_adapted: Any) -> bool:
    return True


async def _asyncpg_begin(_adapted: Any) -> None:
    pass  # SQLAlchemy's begin sends nothing: the adapter begins at the first statement


def _asyncpg_begun(_adapted: Any, _begun: bool) -> None:
    pass


async def _asyncpg_commit(adapted: Any) -> None:
    # As the adapter's commit(): the transaction it began at the first statement (none if the
    # unit ran nothing, or under AUTOCOMMIT), discarded whether or not COMMIT succeeds.
    if adapted._transaction is not None:
        await adapted._call_and_discard(adapted._transaction.commit)


_DRIVERS: Final[dict[str, _Driver]] = {
    "aiosqlite": _Driver(
        may_begin=_sqlite_may_begin,
        begin=_sqlite_begin,
        begin_statement=BEGIN_WRITE,
        begun=_sqlite_begun,
        may_commit=_sqlite_may_commit,
        commit=_sqlite_commit,
    ),
    "asyncpg": _Driver(
        may_begin=_asyncpg_may,
        begin=_asyncpg_begin,
        begin_statement=None,
        begun=_asyncpg_begun,
        may_commit=_asyncpg_may,
        commit=_asyncpg_commit,
    ),
}
