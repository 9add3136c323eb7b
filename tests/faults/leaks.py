"""The scenario catalogue's "leak check" (A15), as helpers the fault tests call.

After a scenario, nothing it did may outlive it:

* the pools lend no connection (``Database.pool_status().checked_out == 0``);
* on PostgreSQL, for the Database's own ``application_name`` (give each test a unique one):
  no more server sessions than the pools may hold (``pool_size + max_overflow`` per engine),
  and no more than the pools believe they hold (a socket the pool forgot, still open on the
  server, is a leak too); no session ``idle in transaction``; no ``pg_locks`` held;
* on SQLite (a file database), no connection holds the write lock or an open read snapshot;
* SQLAlchemy never had to clean up a "non-checked-in connection" in the garbage collector
  (:func:`no_gc_connection_cleanup`), no task failed unobserved and no thread raised
  (:func:`no_unhandled_task_errors`); :func:`leak_guard` is both. Stricter, and not part of
  the catalogue's check: :func:`no_task_destroyed_pending` (a cleanup task that never ended).

Stragglers get :data:`SETTLE_S` to clear — a cancelled unit's connection is closed by a
shielded task that may finish a few milliseconds after the unit's own task — and fail the check
if they stay.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from bastion import Database

__all__ = [
    "CHECKER_APPLICATION_NAME",
    "SETTLE_S",
    "GCCleanupRecorder",
    "ServerSessions",
    "assert_no_leaks",
    "assert_sqlite_write_lock_free",
    "asyncpg_dsn",
    "leak_guard",
    "no_gc_connection_cleanup",
    "no_task_destroyed_pending",
    "no_unhandled_task_errors",
    "pool_budget",
    "server_sessions",
]

SETTLE_S: Final = 2.0
"""Seconds a straggler (a connection still being closed, a lock still being released) gets."""

CHECKER_APPLICATION_NAME: Final = "bastion-leak-check"
"""The checking session's own application_name, so it never counts itself."""

GC_CLEANUP_MESSAGE: Final = "non-checked-in connection"
"""What SQLAlchemy's pool logs (and warns) when the garbage collector finds a lent connection."""


def asyncpg_dsn(url: str) -> str:
    """A DSN asyncpg accepts, from any PostgreSQL URL (``postgresql+asyncpg://``, …)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def pool_budget(database: Database) -> int:
    """The most connections the Database's pools may hold: size + overflow, per engine."""
    return database.pool_capacity


@dataclass(frozen=True, slots=True)
class ServerSessions:
    """What the server says about one application_name's sessions."""

    total: int
    idle_in_transaction: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)


async def server_sessions(admin: asyncpg.Connection, application_name: str) -> ServerSessions:
    """Sessions, ``idle in transaction`` sessions and locks of ``application_name``."""
    rows = await admin.fetch(
        """
        SELECT pid, state, now() - xact_start AS xact_age, left(query, 80) AS query
        FROM pg_stat_activity
        WHERE application_name = $1 AND pid <> pg_backend_pid()
        """,
        application_name,
    )
    idle_in_transaction = [
        f"pid {row['pid']} {row['state']} for {row['xact_age']} after {row['query']!r}"
        for row in rows
        if str(row["state"]).startswith("idle in transaction")
    ]
    lock_rows = await admin.fetch(
        """
        SELECT l.pid, l.locktype, l.mode, l.granted, l.relation::regclass::text AS relation,
               left(a.query, 80) AS query
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE a.application_name = $1 AND l.pid <> pg_backend_pid()
        """,
        application_name,
    )
    locks = [
        f"pid {row['pid']} {row['mode']} on {row['locktype']} {row['relation'] or ''} "
        f"(granted={row['granted']}) after {row['query']!r}"
        for row in lock_rows
    ]
    return ServerSessions(len(rows), idle_in_transaction, locks)


async def assert_no_leaks(
    database: Database, *, admin_url: str | None = None, settle_s: float = SETTLE_S
) -> None:
    """Fail, naming what leaked, unless nothing is left over from the units that ran.

    ``admin_url`` (PostgreSQL only): a ``postgresql://`` URL of the same server, used by a
    checking session of its own to read ``pg_stat_activity`` and ``pg_locks``. Without it
    only the client-side checks run on PostgreSQL.
    """
    deadline = time.monotonic() + settle_s
    # Polled: the pool has no "all returned" signal.
    while database.pool_status().checked_out and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    status = database.pool_status()
    assert status.checked_out == 0, (
        f"leak: {status.checked_out} connection(s) still checked out of the pool "
        f"{settle_s:g}s after the last unit ended ({status})"
    )
    budget = pool_budget(database)
    held = status.checked_in + status.checked_out
    assert held <= budget, f"leak: the pools hold {held} connections, over their budget {budget}"

    if database.backend == "sqlite":
        if not database.settings.is_memory:
            await assert_sqlite_write_lock_free(database, within_s=settle_s)
        return
    if admin_url is None:
        return
    application_name = database.settings.application_name
    admin = await asyncpg.connect(
        asyncpg_dsn(admin_url),
        server_settings={"application_name": CHECKER_APPLICATION_NAME},
        timeout=10,
    )
    try:
        while True:
            sessions = await server_sessions(admin, application_name)
            status = database.pool_status()
            pooled = status.checked_in + status.checked_out
            clean = (
                sessions.total <= min(budget, pooled)
                and not sessions.idle_in_transaction
                and not sessions.locks
            )
            if clean or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()

    assert sessions.total <= budget, (
        f"leak: {sessions.total} server sessions with application_name "
        f"{application_name!r}, over the pools' budget of {budget}"
    )
    assert sessions.total <= pooled, (
        f"leak: the server has {sessions.total} sessions with application_name "
        f"{application_name!r} but the pools hold only {pooled} connections: "
        f"{sessions.total - pooled} socket(s) forgotten by the pool are still open"
    )
    assert not sessions.idle_in_transaction, (
        f"leak: session(s) left 'idle in transaction' after {settle_s:g}s: "
        + "; ".join(sessions.idle_in_transaction)
    )
    assert not sessions.locks, (
        f"leak: lock(s) still held by {application_name!r} after {settle_s:g}s: "
        + "; ".join(sessions.locks)
    )


async def assert_sqlite_write_lock_free(database: Database, *, within_s: float = 1.0) -> None:
    """Fail unless a fresh connection gets the file's write lock and a full checkpoint soon.

    ``BEGIN IMMEDIATE`` succeeding means no connection holds (or is stuck in) a write
    transaction; ``PRAGMA wal_checkpoint(TRUNCATE)`` completing means none holds a read
    snapshot either — SQLite's equivalent of a session left ``idle in transaction``.
    """
    path = database.settings.url.database
    assert path, "not an SQLite file database"
    deadline = time.monotonic() + within_s
    problem = ""
    while True:
        # timeout=0: never block the event loop; this loop does the waiting.
        checker = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            try:
                checker.execute("BEGIN IMMEDIATE")
                checker.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                problem = f"the write lock is held ({exc})"
            else:
                busy, _log, _done = checker.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                problem = "a read snapshot is held open (checkpoint busy)" if busy else ""
        finally:
            checker.close()
        if not problem or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    assert not problem, f"leak: on {path}, {problem} {within_s:g}s after the last unit ended"


class _MessageRecorder(logging.Handler):
    """Records ERROR messages of one logger that contain one of ``needles``."""

    def __init__(self, *needles: str) -> None:
        super().__init__(level=logging.ERROR)
        self.needles = needles
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(needle in message for needle in self.needles):
            self.messages.append(message)


class GCCleanupRecorder(_MessageRecorder):
    """Records SQLAlchemy's "garbage collector is trying to clean up" pool messages."""

    def __init__(self) -> None:
        super().__init__(GC_CLEANUP_MESSAGE)


_Recorder = TypeVar("_Recorder", bound=_MessageRecorder)


@contextmanager
def _recording(logger_name: str, recorder: _Recorder) -> Iterator[_Recorder]:
    logger = logging.getLogger(logger_name)
    logger.addHandler(recorder)
    try:
        yield recorder
        gc.collect()  # what the block abandoned is found now, not in some later test
    finally:
        logger.removeHandler(recorder)


@contextmanager
def no_gc_connection_cleanup() -> Iterator[GCCleanupRecorder]:
    """Fail if, by the end of the block, the GC had to clean up a connection never returned.

    SQLAlchemy's pool reports that with ``pool.logger.error(...)`` and then a warning; the
    warning is raised inside a GC callback, where an exception cannot propagate, so the log
    record is what this catches. The block ends with ``gc.collect()``, so connections
    abandoned inside it are found now, not in some later test.
    """
    with _recording("sqlalchemy.pool", GCCleanupRecorder()) as recorder:
        yield recorder
    assert not recorder.messages, (
        f"leak: the garbage collector cleaned up {len(recorder.messages)} connection(s) that "
        f"were never returned to the pool; first: {recorder.messages[0]}"
    )


UNHANDLED_TASK_ERROR: Final = "Task exception was never retrieved"
"""What asyncio logs for a task that failed with nobody awaiting it.

Not "Future exception was never retrieved": asyncpg logs that when a connection attempt is
cancelled during its TLS negotiation (a future of its own; nothing is left open).
"""
TASK_DESTROYED_PENDING: Final = "Task was destroyed but it is pending"
"""What asyncio logs when a task that never finished is garbage-collected."""


@contextmanager
def no_unhandled_task_errors() -> Iterator[list[str]]:
    """Fail if, by the end of the block, a task failed unobserved or a thread raised."""
    thread_errors: list[str] = []
    previous_hook = threading.excepthook

    def record_thread_error(args: threading.ExceptHookArgs) -> None:
        thread_errors.append(f"thread {args.thread!r}: {args.exc_value!r}")
        previous_hook(args)

    threading.excepthook = record_thread_error
    try:
        with _recording("asyncio", _MessageRecorder(UNHANDLED_TASK_ERROR)) as recorder:
            yield recorder.messages
    finally:
        threading.excepthook = previous_hook
    problems = recorder.messages + thread_errors
    assert not problems, (
        f"leak: {len(problems)} unhandled task/thread exception(s); first: {problems[0][:2000]}"
    )


@contextmanager
def no_task_destroyed_pending() -> Iterator[list[str]]:
    """Fail if a task was garbage-collected before it finished (a cleanup that never ended).

    Such a task still references what it was cleaning up until the collector frees it.
    """
    with _recording("asyncio", _MessageRecorder(TASK_DESTROYED_PENDING)) as recorder:
        yield recorder.messages
    assert not recorder.messages, (
        f"leak: {len(recorder.messages)} task(s) destroyed while still pending; first: "
        f"{recorder.messages[0][:2000]}"
    )


@contextmanager
def leak_guard() -> Iterator[None]:
    """The catalogue's GC and task/thread checks around one block (a whole test)."""
    with no_unhandled_task_errors(), no_gc_connection_cleanup():
        yield
