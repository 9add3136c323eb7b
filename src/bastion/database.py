"""``Database``: owns the engine and its sessions, and hands out units of work.

A unit of work is a block that gets an ``AsyncSession`` and either completes or leaves no
trace:

* ``db.write()`` runs in one transaction that commits when the block ends (or rolls back if it
  raises). On SQLite it takes the write lock first (``BEGIN IMMEDIATE``), so concurrent writers
  queue for up to ``busy_timeout`` instead of failing with "database is locked".
* ``db.read()`` runs without a transaction: on PostgreSQL a single SELECT costs one round
  trip — no BEGIN before it, no ROLLBACK after it. Each statement sees the data committed when
  it starts. ``db.read(consistent=True)`` gives one snapshot for several statements
  (a read-only REPEATABLE READ transaction on PostgreSQL, a deferred transaction on SQLite).

Driver errors leaving a unit are translated into :mod:`bastion.errors`; a failed COMMIT always
surfaces as an exception, never as silent success.

>>> async def main(settings: DatabaseSettings) -> None:  # doctest: +SKIP
...     async with Database(settings) as db:
...         async with db.write() as session:
...             session.add(Item(name="first"))
...         async with db.read() as session:
...             items = (await session.scalars(select(Item))).all()
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, Pool
from sqlalchemy.util import greenlet_spawn

from bastion._sqlite import (
    READ_UNIT,
    SNAPSHOT_UNIT,
    UNIT_OPTION,
    install_sqlite_listeners,
)
from bastion._translate import translate_error
from bastion.errors import (
    BastionError,
    ConfigurationError,
    DatabaseStateError,
    DatabaseUnavailableError,
)
from bastion.settings import DatabaseSettings
from bastion.urls import Backend

__all__ = ["Database", "DatabaseState", "PoolStatus"]

logger = logging.getLogger("bastion.database")


class DatabaseState(enum.Enum):
    """Lifecycle of a :class:`Database`: ``NEW → RUNNING → CLOSING → CLOSED``, never back."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A snapshot of the connection pool."""

    size: int
    checked_out: int
    checked_in: int
    overflow: int


class _ReadOnlySession(Session):
    """The sync session behind read units; refuses writes, which would autocommit there."""


def _refuse_write_statement(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise DatabaseStateError("a read unit cannot write; use Database.write()")


def _refuse_flush(session: Session, _context: Any, _instances: Any) -> None:
    if session.new or session.dirty or session.deleted:
        raise DatabaseStateError("a read unit cannot write; use Database.write()")


def _refuse_write_construct(
    _connection: Any, statement: Any, _multiparams: Any, _params: Any, _options: Any
) -> None:
    if getattr(statement, "is_dml", False):
        raise DatabaseStateError("a read unit cannot write; use Database.write()")


event.listen(_ReadOnlySession, "do_orm_execute", _refuse_write_statement)
event.listen(_ReadOnlySession, "before_flush", _refuse_flush)


class Database:
    """The database of one service: an engine, its pool, and units of work on it.

    Create it with settings built at the edge, ``await start()`` it once (it connects eagerly,
    so a wrong URL or a database that is down fails here, not on the first request), and
    ``await close()`` it once. A closed Database cannot be started again.

    Raises (from ``start``):
        DatabaseStateError: ``start()`` called twice or after ``close()``.
        DatabaseUnavailableError: the first connection could not be made.
        ConfigurationError: the SQLite file's directory cannot be created.
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self._state = DatabaseState.NEW
        self._engine: AsyncEngine | None = None
        self._read_sessions: async_sessionmaker[AsyncSession] | None = None
        self._snapshot_sessions: async_sessionmaker[AsyncSession] | None = None
        self._write_sessions: async_sessionmaker[AsyncSession] | None = None
        self._read_engine: AsyncEngine | None = None
        # The pool that was live when close() gave up waiting: units still running then
        # return their connections to it, and those must be closed, not parked.
        self._retired_pool: Pool | None = None

    def __repr__(self) -> str:
        return f"<Database {self.settings.display_url} {self._state.value}>"

    @property
    def state(self) -> DatabaseState:
        """Where the Database is in its lifecycle."""
        return self._state

    @property
    def backend(self) -> Backend:
        """``"postgresql"`` or ``"sqlite"``."""
        return self.settings.backend

    @property
    def engine(self) -> AsyncEngine:
        """The running engine, for what units of work do not cover (DDL, ``run_sync``).

        Raises:
            DatabaseStateError: the Database is not running.
        """
        self._require_running()
        assert self._engine is not None
        return self._engine

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the engine and check that a connection can be made.

        Raises:
            DatabaseStateError: already started, or closed.
            DatabaseUnavailableError: the database cannot be reached (the message names the
                URL with its password masked, and why).
            ConfigurationError: the directory of the SQLite file cannot be created.
        """
        if self._state is not DatabaseState.NEW:
            raise DatabaseStateError(
                f"Database.start() called on a {self._state.value} Database; "
                "create a new Database instead"
            )
        self._state = DatabaseState.RUNNING
        try:
            self._engine = self._create_engine()
            self._create_sessionmakers(self._engine)
            await asyncio.wait_for(self._check_connection(), self.settings.connect_timeout_s)
        except BaseException as exc:
            await self._dispose_after_failed_start()
            if isinstance(exc, BastionError):
                raise
            translated = translate_error(exc)
            if translated is None:
                raise
            raise DatabaseUnavailableError(
                f"cannot connect to {self.settings.display_url}: {translated.message}",
                sqlstate=translated.sqlstate,
            ) from exc
        logger.info("database started: %s", self.settings.display_url)

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new units, wait for running ones to return their connections, then close.

        Waits at most ``timeout_s`` (default ``DB_CLOSE_TIMEOUT``); connections still checked
        out after that are closed when their units end. Closing twice is harmless.
        """
        if self._state in (DatabaseState.CLOSING, DatabaseState.CLOSED):
            return
        if self._engine is None:
            self._state = DatabaseState.CLOSED
            return
        self._state = DatabaseState.CLOSING
        timeout_s = self.settings.close_timeout_s if timeout_s is None else timeout_s
        engine = self._engine
        pool_in_use = engine.pool
        try:
            await asyncio.wait_for(self._drain(engine), timeout_s)
        except TimeoutError:
            logger.warning(
                "database close: %d connection(s) still in use after %.1fs; closing anyway",
                engine.pool.checkedout(),  # type: ignore[attr-defined]
                timeout_s,
            )
            self._retired_pool = pool_in_use
        finally:
            await engine.dispose()
            self._state = DatabaseState.CLOSED
            logger.info("database closed: %s", self.settings.display_url)

    def pool_status(self) -> PoolStatus:
        """How many connections the pool holds, lends and has opened beyond its size."""
        pool: Any = self.engine.pool
        return PoolStatus(
            size=pool.size(),
            checked_out=pool.checkedout(),
            checked_in=pool.checkedin(),
            overflow=max(pool.overflow(), 0),
        )

    @asynccontextmanager
    async def read(self, *, consistent: bool = False) -> AsyncIterator[AsyncSession]:
        """A unit that only reads. See the module docstring for its guarantees.

        Raises:
            DatabaseStateError: the Database is not running, or the block tried to write.
            DatabaseUnavailableError, PoolTimeoutError, QueryError, …: translated driver
                errors (see :mod:`bastion.errors`).
        """
        self._require_running()
        maker = self._snapshot_sessions if consistent else self._read_sessions
        assert maker is not None
        try:
            # The session's own __aexit__ closes it even if this task is cancelled meanwhile,
            # so a cancelled request still returns its connection to the pool.
            async with maker() as session:
                yield session
                if session.new or session.dirty or session.deleted:
                    # Changes made in a read unit would otherwise vanish without a word.
                    raise DatabaseStateError("a read unit cannot write; use Database.write()")
                if consistent:
                    await session.commit()
        except Exception as exc:
            _raise_translated(exc)
        finally:
            await self._close_retired_connections()

    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[AsyncConnection]:
        """A read unit on a Core ``AsyncConnection``: the leanest way to run SELECTs.

        Same guarantees as :meth:`read` (no transaction, one round trip per statement on
        PostgreSQL, INSERT/UPDATE/DELETE constructs refused), without the ORM session: rows
        come back as rows, for routes that turn them straight into response models.

        Raises:
            DatabaseStateError: the Database is not running, or the block tried to write.
            DatabaseUnavailableError, PoolTimeoutError, QueryError, …: translated errors.
        """
        self._require_running()
        assert self._read_engine is not None
        try:
            async with self._read_engine.connect() as connection:
                yield connection
        except Exception as exc:
            _raise_translated(exc)
        finally:
            await self._close_retired_connections()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A unit that commits when the block ends, or rolls back if it raises.

        Pending ORM changes are flushed before COMMIT, so constraint errors from the block's
        own INSERTs and UPDATEs surface as :class:`~bastion.errors.IntegrityViolationError`.

        Raises:
            DatabaseStateError: the Database is not running.
            IntegrityViolationError: a constraint failed, at flush or at COMMIT (deferred
                constraints).
            CommitOutcomeUnknownError: the connection was lost during COMMIT.
            DatabaseUnavailableError, TransactionConflictError, …: translated driver errors.
        """
        self._require_running()
        assert self._write_sessions is not None
        try:
            async with self._write_sessions() as session:
                yield session
                await session.flush()
                try:
                    await session.commit()
                except Exception as exc:
                    _raise_translated(exc, during_commit=True)
        except Exception as exc:
            _raise_translated(exc)
        finally:
            await self._close_retired_connections()

    @asynccontextmanager
    async def write_connection(self) -> AsyncIterator[AsyncConnection]:
        """A write unit on a Core ``AsyncConnection``: one transaction, committed at the end.

        The same guarantees as :meth:`write` — COMMIT before the block's caller goes on,
        ROLLBACK if the block raises, errors translated — without the ORM unit of work, for
        routes that write with INSERT/UPDATE statements of their own.

        Raises:
            The same as :meth:`write`.
        """
        self._require_running()
        assert self._engine is not None
        try:
            async with self._engine.connect() as connection:
                await connection.begin()
                yield connection
                try:
                    await connection.commit()
                except Exception as exc:
                    _raise_translated(exc, during_commit=True)
        except Exception as exc:
            _raise_translated(exc)
        finally:
            await self._close_retired_connections()

    # -- internals -------------------------------------------------------------------------

    async def _close_retired_connections(self) -> None:
        if self._retired_pool is not None and self._state is DatabaseState.CLOSED:
            # Closes the connection this unit just returned (the pool only holds returned
            # ones); needs a greenlet because closing an async driver connection awaits.
            await greenlet_spawn(self._retired_pool.dispose)

    def _require_running(self) -> None:
        if self._state is not DatabaseState.RUNNING:
            raise DatabaseStateError(f"the Database is {self._state.value}, not running")

    def _create_engine(self) -> AsyncEngine:
        settings = self.settings
        url = settings.url
        options: dict[str, Any] = {
            "echo": settings.echo,
            "pool_pre_ping": settings.pool_pre_ping,
            "pool_timeout": settings.pool_timeout_s,
        }
        if settings.backend == "postgresql":
            options.update(
                pool_size=settings.pool_size,
                max_overflow=settings.max_overflow,
                pool_recycle=settings.pool_recycle_s,
                connect_args={"timeout": settings.connect_timeout_s},
            )
            return create_async_engine(url, **options)

        memory = settings.is_memory
        if memory:
            # Every connection to ":memory:" is a different, empty database: keep exactly one
            # and lend it to one unit at a time.
            options.update(
                poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0, pool_recycle=-1
            )
        else:
            _ensure_parent_directory(url.database or "")
            options.update(
                pool_size=settings.pool_size,
                max_overflow=settings.max_overflow,
                pool_recycle=settings.pool_recycle_s,
            )
        engine = create_async_engine(url, **options)
        install_sqlite_listeners(
            engine.sync_engine, busy_timeout_ms=settings.sqlite_busy_timeout_ms, memory=memory
        )
        return engine

    def _create_sessionmakers(self, engine: AsyncEngine) -> None:
        if self.settings.backend == "postgresql":
            read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
            snapshot_engine = engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        else:
            read_engine = engine.execution_options(**{UNIT_OPTION: READ_UNIT})
            snapshot_engine = engine.execution_options(**{UNIT_OPTION: SNAPSHOT_UNIT})
        for reading_engine in (read_engine, snapshot_engine):
            event.listen(reading_engine.sync_engine, "before_execute", _refuse_write_construct)
        self._read_engine = read_engine
        # expire_on_commit=False: attributes stay loaded after COMMIT, so code reading them
        # afterwards does not trigger implicit (and, under asyncio, failing) lazy loads.
        self._read_sessions = async_sessionmaker(
            read_engine, expire_on_commit=False, sync_session_class=_ReadOnlySession
        )
        self._snapshot_sessions = async_sessionmaker(
            snapshot_engine, expire_on_commit=False, sync_session_class=_ReadOnlySession
        )
        self._write_sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def _check_connection(self) -> None:
        assert self._engine is not None
        async with self._engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")

    async def _dispose_after_failed_start(self) -> None:
        self._state = DatabaseState.CLOSED
        if self._engine is not None:
            with suppress(Exception):
                await self._engine.dispose()

    @staticmethod
    async def _drain(engine: AsyncEngine) -> None:
        pool: Any = engine.pool
        # Polled: the pool has no awaitable "all returned" signal, and this runs once, at exit.
        while pool.checkedout() > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _ensure_parent_directory(database: str) -> None:
    if not database or database.startswith("file:"):
        return
    parent = Path(database).expanduser().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"DATABASE_URL: cannot create the directory {str(parent)!r} for the SQLite file "
            f"({exc.strerror})"
        ) from exc


def _raise_translated(exc: Exception, *, during_commit: bool = False) -> None:
    translated = translate_error(exc, during_commit=during_commit)
    if translated is None or translated is exc:
        raise exc
    raise translated from exc
