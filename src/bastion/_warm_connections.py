"""Units' connections, kept started between units instead of going back to the pool.

Opening and closing a unit's ``AsyncConnection`` through SQLAlchemy's pool costs about 100 µs
of CPU per unit on either backend (``bench/README.md``, findings 43 and 44): two greenlets
spawned and switched to, a ``Connection`` built, the pool's checkout and check-in with their
events, and the reset on return. A point read on the raw driver costs 170 µs in all on
SQLite. Between two units of one kind, on a connection left with no transaction, that work
gives the same answer every time: the next unit can use the same connection.

:class:`WarmConnections` keeps such connections of one engine, up to the pool's size,
*checked out* and started, and lends them to the next unit: read units' connections
(``Database.read_connection``) on the read engine, write units' (``Database.write_connection``,
once their COMMIT has returned) on the write engine. A connection is kept only when nothing
about it differs from a fresh checkout's:

* no SQLAlchemy transaction (a read unit's statement that took SQLAlchemy's own path began
  one: its rollback is the pool's business), none on the driver, nothing running on it
  (SQLite: no cursor left open and nothing pending on its thread; asyncpg: no operation under
  way, and the isolation its engine gives: AUTOCOMMIT for reads, transactions for writes);
* not closed, not invalidated, no listener or execution option of its own;
* still of the engine's current pool (``engine.dispose()``, after a restore, makes a new one);
* the pool not past its size (after a burst it must see connections come back, to close
  those beyond its size), and fewer kept than its size (one fewer with no overflow, so that
  a checkout that passes no gate, an application's own ``engine.connect()``, finds one);
* no pool listener (checkout, check-in, reset) nor ``engine_connect`` listener added since the
  keeping began: a kept connection skips those events, which an application's listener may
  rely on;
* the Database still running.

Nothing is kept with ``DB_POOL_PRE_PING`` (a kept connection would skip the ping) or in
PgBouncer mode (its read units run in transactions, and a kept connection would hold a client
slot of PgBouncer's between units).

What the pool's return does that still matters is done here: on SQLite the driver's rollback,
which also lifts the statement deadline (:mod:`bastion._sqlite`); on PostgreSQL, with no
transaction open, the pool's rollback does nothing. When lent again, a connection is checked
as the pool checks it at checkout (recycle age, pool-wide and soft invalidation: after a
disconnect, SQLAlchemy invalidates the whole pool, and kept connections with it), and one
that fails is closed through SQLAlchemy. As with the pool without ``pool_pre_ping``, a
connection the server dropped while it sat idle is found by the next statement on it, which
fails as a disconnect and invalidates the pool (a write unit fails before it wrote anything,
and ``Database.run`` runs it again).

Kept connections are counted inside the pool's size and overflow, so a unit that opens its
connection through the pool instead (an ORM unit, a snapshot) is counted while it runs
(:meth:`WarmConnections.reserve`), and kept ones are closed while the pool could not lend one
to each such unit without waiting. Such a unit still takes its connection at its first
statement, as SQLAlchemy's session does (so ``session.begin()`` and a connection's execution
options in the block work as they do without Bastion, and SQLite's write lock is taken only
then). With no overflow, write units keep nothing: the write engine is also ``db.engine``,
whose own checkouts (health checks, migrations, maintenance) pass no gate and could otherwise
wait for idle kept connections. A kept connection of a pool since disposed (a restore) is
invalidated rather than returned, since its old pool would hold it open, and one whose pool
was disposed while its unit ran is not kept.
The leak detector is told of each loan and return, so a unit holding a kept connection too
long is reported as any other; the pool's status (``Database.pool_status``) counts kept
connections as idle.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._sqlite_inline import InlineReads

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["WarmConnections", "supports"]

logger = logging.getLogger("bastion.database")


class WarmConnections:
    """Started connections of one engine, lent to its units without the pool's round trip.

    ``on_lend(record)`` and ``on_rest(record)`` are told when a kept connection (its pool
    record) is lent to a unit and when it comes back (the leak detector's bookkeeping).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        limit: int,
        *,
        writes: bool = False,
        on_lend: Callable[[Any], None],
        on_rest: Callable[[Any], None],
    ) -> None:
        """Keep up to ``limit`` connections of ``engine`` (a QueuePool's, of a driver
        :func:`supports` names) for its read units, or with ``writes=True`` its write units.

        Raises:
            ValueError: no way to tell whether the driver's connections are reusable.
        """
        driver = _DRIVERS.get((engine.dialect.driver, writes))
        if driver is None:
            raise ValueError(f"connections of the {engine.dialect.driver} driver are not kept")
        self._reusable, self._reset = driver
        self._kind = "write" if writes else "read"
        self._engine = engine
        self._limit = limit
        # The pool's own listeners now (Bastion's): a kept connection skips checkout, check-in
        # and reset, so one added later (an application's) stops the keeping.
        self._pool_listeners = _pool_listener_counts(engine)
        self._on_lend = on_lend
        self._on_rest = on_rest
        self._idle: list[AsyncConnection] = []
        self._open = True
        # Units admitted that take their connection from the pool instead (see reserve()).
        self._reserved = 0

    def __len__(self) -> int:
        """How many connections of the engine's current pool are kept, idle, now (those of a
        pool since disposed are out of the current pool's count already)."""
        pool = self._engine.sync_engine.pool
        return sum(1 for connection in self._idle if _fairy(connection)._pool is pool)

    async def lend(self) -> AsyncConnection | None:
        """A kept connection fit for a unit, or ``None``: open one through the pool.

        A kept connection the pool would not hand out as it is (older than its recycle age,
        invalidated meanwhile) is closed through SQLAlchemy instead, which returns it to its
        pool; one of a pool since disposed (a restore) is invalidated, which closes its driver
        connection, since its old pool would keep it open. If an application has added pool
        listeners since, every kept connection is closed and none is kept from then on.

        A failure to close it is logged (``bastion.database``), not raised: the unit goes on
        with a connection from the pool. (So is one in :meth:`reserve`.)
        """
        if self._idle and _pool_listener_counts(self._engine) != self._pool_listeners:
            while self._idle:
                await self._close_quietly(self._idle.pop())
        while self._idle:
            connection = self._idle.pop()
            if self._fresh(connection):
                self._on_lend(_record(connection))
                _forget_unit_state(connection)
                return connection
            await self._close_quietly(connection)
        return None

    def keep(self, connection: AsyncConnection) -> bool:
        """Keep ``connection``, whose unit ended normally, for the next unit, if it is as a
        fresh checkout would be (see the module docstring); ``False``: close it as usual."""
        pool: Any = self._engine.sync_engine.pool
        if (
            not self._open
            or len(self._idle) >= self._limit
            # Past its size (a burst), the pool must see connections come back to close the
            # ones beyond it; kept ones would hold it there.
            or pool.overflow() > 0
            or _pool_listener_counts(self._engine) != self._pool_listeners
            or not _reusable(connection, self._reusable)
            # Its pool disposed while the unit ran (a restore): it would sit under newer
            # kept connections, open, until close().
            or _fairy(connection)._pool is not pool
        ):
            return False
        try:
            self._reset(_adapter(connection))
        except Exception:
            return False
        self._on_rest(_record(connection))
        self._idle.append(connection)
        return True

    @asynccontextmanager
    async def reserve(self) -> AsyncIterator[None]:
        """For the block, a unit admitted by the pool gate that takes its connection from the
        pool instead of from here (an ORM unit, a snapshot), whenever its first statement asks.

        Kept connections count inside the pool's size and overflow, and the gate admits as
        many units as those allow, so each unit must find one: kept connections are closed
        while the pool could not lend one to every such unit in their blocks now without
        waiting. (Counting only the free connection, two such units admitted together would
        both count the same one, the second then waiting for the first to end.) Units that
        take kept connections need no room: they take a kept one before a free one.
        """
        self._reserved += 1
        try:
            pool: Any = self._engine.sync_engine.pool
            while self._idle and _free(pool) < self._reserved:
                await self._close_quietly(self._idle.pop())
            yield
        finally:
            self._reserved -= 1

    async def close(self) -> None:
        """Stop keeping connections and close the kept ones (back to their pool).

        Raises:
            Whatever closing a connection raises (SQLAlchemy's errors); the others are
            closed first.
        """
        self._open = False
        kept, self._idle = self._idle, []
        failure: BaseException | None = None
        for connection in kept:
            try:
                await self._close(connection)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _close(self, connection: AsyncConnection) -> None:
        if _fairy(connection)._pool is not self._engine.sync_engine.pool:
            await connection.invalidate()  # its disposed pool would hold it open
        await connection.close()

    async def _close_quietly(self, connection: AsyncConnection) -> None:
        try:
            await self._close(connection)
        except Exception:
            logger.warning("closing a kept %s connection failed", self._kind, exc_info=True)

    def _fresh(self, connection: AsyncConnection) -> bool:
        """Whether the pool would hand ``connection`` out as it is (its checkout's checks)."""
        sync = connection.sync_connection
        if sync is None or sync.closed or sync.invalidated:
            return False
        fairy = sync._dbapi_connection
        if fairy is None or fairy._pool is not self._engine.sync_engine.pool:
            return False
        record = fairy._connection_record
        pool = fairy._pool
        recycle = pool._recycle
        return record is not None and not (
            record._is_hard_or_soft_invalidated()
            or (recycle > -1 and time.time() - record.starttime > recycle)
        )


def _reusable(connection: AsyncConnection, driver_reusable: Callable[[Any], bool]) -> bool:
    """Whether ``connection`` is as a fresh checkout of its engine would be."""
    sync = connection.sync_connection
    if (
        sync is None
        or sync.closed
        or sync.invalidated
        or sync._transaction is not None
        or sync._nested_transaction is not None
        or sync._has_events
        or sync._execution_options is not sync.engine._execution_options
    ):
        return False
    fairy = sync._dbapi_connection
    return (
        fairy is not None
        and fairy.dbapi_connection is not None
        and driver_reusable(fairy.dbapi_connection)
    )


def _sqlite_reusable(adapter: Any) -> bool:
    driver = getattr(adapter, "_connection", None)
    if not isinstance(driver, InlineReads) or not driver.bastion_ready():
        return False  # not set up to run on the loop, or a read still on its thread
    sqlite_connection: Any = driver._conn  # type: ignore[attr-defined]  # aiosqlite's
    # A cursor left open holds a read snapshot (the pool's reset closes it: bastion._sqlite).
    return not sqlite_connection.in_transaction and not getattr(sqlite_connection, "_cursors", ())


def _sqlite_reset(adapter: Any) -> None:
    # The pool's reset: the driver's rollback, a no-op outside a transaction but for lifting
    # the statement deadline.
    adapter._connection._conn.rollback()


def _asyncpg_idle(adapter: Any) -> bool:
    """No transaction (SQLAlchemy's adapter's or the server's) and nothing running."""
    connection = adapter._connection
    return (
        adapter._transaction is None
        and not adapter._execute_mutex.locked()
        and not connection.is_closed()
        and not connection.is_in_transaction()
    )


def _asyncpg_read_reusable(adapter: Any) -> bool:
    return adapter.isolation_level == "autocommit" and _asyncpg_idle(adapter)


def _asyncpg_write_reusable(adapter: Any) -> bool:
    # A write unit relies on its BEGIN: a driver connection switched to AUTOCOMMIT behind
    # SQLAlchemy's back (the pool would not notice either) must not serve the next one.
    return adapter.isolation_level != "autocommit" and _asyncpg_idle(adapter)


def _asyncpg_reset(_adapter: Any) -> None:
    pass  # the pool's rollback does nothing on a connection with no transaction open


_DRIVERS: Final[dict[tuple[str, bool], tuple[Callable[[Any], bool], Callable[[Any], None]]]] = {
    # (driver, writes): (whether a connection is as a fresh checkout's, the pool's reset)
    ("aiosqlite", False): (_sqlite_reusable, _sqlite_reset),
    ("aiosqlite", True): (_sqlite_reusable, _sqlite_reset),
    ("asyncpg", False): (_asyncpg_read_reusable, _asyncpg_reset),
    ("asyncpg", True): (_asyncpg_write_reusable, _asyncpg_reset),
}


def supports(engine: AsyncEngine) -> bool:
    """Whether :class:`WarmConnections` can keep ``engine``'s connections (its driver's)."""
    return (engine.dialect.driver, False) in _DRIVERS


def _pool_listener_counts(engine: AsyncEngine) -> tuple[int, ...]:
    # The pool's events, and the engine's engine_connect, which fires for each new Connection
    # (SQLAlchemy's own update_execution_options(isolation_level=...) sets its level there).
    dispatch: Any = engine.sync_engine.pool.dispatch
    return (
        len(dispatch.checkout),
        len(dispatch.checkin),
        len(dispatch.reset),
        len(engine.sync_engine.dispatch.engine_connect),
    )


def _free(pool: Any) -> float:
    """How many connections a QueuePool can lend now without waiting (idle and unopened)."""
    if pool._max_overflow < 0:
        return float("inf")
    return int(pool.checkedin()) + int(pool._max_overflow) - int(pool.overflow())


def _fairy(connection: AsyncConnection) -> Any:
    """The pool's proxy of the driver connection under ``connection`` (a started one)."""
    sync: Any = connection.sync_connection
    return sync._dbapi_connection


def _adapter(connection: AsyncConnection) -> Any:
    return _fairy(connection).dbapi_connection


def _record(connection: AsyncConnection) -> Any:
    return _fairy(connection)._connection_record


def _forget_unit_state(connection: AsyncConnection) -> None:
    # The lean path counts the engine's listeners once per unit (bastion._lean).
    if hasattr(connection, "_bastion_listeners_known"):
        connection._bastion_listeners_known = None
