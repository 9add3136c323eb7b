"""Statements inside an SQLite write transaction run on the event loop once they are known fast.

A write unit's statements hop to aiosqlite's thread and back three or four times each, like
reads did (:mod:`bastion._sqlite_inline`). Writes cannot use the reads' guard — a write stopped
half-way inside a transaction rolls the whole transaction back, so it cannot simply run again
on the thread — so they are admitted by their record instead:

* Only inside a transaction that holds the write lock (``BEGIN IMMEDIATE`` has returned), so
  no statement can wait for a lock. ``COMMIT`` (which syncs the file) and a ``ROLLBACK`` of a
  transaction stay on the thread.
* ``BEGIN IMMEDIATE`` itself runs on the loop with SQLite's busy timeout at zero: the
  process's write units take turns before it (:mod:`bastion._sqlite_writer`), so it finds the
  lock free unless another process holds it (or the WAL needs recovery); then it fails at
  once with ``SQLITE_BUSY`` and runs again on the thread, waiting the configured timeout.
* Calls that touch no file run on the loop at any time: making a cursor, closing cursors, and
  the pool's ``rollback`` on return when no transaction is open (after ``COMMIT``).
* A ``COMMIT`` that fails (a deferred foreign key, checked there) leaves SQLite's transaction
  open, and SQLAlchemy, taking a failed COMMIT as the end of the transaction, skips the pool's
  rollback: the connection kept the write lock until the next unit's ``BEGIN IMMEDIATE``
  failed on it. So every ``COMMIT`` on the write pool is rolled back, there on the thread,
  when it fails.
* A statement's first runs go to the thread, timed there (CPU time); once a run took under
  half the inline budget, later runs of the same SQL run on the loop.
* An inline run that uses more CPU time than the budget sends that SQL back to the thread for
  good.
  So a statement can hold the loop past the budget at most once, and only if it was fast
  before.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Final

from bastion._sqlite_inline import (
    FALLBACKS,
    INLINE_BUDGET_S,
    SLOW_STATEMENTS,
    InlineReads,
    StatementSet,
)

__all__ = ["BEGIN_WRITE", "FAST_WRITES", "InlineWrites"]

_MAX_FAST_STATEMENTS: Final = 1024
_INLINE_IN_TRANSACTION: Final = frozenset({"execute", "fetchall", "close"})
_INLINE_ANY_TIME: Final = frozenset({"cursor", "close_cursors"})

BEGIN_WRITE: Final = "BEGIN IMMEDIATE"
"""How a write unit begins: it takes SQLite's write lock at once (see :mod:`bastion._sqlite`)."""


FAST_WRITES: Final = StatementSet(_MAX_FAST_STATEMENTS)
"""SQL texts that ran within half the budget on the thread: they may run on the loop."""


class InlineWrites(InlineReads):
    """Mixed into aiosqlite's connection class on the write pool: see the module docstring."""

    bastion_begun: bool = False
    """Set while SQLAlchemy's transaction is begun after ``BEGIN IMMEDIATE`` was sent already
    (:mod:`bastion._lean_transactions`): Bastion's ``begin`` listener then sends none."""

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", "")
        connection: sqlite3.Connection | None = self._connection  # type: ignore[attr-defined]
        if name == "commit" and connection is not None and not args and not kwargs:
            return await self._on_thread(_commit, connection)
        if kwargs or not self.bastion_ready() or connection is None:
            return await self._on_thread(fn, *args, **kwargs)
        if name in _INLINE_ANY_TIME or (name == "rollback" and not connection.in_transaction):
            return fn(*args)
        if not connection.in_transaction:
            if name == "execute" and args and args[0] == BEGIN_WRITE:
                return await self._begin_write(connection, fn, args)
            return await self._on_thread(fn, *args)
        if name not in _INLINE_IN_TRANSACTION:
            return await self._on_thread(fn, *args)
        owner = getattr(fn, "__self__", None)
        if name == "execute":
            sql = args[0] if args else None
            if isinstance(owner, sqlite3.Cursor):
                owner.bastion_statement = args  # type: ignore[attr-defined]
            if sql not in FAST_WRITES or sql in SLOW_STATEMENTS:
                return await self._on_thread(_timed, fn, args, sql)
        elif name == "fetchall":
            sql = getattr(owner, "bastion_statement", (None,))[0]
            if sql not in FAST_WRITES:
                return await self._on_thread(fn)
        else:
            return fn(*args)
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            if isinstance(sql, str):
                _charge(sql, started)

    async def _begin_write(
        self, connection: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """``BEGIN IMMEDIATE`` here if the lock is free, else on the thread (module docstring)."""
        connection.execute("PRAGMA busy_timeout=0")
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            FALLBACKS["busy"] += 1
        finally:
            connection.execute(f"PRAGMA busy_timeout={int(self._bastion_busy_timeout_ms)}")
        return await self._on_thread(fn, *args)

    async def bastion_write_soon(
        self, cursor: sqlite3.Cursor, sql: str, parameters: Any
    ) -> list[Any] | None:
        """Run ``sql`` on ``cursor`` and fetch its rows (``None``: it returns none): on the
        loop if it is known fast, else on the thread, timed there (see the module docstring).

        For the lean path (:mod:`bastion._lean`); call only when :meth:`bastion_ready`, inside
        the write unit's transaction.

        Raises:
            sqlite3.Error: the statement failed.
        """
        arguments = () if parameters is None else parameters

        def run() -> list[Any] | None:
            cursor.execute(sql, arguments)
            return cursor.fetchall() if cursor.description else None

        if sql in FAST_WRITES and sql not in SLOW_STATEMENTS:
            started = time.thread_time()
            try:
                return run()
            finally:
                _charge(sql, started)
        return await self._on_thread(_timed, run, (), sql)  # type: ignore[no-any-return]


def _charge(sql: str, started: float) -> None:
    """Send ``sql`` back to the thread for good if its inline run since ``started`` (thread
    CPU time) overran the budget."""
    if time.thread_time() - started > INLINE_BUDGET_S:
        FAST_WRITES.discard(sql)
        SLOW_STATEMENTS.add(sql)
        FALLBACKS["budget"] += 1


def _commit(connection: sqlite3.Connection) -> None:
    """COMMIT ``connection``'s transaction; if that fails, roll it back and raise the COMMIT's
    error (module docstring). A rollback that fails too is not what the caller must hear of."""
    try:
        connection.commit()
    except BaseException:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.rollback()
        raise


def _timed(fn: Callable[..., Any], args: tuple[Any, ...], sql: object) -> Any:
    """Run ``fn(*args)`` (on the thread) and admit ``sql`` to the loop if it ran fast."""
    started = time.thread_time()
    result = fn(*args)
    if isinstance(sql, str) and time.thread_time() - started < INLINE_BUDGET_S / 2:
        FAST_WRITES.add(sql)
    return result
