"""Reads on SQLite run on the event loop itself, and move to a thread only when they would block.

aiosqlite runs every call on its connection's own thread. A point read is then about ten thread
hops (cursor, execute, fetch, close, rollback…; each a queue put, a thread wake-up and a
``call_soon_threadsafe`` back), and the hops, not SQLite, are where the time goes: profiled
under ``wrk``, the reference service spent 1.7 ms of CPU per point read against 0.3 ms for the
same two queries made with ``sqlite3`` directly on the loop (``bench/results``).

On Bastion's read pool the connections are ``PRAGMA query_only``, so a call there can block the
loop in only two ways, and both are caught:

* **It runs long.** While a call runs on the loop, the connection's progress handler also
  stops it once it has used :data:`INLINE_BUDGET_S` of CPU time (CPU, not wall-clock time: a
  statement the operating system merely preempted is not slow); the call then runs again on
  the thread, which is safe because nothing on this connection can write (a SELECT
  interrupted leaves no trace, and an open read transaction stays open). Its SQL is
  remembered, and later runs of it go straight to the thread, until one of those is fast.
* **It waits for a lock.** Read connections carry ``busy_timeout=0``; a read that would wait
  (WAL recovery, a restore holding the file) fails at once with ``SQLITE_BUSY`` and runs again
  on the thread with the configured timeout.

Two layers do it. :class:`InlineReads`, mixed into aiosqlite's connection, runs its calls on the
loop; :class:`InlineCursor`, SQLAlchemy's cursor adapter for those connections, goes further and
runs a statement and its fetch in one step, saving SQLAlchemy's greenlet round trip per driver
call (about 30 µs a statement).

Calls that cannot be run again from scratch (``fetchone``/``fetchmany`` of a streamed result)
always go to the thread, as does every call while an earlier one is still on the thread (a
cancelled unit's), so the connection's calls stay in order.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
)
from sqlalchemy.util import EMPTY_DICT, await_

__all__ = [
    "FALLBACKS",
    "INLINE_BUDGET_S",
    "SLOW_STATEMENTS",
    "InlineAdaptedConnection",
    "InlineReads",
    "StatementSet",
    "inline_driver_class",
]

INLINE_BUDGET_S: Final = 0.002
"""How long a call may hold the event loop before it is stopped and sent to the thread."""

_NO_BUDGET: Final = float("inf")
_MAX_SLOW_STATEMENTS: Final = 1024
_INLINE_CALLS: Final = frozenset(
    {"cursor", "execute", "fetchall", "close", "close_cursors", "commit", "rollback"}
)


class StatementSet:
    """A bounded set of SQL texts, oldest forgotten first; added to from aiosqlite's threads."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._texts: dict[str, None] = {}
        self._lock = threading.Lock()

    def __contains__(self, sql: object) -> bool:
        return sql in self._texts

    def add(self, sql: str) -> None:
        with self._lock:
            self._texts[sql] = None
            if len(self._texts) > self._capacity:
                del self._texts[next(iter(self._texts))]

    def discard(self, sql: str) -> None:
        with self._lock:
            self._texts.pop(sql, None)


SLOW_STATEMENTS: Final = StatementSet(_MAX_SLOW_STATEMENTS)
"""SQL texts that overran the inline budget: they run on the thread until a run is fast."""

FALLBACKS: Final[dict[str, int]] = {"budget": 0, "busy": 0, "known_slow": 0}
"""Statements sent to the thread, by reason, in this process
(``bastion_sqlite_inline_fallbacks``)."""


class MustWait(Exception):  # noqa: N818 - a signal, not an error
    """An inline read overran its budget or met a lock: it must run on the thread."""


class InlineReads:
    """Mixed into aiosqlite's connection class on the read pool: see the module docstring.

    The engine's ``connect`` listener sets the three ``_bastion_*`` attributes; until then (and
    on any connection without them) every call goes to the thread as aiosqlite does it.
    """

    _bastion_deadline: list[float] | None = None
    """The statement deadline cell the progress handler reads (``inf``: no deadline)."""
    _bastion_busy_timeout_ms: int = 0
    _bastion_queued: int = 0
    _bastion_done: int = 0

    def bastion_ready(self) -> bool:
        """Whether a call may run on the loop now: set up, open, and nothing on the thread."""
        return (
            self._bastion_deadline is not None
            and self._bastion_queued == self._bastion_done
            and self._running  # type: ignore[attr-defined]
            and self._connection is not None  # type: ignore[attr-defined]
        )

    def bastion_read(self, cursor: sqlite3.Cursor, sql: str, parameters: Any) -> list[Any] | None:
        """Run ``sql`` on ``cursor`` here, within the budget, and fetch its rows (``None``: none).

        Call only when :meth:`bastion_ready`.

        Raises:
            MustWait: the statement overran the budget or met a lock; run it on the thread.
            sqlite3.Error: the statement failed (including its statement timeout).
        """
        deadline = self._bastion_deadline
        assert deadline is not None
        statement_deadline = deadline[0]
        deadline[1] = time.thread_time() + INLINE_BUDGET_S
        try:
            cursor.execute(sql, () if parameters is None else parameters)
            return cursor.fetchall() if cursor.description else None
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code == sqlite3.SQLITE_INTERRUPT and time.monotonic() < statement_deadline:
                FALLBACKS["budget"] += 1
                SLOW_STATEMENTS.add(sql)
                raise MustWait from None
            if code == sqlite3.SQLITE_BUSY:
                FALLBACKS["busy"] += 1
                raise MustWait from None
            raise
        finally:
            deadline[1] = _NO_BUDGET

    async def bastion_read_soon(
        self, cursor: sqlite3.Cursor, sql: str, parameters: Any
    ) -> list[Any] | None:
        """:meth:`bastion_read` here, or on the thread (no budget, waiting for locks as set).

        A statement in :data:`SLOW_STATEMENTS` goes straight to the thread; if it runs fast
        there, it leaves the set.
        """
        if sql in SLOW_STATEMENTS:
            FALLBACKS["known_slow"] += 1
        else:
            try:
                return self.bastion_read(cursor, sql, parameters)
            except MustWait:
                pass

        def read() -> list[Any] | None:
            started = time.thread_time()
            cursor.execute(sql, () if parameters is None else parameters)
            rows = cursor.fetchall() if cursor.description else None
            if time.thread_time() - started < INLINE_BUDGET_S / 2:
                SLOW_STATEMENTS.discard(sql)  # fast this time: let it try the loop again
            return rows

        return await self._on_thread(self._waiting_for_locks, read)  # type: ignore[no-any-return]

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = self._bastion_deadline
        name = getattr(fn, "__name__", "")
        if kwargs or name not in _INLINE_CALLS or not self.bastion_ready():
            return await self._on_thread(fn, *args, **kwargs)
        assert deadline is not None
        owner = getattr(fn, "__self__", None)
        if name == "execute":
            if args and args[0] in SLOW_STATEMENTS:
                FALLBACKS["known_slow"] += 1
                return await self._on_thread(fn, *args)
            if isinstance(owner, sqlite3.Cursor):
                owner.bastion_statement = args  # type: ignore[attr-defined]
            again: Callable[[], Any] = lambda: fn(*args)  # noqa: E731
        elif name == "fetchall":
            statement = getattr(owner, "bastion_statement", None)
            if statement is None or statement[0] in SLOW_STATEMENTS:
                return await self._on_thread(fn)
            again = lambda: (owner.execute(*statement), fn())[1]  # type: ignore[union-attr]  # noqa: E731
        else:
            again = lambda: fn(*args)  # noqa: E731
        statement_deadline = deadline[0]
        deadline[1] = time.thread_time() + INLINE_BUDGET_S
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code == sqlite3.SQLITE_INTERRUPT and time.monotonic() < statement_deadline:
                FALLBACKS["budget"] += 1
                sql = getattr(owner, "bastion_statement", (None,))[0]
                if isinstance(sql, str):
                    SLOW_STATEMENTS.add(sql)
            elif code == sqlite3.SQLITE_BUSY:
                FALLBACKS["busy"] += 1
            else:
                raise
        finally:
            deadline[1] = _NO_BUDGET
        return await self._on_thread(self._waiting_for_locks, again)

    def _waiting_for_locks(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` (on the thread) with the busy timeout the settings ask for."""
        connection: sqlite3.Connection = self._connection  # type: ignore[attr-defined]
        connection.execute(f"PRAGMA busy_timeout={int(self._bastion_busy_timeout_ms)}")
        try:
            return call()
        finally:
            connection.execute("PRAGMA busy_timeout=0")

    async def _on_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """aiosqlite's own path: run ``fn`` on the connection's thread."""

        def counted() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._bastion_done += 1  # only the thread writes this

        self._bastion_queued += 1  # only the event loop writes this
        return await super()._execute(counted)  # type: ignore[misc]


class InlineCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor adapter, calling ``sqlite3`` directly when it may.

    SQLAlchemy's adapter reaches the driver through ``await_``: each call is a greenlet switch
    out to the event loop and back, three or four per statement. On a connection whose calls
    may run on the loop (:meth:`InlineReads.bastion_ready`), that round trip buys nothing, so
    this adapter makes the calls itself; otherwise, and for statements known to be slow, it
    leaves them to SQLAlchemy's own path.
    """

    __slots__ = ()

    def __init__(self, adapt_connection: Any) -> None:
        driver = adapt_connection._connection
        if not driver.bastion_ready():
            super().__init__(adapt_connection)
            return
        self._adapt_connection = adapt_connection
        self._connection = driver
        self._cursor = aiosqlite.Cursor(driver, driver._conn.cursor())  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        driver = self._connection
        if not driver.bastion_ready():
            return super().execute(operation, parameters)
        cursor: sqlite3.Cursor = self._cursor._cursor  # type: ignore[attr-defined]
        try:
            # One await_ (SQLAlchemy requires a statement to await once), on a coroutine that
            # does not suspend unless the read must move to the thread.
            rows = await_(driver.bastion_read_soon(cursor, operation, parameters))
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        if rows is not None:
            self._rows = collections.deque(rows)
        return self._cursor

    def close(self) -> None:
        if self._cursor is None or self._soft_closed_memoized:
            self._rows.clear()
            return
        if self._connection.bastion_ready():
            self._rows.clear()
            self._cursor._cursor.close()  # type: ignore[attr-defined]
            return
        super().close()


class InlineAdaptedConnection(AsyncAdapt_aiosqlite_connection):
    """SQLAlchemy's aiosqlite connection adapter with :class:`InlineCursor` and a direct
    ``rollback`` (the one the pool runs on every return)."""

    __slots__ = ()
    _cursor_cls = InlineCursor

    def rollback(self) -> None:
        driver = self._connection
        if not driver.bastion_ready():
            super().rollback()
            return
        try:
            driver._conn.rollback()
        except Exception as error:
            self._handle_exception(error)


def inline_driver_class(driver_class: type, *mixins: type) -> type:
    """A subclass of aiosqlite's connection class with ``mixins`` in front (cached per set)."""
    key = (driver_class, mixins)
    cls = _CLASSES.get(key)
    if cls is None:
        names = "".join(mixin.__name__.strip("_") for mixin in mixins)
        cls = type(f"{names}{driver_class.__name__}", (*mixins, driver_class), {})
        _CLASSES[key] = cls
    return cls


_CLASSES: dict[tuple[type, tuple[type, ...]], type] = {}
