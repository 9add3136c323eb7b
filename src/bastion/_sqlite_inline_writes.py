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
* ``COMMIT`` writes the transaction to the WAL and syncs it: I/O, which holds the loop for as
  long as the disk takes. Its hop to the thread and back cost more than that here: an empty
  write unit used 186 us of CPU with it and 70 without, and a unit with one INSERT 481 against
  333 (139 us of wall time per COMMIT on this machine's disk, p99 272 us). So on a WAL
  database, once a ``COMMIT`` on the thread took under half the inline budget (wall time:
  waiting on the disk holds the loop too), later ones of the engine run on the loop; one
  that takes longer than the budget there (a slow disk, a checkpoint of the WAL) sends them
  back to the thread until one is fast again. So a ``COMMIT`` holds the loop past the
  budget at most once each time they come back. Not in another journal mode, whose
  ``COMMIT`` waits for readers' locks (up to the busy timeout).
* SQLite checkpoints the WAL inside the ``COMMIT`` that takes it past 1,000 pages: the
  longest COMMITs above (1.2-2.4 ms), and on the loop they took the reference service's
  loop-lag p99 under ``create_message`` from 1 to 3-4 ms. So the write pool's connections
  do not checkpoint on their own (``wal_autocheckpoint=0``): every ``CHECKPOINT_EVERY``
  COMMITs of the engine, or once a connection changed ``CHECKPOINT_AFTER_CHANGES`` rows since
  its last, the unit that committed runs a ``PASSIVE`` checkpoint on the thread before it
  ends (what the automatic one is: it waits for no reader or writer).
* A statement's first runs go to the thread, timed there (CPU time); once a run took under
  half the inline budget, later runs of the same SQL run on the loop.
* An inline run that uses more CPU time than the budget sends that SQL back to the thread for
  good.
  So a statement can hold the loop past the budget at most once, and only if it was fast
  before.
"""

from __future__ import annotations

import logging
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

__all__ = ["BEGIN_WRITE", "FAST_WRITES", "CommitPlace", "InlineWrites"]

_MAX_FAST_STATEMENTS: Final = 1024
_INLINE_IN_TRANSACTION: Final = frozenset({"execute", "fetchall", "close"})
_INLINE_ANY_TIME: Final = frozenset({"cursor", "close_cursors"})

logger = logging.getLogger("bastion.sqlite")

CHECKPOINT_EVERY: Final = 100
"""COMMITs of one engine between two checkpoints of its WAL (module docstring): a
``create_message`` writes 5-10 pages, so about as often as SQLite's own 1,000 pages."""
CHECKPOINT_AFTER_CHANGES: Final = 10_000
"""Rows one connection may change before its next COMMIT checkpoints, however few COMMITs
(a bulk insert)."""

BEGIN_WRITE: Final = "BEGIN IMMEDIATE"
"""How a write unit begins: it takes SQLite's write lock at once (see :mod:`bastion._sqlite`)."""


FAST_WRITES: Final = StatementSet(_MAX_FAST_STATEMENTS)
"""SQL texts that ran within half the budget on the thread: they may run on the loop."""


class CommitPlace:
    """Where one engine's write units COMMIT: on the loop once known fast (module docstring).

    Shared by the engine's connections (set on each by :mod:`bastion._sqlite`'s ``connect``
    listener), written from the loop and from their threads: one attribute, set whole.
    """

    __slots__ = ("commits", "on_loop")

    def __init__(self) -> None:
        self.on_loop = False
        self.commits = 0  # since the last checkpoint

    def checkpoint_due(self, connection: sqlite3.Connection) -> bool:
        """Count a COMMIT of ``connection``; whether the WAL should be checkpointed now."""
        self.commits += 1
        changes = connection.total_changes - getattr(connection, "bastion_changes_mark", 0)
        return self.commits >= CHECKPOINT_EVERY or changes >= CHECKPOINT_AFTER_CHANGES

    def ran_on_loop(self, seconds: float) -> None:
        """Note a COMMIT's wall time on the loop: over the budget, later ones go to the thread."""
        if seconds > INLINE_BUDGET_S:
            self.on_loop = False
            FALLBACKS["slow_commit"] += 1

    def ran_on_thread(self, seconds: float) -> None:
        """Note a COMMIT's wall time on the thread: under half the budget, later ones may run
        on the loop."""
        if seconds < INLINE_BUDGET_S / 2:
            self.on_loop = True


class InlineWrites(InlineReads):
    """Mixed into aiosqlite's connection class on the write pool: see the module docstring."""

    _bastion_commits: CommitPlace | None = None
    """Set by the ``connect`` listener on a WAL database: where this engine's COMMITs run."""

    bastion_begun: bool = False
    """Set while SQLAlchemy's transaction is begun after ``BEGIN IMMEDIATE`` was sent already
    (:mod:`bastion._lean_transactions`): Bastion's ``begin`` listener then sends none."""

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", "")
        connection: sqlite3.Connection | None = self._connection  # type: ignore[attr-defined]
        if kwargs or not self.bastion_ready() or connection is None:
            return await self._on_thread(fn, *args, **kwargs)
        if name in _INLINE_ANY_TIME or (name == "rollback" and not connection.in_transaction):
            return fn(*args)
        if not connection.in_transaction:
            if name == "execute" and args and args[0] == BEGIN_WRITE:
                return await self._begin_write(connection, fn, args)
            return await self._on_thread(fn, *args)
        if name == "commit":
            return await self._commit(connection, self._bastion_commits)
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

    async def _commit(self, connection: sqlite3.Connection, place: CommitPlace | None) -> None:
        """``COMMIT`` on the loop if this engine's are known fast (``place``), else on the
        thread, timed there; then, if due, a checkpoint on the thread (module docstring). A
        COMMIT that fails is rolled back (:func:`_commit`)."""
        if place is None or not place.on_loop:
            await self._on_thread(_commit, connection, place)
        else:
            started = time.perf_counter()
            try:
                _commit(connection, None)
            finally:
                place.ran_on_loop(time.perf_counter() - started)
        if place is not None and place.checkpoint_due(connection):
            place.commits = 0
            await self._on_thread(_checkpoint, connection)

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


def _commit(connection: sqlite3.Connection, place: CommitPlace | None) -> None:
    """COMMIT ``connection``'s transaction, and tell ``place`` (if any) how long it took.

    A COMMIT that fails may leave the transaction open: SQLite checks deferred foreign keys
    there, and leaves the transaction open when one fails. SQLAlchemy takes a failed COMMIT
    as the end of its transaction and skips the pool's rollback on return, so the connection
    held the write lock until the next unit's ``BEGIN IMMEDIATE`` failed on it. It is rolled
    back here instead, and the COMMIT's error raised.
    """
    started = time.perf_counter()
    try:
        connection.commit()
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    finally:
        if place is not None:
            place.ran_on_thread(time.perf_counter() - started)


def _checkpoint(connection: sqlite3.Connection) -> None:
    """Checkpoint the WAL as SQLite's automatic checkpoint does (``PASSIVE``), on the thread.

    A failure is logged, not raised: the COMMIT before it stands, and its unit must not
    report a write that happened as failed (a retry would repeat it). The next checkpoint
    due tries again, as SQLite's own does after a failed one.
    """
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").close()
    except sqlite3.Error as exc:
        logger.warning("WAL checkpoint failed (the next one will try again): %s", exc)
    connection.bastion_changes_mark = connection.total_changes  # type: ignore[attr-defined]


def _timed(fn: Callable[..., Any], args: tuple[Any, ...], sql: object) -> Any:
    """Run ``fn(*args)`` (on the thread) and admit ``sql`` to the loop if it ran fast."""
    started = time.thread_time()
    result = fn(*args)
    if isinstance(sql, str) and time.thread_time() - started < INLINE_BUDGET_S / 2:
        FAST_WRITES.add(sql)
    return result
